"""A throwaway tailnet-like CA for TLS tests (EC P-256, like the control server's), and
SSL contexts built from it as ``NodeCerts`` builds them."""

from __future__ import annotations

import datetime
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class TailnetCA:
    """A CA key and certificate; :meth:`issue` makes leaf chains for DNS names."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, cn: str = "tsnet2 test tailnet CA") -> TailnetCA:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False),
                    critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        """The CA certificate (PEM)."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, *names: str) -> tuple[bytes, bytes]:
        """(chain PEM: leaf + CA, key PEM) for ``names`` (DNS SANs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(_name(names[0]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.pem
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return chain, key_pem

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server context with a leaf for ``names`` (TLS 1.2+)."""
        chain, key = self.issue(*names)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "c.pem").write_bytes(chain)
            (Path(d) / "k.pem").write_bytes(key)
            ctx.load_cert_chain(Path(d) / "c.pem", Path(d) / "k.pem")
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this CA (check_hostname, CERT_REQUIRED)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=self.pem.decode())
        return ctx


class FakeNodeCerts:
    """``NodeCerts`` for one node name, from a :class:`TailnetCA`."""

    def __init__(self, ca: TailnetCA, *names: str) -> None:
        self.ca = ca
        self._server = ca.server_context(*names) if names else None
        self._client = ca.client_context()
        # What the daemon reads of NodeCerts besides the contexts (a certificate being
        # requested is waited for; these say none is).
        self.changes = 0
        self.unsupported: str | None = None if names else "no certificate in this test"
        self.last_error = ""
        self.tls_dir = None

    async def wait_changed(self, since: int | None = None) -> int:
        raise AssertionError("unreachable: the test's certificates never change")

    def server_context(self) -> ssl.SSLContext:
        from tsnet2.daemon.certs import CertUnavailable
        if self._server is None:
            raise CertUnavailable("daemon: no certificate in this test")
        return self._server

    def client_context(self) -> ssl.SSLContext:
        return self._client

    def ca_pem(self) -> bytes | None:
        return self.ca.pem
