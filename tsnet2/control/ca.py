"""The tailnet CA: create it, load it, check a node's CSR and issue its certificate.

Pure functions over ``cryptography`` (no I/O, no store): the control server keeps the CA's
key and certificate in its store (:meth:`tsnet2.control.store.Store.put_ca_if_absent`) and
calls :func:`issue_from_csr` for ``POST /v1/cert``. See docs/certs.md.

The CA is an EC P-256 key with a self-signed certificate named ``tsnet2 tailnet CA
<domain>``: CA:TRUE with path length 0 (it signs leaves only), key usage keyCertSign and
cRLSign, and a nameConstraints extension that permits DNS names in the tailnet domain only,
so a verifier that trusts it accepts it for nothing outside the tailnet. A leaf has the
names the node asked for (each one of the node's own names), serverAuth and clientAuth, and
``not_before`` one minute in the past (clock skew between nodes).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "BACKDATE",
    "CA_LIFETIME",
    "DEFAULT_CERT_LIFETIME",
    "MAX_CSR_PEM",
    "MAX_NAMES",
    "MIN_CERT_LIFETIME",
    "CSRError",
    "IssuedCert",
    "NameNotAllowed",
    "TailnetCA",
    "ca_name",
    "check_csr_names",
    "issue_from_csr",
    "load_ca",
    "new_ca",
    "parse_csr",
]

CA_LIFETIME = 10 * 365 * 86400.0
"""Seconds the tailnet CA certificate is valid (10 years)."""
DEFAULT_CERT_LIFETIME = 90 * 86400.0
"""Seconds a node certificate is valid unless ``--cert-lifetime`` says otherwise (90 days)."""
MIN_CERT_LIFETIME = 1.0
"""Shortest node certificate lifetime accepted, in seconds (tests use a few seconds)."""
BACKDATE = 60.0
"""Seconds a leaf's ``not_before`` lies in the past, for clocks a little behind."""
MAX_CSR_PEM = 16 * 1024
"""Longest CSR (PEM text) accepted; a CSR with an RSA-4096 key and a few names is ~2 KiB."""
MAX_NAMES = 16
"""Most DNS names one CSR may ask for."""
MIN_RSA_BITS = 2048
"""Smallest RSA key accepted in a CSR."""


class CSRError(ValueError):
    """The CSR cannot be used; the message says what to fix. HTTP 400."""

    status = 400


class NameNotAllowed(CSRError):
    """The CSR asks for a name the node may not have. HTTP 403."""

    status = 403


@dataclass(frozen=True)
class TailnetCA:
    """A loaded tailnet CA: its key (never logged: ``repr`` leaves it out) and certificate."""

    cert: x509.Certificate
    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate (DER), hex."""
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class IssuedCert:
    """A certificate issued for a node: the leaf alone and the chain (leaf + CA), PEM."""

    cert: x509.Certificate
    leaf_pem: bytes
    chain_pem: bytes
    names: tuple[str, ...]

    @property
    def serial_hex(self) -> str:
        """The serial number as lowercase hex."""
        return format(self.cert.serial_number, "x")

    @property
    def not_after(self) -> dt.datetime:
        """End of validity (aware, UTC)."""
        return self.cert.not_valid_after_utc


def ca_name(domain: str) -> str:
    """The CA certificate's common name for tailnet ``domain``."""
    return f"tsnet2 tailnet CA {domain}"


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def new_ca(domain: str, *, now: dt.datetime | None = None,
           lifetime: float = CA_LIFETIME) -> tuple[bytes, bytes]:
    """Create a tailnet CA for ``domain`` (lowercase, no trailing dot).

    Returns ``(key_pem, cert_pem)``: the PKCS#8 key, unencrypted (the caller keeps it
    secret: the store, or a file with mode 0600), and the self-signed certificate.
    """
    start = _now(now) - dt.timedelta(seconds=BACKDATE)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name(domain)),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tsnet2")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(seconds=lifetime))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.NameConstraints(
            permitted_subtrees=[x509.DNSName(domain)], excluded_subtrees=None), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def load_ca(key_pem: bytes | str, cert_pem: bytes | str) -> TailnetCA:
    """Load a CA stored by :func:`new_ca`; raises ValueError if the two do not match."""
    kp = key_pem.encode() if isinstance(key_pem, str) else key_pem
    cp = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    key = serialization.load_pem_private_key(kp, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the stored tailnet CA key is not an EC key")
    cert = x509.load_pem_x509_certificate(cp)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.DER, pub)
            != key.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise ValueError("the stored tailnet CA certificate does not match its key")
    return TailnetCA(cert=cert, cert_pem=cert.public_bytes(serialization.Encoding.PEM), key=key)


def parse_csr(pem: object) -> x509.CertificateSigningRequest:
    """Parse and check a CSR (PEM text): size, signature, key type.

    Accepted keys: EC P-256 or P-384, RSA of at least 2048 bits, Ed25519. Raises
    :class:`CSRError` saying what is wrong.
    """
    if not isinstance(pem, str) or not pem.strip():
        raise CSRError('csr is required: a PEM certificate signing request ("-----BEGIN '
                       'CERTIFICATE REQUEST-----...")')
    if len(pem) > MAX_CSR_PEM:
        raise CSRError(f"csr is {len(pem)} characters; at most {MAX_CSR_PEM} are accepted")
    if "-----BEGIN CERTIFICATE REQUEST-----" not in pem:
        raise CSRError("csr is not a PEM certificate signing request (no '-----BEGIN "
                       "CERTIFICATE REQUEST-----' line)")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise CSRError(f"csr cannot be parsed: {e}") from None
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CSRError(f"csr has an unsupported public key: {e}") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise CSRError(f"csr key is EC {key.curve.name}; use P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CSRError(f"csr key is RSA-{key.key_size}; use at least {MIN_RSA_BITS} bits")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CSRError(f"csr key type {type(key).__name__} is not accepted; use EC P-256/P-384,"
                       " RSA >= 2048 or Ed25519")
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        valid = False
    if not valid:
        raise CSRError("csr signature is not valid: sign the CSR with the key it carries")
    return csr


def csr_names(csr: x509.CertificateSigningRequest) -> tuple[str, ...]:
    """The DNS names of a CSR's subjectAltName (lowercase, no trailing dot, no duplicates).

    Raises :class:`CSRError` when there is none, too many, or SANs of another kind (IP
    addresses, URIs, e-mail...): a tailnet certificate names DNS names only.
    """
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise CSRError("csr has no subjectAltName: put the node's FQDN in a DNS SAN "
                       "(the common name is ignored)") from None
    except ValueError as e:  # a malformed extension
        raise CSRError(f"csr extensions cannot be parsed: {e}") from None
    san = ext.value
    other = [g for g in san if not isinstance(g, x509.DNSName)]
    if other:
        kinds = sorted({type(g).__name__ for g in other})
        raise CSRError(f"csr subjectAltName has {', '.join(kinds)} entries; only DNS names "
                       "(the node's FQDN) may be asked for")
    names = tuple(dict.fromkeys(str(g.value).lower().rstrip(".") for g in san))
    if not names or not all(names):
        raise CSRError("csr subjectAltName has no usable DNS name: ask for the node's FQDN")
    if len(names) > MAX_NAMES:
        raise CSRError(f"csr asks for {len(names)} names; at most {MAX_NAMES}")
    return names


def check_csr_names(names: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise :class:`NameNotAllowed` unless every name is one of ``allowed`` (the node's
    cert domains: its FQDN without the trailing dot)."""
    permitted = {a.lower().rstrip(".") for a in allowed}
    for name in names:
        if name not in permitted:
            raise NameNotAllowed(
                f"this node may not have a certificate for {name!r}; it may ask for "
                f"{', '.join(sorted(permitted)) or 'no name'}")


def issue_from_csr(ca: TailnetCA, csr_pem: object, allowed: Iterable[str], *,
                   lifetime: float = DEFAULT_CERT_LIFETIME,
                   now: dt.datetime | None = None) -> IssuedCert:
    """Check ``csr_pem`` (see :func:`parse_csr`, :func:`csr_names`, :func:`check_csr_names`)
    and sign a leaf for its names, valid ``lifetime`` seconds from now (``not_before``
    :data:`BACKDATE` earlier), never past the CA's own end."""
    csr = parse_csr(csr_pem)
    names = csr_names(csr)
    check_csr_names(names, allowed)
    start = _now(now)
    end = min(start + dt.timedelta(seconds=lifetime), ca.cert.not_valid_after_utc)
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(seconds=BACKDATE))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=isinstance(csr.public_key(), rsa.RSAPublicKey),
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                       critical=False)
        .add_extension(aki, critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    leaf = cert.public_bytes(serialization.Encoding.PEM)
    return IssuedCert(cert=cert, leaf_pem=leaf, chain_pem=leaf + ca.cert_pem, names=names)
