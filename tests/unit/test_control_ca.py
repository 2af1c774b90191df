"""The tailnet CA and the CSR checks of ``POST /v1/cert`` (tsnet2.control.ca): pure functions,
verified with real TLS handshakes where it matters (Python's ssl with only the tailnet CA)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tsnet2.control import ca

DOMAIN = "tail.example"
FQDN = f"web.{DOMAIN}"


@pytest.fixture(scope="module")
def authority() -> ca.TailnetCA:
    key_pem, cert_pem = ca.new_ca(DOMAIN)
    return ca.load_ca(key_pem, cert_pem)


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def make_csr(key: PrivateKey, sans: list[x509.GeneralName] | None,
             cn: str = "ignored") -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_ca_certificate_is_a_constrained_self_signed_p256_ca(authority: ca.TailnetCA) -> None:
    cert = authority.cert
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        f"tsnet2 tailnet CA {DOMAIN}"
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    assert constraints.permitted_subtrees == [x509.DNSName(DOMAIN)]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life >= dt.timedelta(days=9 * 365)
    cert.verify_directly_issued_by(cert)
    assert "key=" not in repr(authority)  # the key is not shown


def test_load_ca_refuses_a_key_of_another_ca() -> None:
    key_pem, _ = ca.new_ca(DOMAIN)
    _, other_cert = ca.new_ca(DOMAIN)
    with pytest.raises(ValueError, match="does not match its key"):
        ca.load_ca(key_pem, other_cert)


def test_issued_leaf(authority: ca.TailnetCA) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    key = p256()
    issued = ca.issue_from_csr(authority, make_csr(key, [x509.DNSName(FQDN)], cn="x"),
                               [FQDN + "."], lifetime=3600, now=now)
    leaf = issued.cert
    assert issued.names == (FQDN,)
    assert leaf.not_valid_before_utc == now - dt.timedelta(seconds=60)
    assert leaf.not_valid_after_utc == now + dt.timedelta(seconds=3600)
    assert leaf.issuer == authority.cert.subject
    leaf.verify_directly_issued_by(authority.cert)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [FQDN]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued.chain_pem == issued.leaf_pem + authority.cert_pem
    assert issued.serial_hex == format(leaf.serial_number, "x")
    # The CA's end bounds a leaf's.
    long = ca.issue_from_csr(authority, make_csr(key, [x509.DNSName(FQDN)]), [FQDN],
                             lifetime=100 * 365 * 86400.0)
    assert long.not_after == authority.cert.not_valid_after_utc


@pytest.mark.parametrize("key", [
    ec.generate_private_key(ec.SECP384R1()),
    rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ed25519.Ed25519PrivateKey.generate(),
], ids=["p384", "rsa2048", "ed25519"])
def test_other_accepted_key_types(authority: ca.TailnetCA, key: PrivateKey) -> None:
    issued = ca.issue_from_csr(authority, make_csr(key, [x509.DNSName(FQDN)]), [FQDN])
    assert issued.names == (FQDN,)


@pytest.mark.parametrize(("key", "message"), [
    (ec.generate_private_key(ec.SECP256K1()), "EC secp256k1; use P-256 or P-384"),
    (rsa.generate_private_key(public_exponent=65537, key_size=1024),
     "RSA-1024; use at least 2048 bits"),
], ids=["secp256k1", "rsa1024"])
def test_weak_or_odd_keys_are_refused(authority: ca.TailnetCA, key: PrivateKey,
                                      message: str) -> None:
    with pytest.raises(ca.CSRError, match=message) as info:
        ca.issue_from_csr(authority, make_csr(key, [x509.DNSName(FQDN)]), [FQDN])
    assert info.value.status == 400


@pytest.mark.parametrize(("sans", "message"), [
    (None, "no subjectAltName: put the node's FQDN in a DNS SAN"),
    ([x509.DNSName(FQDN), x509.IPAddress(ipaddress.ip_address("100.64.0.1"))],
     "IPAddress entries; only DNS names"),
    ([x509.DNSName(FQDN), x509.UniformResourceIdentifier("https://x")],
     "UniformResourceIdentifier entries"),
    ([x509.DNSName(FQDN), x509.RFC822Name("a@b.c")], "RFC822Name entries"),
    ([x509.DNSName(f"n{i}.{DOMAIN}") for i in range(17)], "asks for 17 names; at most 16"),
], ids=["no-san", "ip", "uri", "email", "too-many"])
def test_bad_subject_alt_names(authority: ca.TailnetCA, sans: list[x509.GeneralName] | None,
                               message: str) -> None:
    with pytest.raises(ca.CSRError, match=message) as info:
        ca.issue_from_csr(authority, make_csr(p256(), sans, cn=FQDN), [FQDN])
    assert info.value.status == 400


@pytest.mark.parametrize("name", [f"db.{DOMAIN}", DOMAIN, f"x.{FQDN}", "web.other.example"])
def test_a_name_the_node_may_not_have_is_403(authority: ca.TailnetCA, name: str) -> None:
    csr = make_csr(p256(), [x509.DNSName(FQDN), x509.DNSName(name)], cn=FQDN)
    with pytest.raises(ca.NameNotAllowed, match=f"not have a certificate for '{name}'; it "
                       f"may ask for {FQDN}") as info:
        ca.issue_from_csr(authority, csr, [FQDN])
    assert info.value.status == 403


def test_common_name_is_ignored_and_names_are_normalised(authority: ca.TailnetCA) -> None:
    csr = make_csr(p256(), [x509.DNSName("WEB.Tail.Example."), x509.DNSName(FQDN)],
                   cn="db.tail.example")
    assert ca.issue_from_csr(authority, csr, [FQDN]).names == (FQDN,)


@pytest.mark.parametrize(("csr", "message"), [
    (None, "csr is required"),
    (42, "csr is required"),
    ("", "csr is required"),
    ("x" * (ca.MAX_CSR_PEM + 1), f"at most {ca.MAX_CSR_PEM} are accepted"),
    ("hello", "not a PEM certificate signing request"),
    ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     "csr cannot be parsed"),
    ("-----BEGIN CERTIFICATE REQUEST-----\nü\n-----END CERTIFICATE REQUEST-----\n",
     "csr cannot be parsed"),
], ids=["none", "number", "empty", "oversized", "not-pem", "garbage-der", "non-ascii"])
def test_garbage_csr(authority: ca.TailnetCA, csr: object, message: str) -> None:
    with pytest.raises(ca.CSRError, match=message):
        ca.issue_from_csr(authority, csr, [FQDN])


def test_csr_with_a_bad_signature_is_refused(authority: ca.TailnetCA) -> None:
    pem = make_csr(p256(), [x509.DNSName(FQDN)])
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(
        serialization.Encoding.DER))
    der[-3] ^= 0x55  # inside the signature
    import base64
    body = base64.encodebytes(bytes(der)).decode()
    tampered = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(ca.CSRError, match="signature is not valid"):
        ca.issue_from_csr(authority, tampered, [FQDN])


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str) -> str:
    """One TLS handshake over a socketpair; returns the version or raises the client error."""
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=name) as c:
            assert c.recv(2) == b"ok"
            return str(c.version())
    finally:
        b.close()
        t.join(30)
        a.close()


def test_python_ssl_with_only_the_tailnet_ca_verifies_the_leaf(
        authority: ca.TailnetCA, tmp_path: Path) -> None:
    key = p256()
    issued = ca.issue_from_csr(authority, make_csr(key, [x509.DNSName(FQDN)]), [FQDN])
    (tmp_path / "chain.pem").write_bytes(issued.chain_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cadata=authority.cert_pem.decode())
    assert _handshake(server, client, FQDN).startswith("TLSv1.")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(server, client, f"db.{DOMAIN}")


def test_name_constraints_stop_the_ca_from_vouching_outside_the_tailnet(
        authority: ca.TailnetCA, tmp_path: Path) -> None:
    # A leaf for a name outside the domain, signed with the CA key directly (what a stolen
    # key could do): verifiers that trust the tailnet CA still refuse it.
    key = p256()
    outside = "www.example.com"
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, outside)]))
            .issuer_name(authority.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
            .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(outside)]), False)
            .sign(authority.key, hashes.SHA256()))
    (tmp_path / "chain.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                                         + authority.cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cadata=authority.cert_pem.decode())
    with pytest.raises(ssl.SSLCertVerificationError, match=r"name constraint|permitted"):
        _handshake(server, client, outside)
