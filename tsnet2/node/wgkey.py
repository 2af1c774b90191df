"""WireGuard keys: 32-byte Curve25519 keys, base64 in files and netmaps, hex on UAPI.

The daemon needs only this much of a WireGuard library, and the package that used to
provide it (wireguard-tools) cost tsnet2d about 2.5 MB of resident memory at import. The
curve arithmetic is `cryptography`'s X25519, which the traffic log's signing loads anyway.
"""

from __future__ import annotations

import base64
import secrets

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = ["KEY_LENGTH", "WireguardKey"]

KEY_LENGTH = 32
_HEX_LENGTH = 2 * KEY_LENGTH


def _decode(value: str | bytes | WireguardKey) -> bytes:
    if isinstance(value, WireguardKey):
        return value.keydata
    if isinstance(value, bytes):
        raw = value
    elif len(value) == _HEX_LENGTH:
        raw = bytes.fromhex(value)
    else:
        # Standard or URL-safe base64, padding optional (as `wg` and wireguard-tools take).
        try:
            raw = base64.urlsafe_b64decode(value + "==")
        except ValueError as exc:  # binascii.Error
            raise ValueError(f"not a base64 WireGuard key: {exc}") from None
    if len(raw) != KEY_LENGTH:
        raise ValueError(f"a WireGuard key is {KEY_LENGTH} bytes, got {len(raw)}")
    return raw


class WireguardKey:
    """A WireGuard key (private or public); equal keys compare and hash equal.

    ``WireguardKey(text_or_bytes)`` takes 32 raw bytes, 64 hex digits, or base64 (standard
    or URL-safe, padding optional); anything else is a ValueError. ``str(key)`` is standard
    base64, ``key.hex`` hex, ``bool(key)`` False for the all-zero key.
    """

    __slots__ = ("keydata",)

    keydata: bytes

    def __init__(self, value: str | bytes | WireguardKey) -> None:
        object.__setattr__(self, "keydata", _decode(value))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("WireguardKey is immutable")

    @classmethod
    def generate(cls) -> WireguardKey:
        """A new private key, clamped as `wg genkey` writes it."""
        raw = bytearray(secrets.token_bytes(KEY_LENGTH))
        raw[0] &= 248
        raw[31] = (raw[31] & 127) | 64
        return cls(bytes(raw))

    def public_key(self) -> WireguardKey:
        """The public key of this private key."""
        private = X25519PrivateKey.from_private_bytes(self.keydata)
        return WireguardKey(private.public_key().public_bytes_raw())

    @property
    def hex(self) -> str:
        """The key as 64 lowercase hex digits (UAPI)."""
        return self.keydata.hex()

    def __str__(self) -> str:
        return base64.standard_b64encode(self.keydata).decode("ascii")

    def __repr__(self) -> str:
        return f"WireguardKey('{self}')"

    def __bool__(self) -> bool:
        return any(self.keydata)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WireguardKey):
            return NotImplemented
        return self.keydata == other.keydata

    def __hash__(self) -> int:
        return hash(self.keydata)
