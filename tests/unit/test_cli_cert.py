"""`tsnet2 cert`'s certificate description: the same with cryptography (the sidecar extra)
and with the standard library alone (the base install, where the CLI also runs)."""

from __future__ import annotations

import builtins
import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tsnet2 import cli
from tsnet2.control import ca

FQDN = "web.tail.example"


@pytest.fixture(scope="module")
def chain() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, FQDN)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(FQDN)]), critical=False)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    authority = ca.load_ca(*ca.new_ca("tail.example"))
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return ca.issue_from_csr(authority, csr, [FQDN], lifetime=86400, now=now).chain_pem


def test_description(chain: bytes) -> None:
    info = cli.describe_cert(chain, now=dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC).timestamp())
    leaf = x509.load_pem_x509_certificate(chain)
    assert info["names"] == [FQDN]
    assert info["subject"] == f"CN={FQDN}"
    assert info["issuer"] == "O=tsnet2,CN=tsnet2 tailnet CA tail.example"
    assert info["serial"] == format(leaf.serial_number, "x")
    assert info["not_before"] == "2025-12-31T23:59:00Z"
    assert info["not_after"] == "2026-01-02T00:00:00Z"
    assert info["seconds_left"] == 12 * 3600
    fingerprint = leaf.fingerprint(hashes.SHA256()).hex().upper()
    assert info["sha256_fingerprint"].replace(":", "") == fingerprint


def test_the_standard_library_fallback_says_the_same(
        chain: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    with_crypto = cli.describe_cert(chain, now=0)
    real_import = builtins.__import__

    def no_cryptography(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "cryptography" or name.startswith("cryptography."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cryptography)
    assert cli.describe_cert(chain, now=0) == with_crypto


def test_not_a_certificate() -> None:
    with pytest.raises(cli.CommandError, match="no PEM certificate"):
        cli.describe_cert(b"hello")


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "expired"), (-5, "expired"), (42, "42s"), (125, "2m 5s"), (3 * 3600 + 60, "3h 1m"),
    (90 * 86400 - 1, "89d 23h")])
def test_duration(seconds: float, text: str) -> None:
    assert cli._duration(seconds) == text
