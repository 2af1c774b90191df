"""node.wgkey.WireguardKey: the encodings WireGuard uses, and X25519 public keys."""

from __future__ import annotations

import base64

import pytest

from tsnet2.node.wgkey import WireguardKey

# RFC 7748 section 6.1: Alice's private key and the public key it gives.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def test_public_key_is_x25519() -> None:
    assert WireguardKey(ALICE_PRIVATE).public_key().keydata == ALICE_PUBLIC


def test_every_encoding_of_a_key_is_the_same_key() -> None:
    key = WireguardKey(ALICE_PRIVATE)
    b64 = base64.standard_b64encode(ALICE_PRIVATE).decode()
    urlsafe = base64.urlsafe_b64encode(ALICE_PRIVATE).decode().rstrip("=")
    for text in (b64, urlsafe, ALICE_PRIVATE.hex(), ALICE_PRIVATE.hex().upper()):
        assert WireguardKey(text) == key
    assert str(key) == b64 and key.hex == ALICE_PRIVATE.hex()
    assert WireguardKey(key) == key and hash(WireguardKey(b64)) == hash(key)
    assert repr(key) == f"WireguardKey('{b64}')"


@pytest.mark.parametrize("bad", ["", "abc", "A" * 42, "!" * 44, bytes(31), bytes(33), "g" * 64])
def test_bad_keys_are_value_errors(bad: str | bytes) -> None:
    with pytest.raises(ValueError):
        WireguardKey(bad)


def test_generated_keys_are_clamped_and_distinct() -> None:
    keys = {WireguardKey.generate() for _ in range(50)}
    assert len(keys) == 50
    for k in keys:
        assert k.keydata[0] & 7 == 0 and k.keydata[31] & 0x80 == 0 and k.keydata[31] & 0x40
        assert k and k.public_key() != k


def test_all_zero_key_is_false_and_keys_are_immutable() -> None:
    zero = WireguardKey(bytes(32))
    assert not zero
    with pytest.raises(AttributeError):
        zero.keydata = b"x" * 32
