"""Generation, hashing and validation of auth keys, node credentials and WireGuard keys.

Secrets are stored only as SHA-256 hex digests: they are 192+ random bits, so a fast hash
is enough (no dictionary attack can guess them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets as _secrets

AUTH_KEY_PREFIX = "tskey-auth-"
"""Every auth key starts with this."""
NODE_CREDENTIAL_PREFIX = "tsnet2-node-"
"""Every node credential starts with this."""
MAX_SECRET_LEN = 256
"""Longer presented secrets are rejected without hashing."""


def new_auth_key() -> str:
    """A fresh auth key: ``tskey-auth-`` + 48 hex digits."""
    return AUTH_KEY_PREFIX + _secrets.token_hex(24)


def new_node_credential() -> str:
    """A fresh node credential: ``tsnet2-node-`` + 64 hex digits."""
    return NODE_CREDENTIAL_PREFIX + _secrets.token_hex(32)


def new_stable_id() -> str:
    """A random stable node id, ``n`` + 16 hex digits."""
    return "n" + _secrets.token_hex(8)


def hash_secret(secret: str) -> str:
    """SHA-256 hex digest of a secret (what the store keeps)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def validate_public_key(value: str) -> str:
    """Return ``value`` if it is a canonical standard-base64 32-byte key, else raise ValueError."""
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError("public_key must be a base64 WireGuard key (32 bytes)") from None
    if len(raw) != 32:
        raise ValueError(f"public_key must decode to 32 bytes, got {len(raw)}")
    if base64.b64encode(raw).decode("ascii") != value:
        # Same 32 bytes, other spelling (non-zero padding bits): one key, one string.
        raise ValueError("public_key is not in canonical base64 (as wg genkey prints it)")
    return value
