"""The traffic log's Ed25519 signing key (``<state-dir>/traffic-log.key``) and its chain state
(``<state-dir>/traffic-chain.json``): the small files that let a restarted daemon continue
the hash chain of :mod:`tsnet2.traffic.chain`.

The key file holds the 32-byte private seed in base64 and a newline, mode 0600; it is
created atomically (temporary file, fsync, link) like the node key. The public key is what
``tsnet2 log verify --key`` pins and what the node registers with its control server.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tsnet2.traffic.chain import ZERO_HASH, encode_key

__all__ = [
    "CHAIN_STATE_FILE",
    "SIGNING_KEY_FILE",
    "ChainState",
    "SigningKey",
    "SigningKeyError",
    "load_chain_state",
    "load_or_create_signing_key",
    "save_chain_state",
    "verify_signature",
]

SIGNING_KEY_FILE = "traffic-log.key"
CHAIN_STATE_FILE = "traffic-chain.json"
_MAX_FILE = 4096


class SigningKeyError(Exception):
    """The signing key or chain state file cannot be used; the message says what to do."""


class SigningKey:
    """An Ed25519 private key that signs checkpoints; :attr:`public` is its base64 public key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        """Wrap ``private``."""
        self._key = private
        raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public = encode_key(raw)
        """Base64 of the 32-byte public key."""

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key (tests, or a log without a state directory)."""
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._key.sign(message)


def verify_signature(public: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public``'s (raw 32 bytes) Ed25519 signature of ``message``."""
    from cryptography.exceptions import InvalidSignature

    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _read_small(path: Path, what: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SigningKeyError(f"{path} is not a regular file; remove it ({what})")
        if st.st_mode & 0o077:
            raise SigningKeyError(
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: the {what} must not be "
                f"readable by group or others; run `chmod 600 {path}`, or delete it to start "
                "a new one")
        return os.read(fd, _MAX_FILE + 1)
    finally:
        os.close(fd)


def _write_atomic(directory: Path, name: str, data: bytes, *, exclusive: bool) -> bool:
    """Write ``directory/name`` via a fsynced 0600 temporary file. With ``exclusive`` an
    existing file wins (returns False); otherwise it is replaced."""
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, directory / name)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, directory / name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return True


def load_or_create_signing_key(state_dir: Path) -> SigningKey:
    """Load ``state_dir/traffic-log.key``, or create it (0600, atomically) with a new key.

    Raises :class:`SigningKeyError` for a group/other-readable file or garbage in it.
    """
    path = Path(state_dir) / SIGNING_KEY_FILE
    for _ in range(2):
        try:
            data = _read_small(path, "traffic-log signing key")
        except FileNotFoundError:
            seed = Ed25519PrivateKey.generate().private_bytes_raw()
            _write_atomic(Path(state_dir), SIGNING_KEY_FILE,
                          base64.b64encode(seed) + b"\n", exclusive=True)
            continue
        try:
            seed = base64.b64decode(data.strip(), validate=True)
            if len(data) > _MAX_FILE or len(seed) != 32:
                raise ValueError("not 32 bytes")
        except (binascii.Error, ValueError) as exc:
            raise SigningKeyError(
                f"{path} does not hold a base64 Ed25519 key ({exc}); restore it from a backup, "
                "or delete it to start a new key (checkpoints before that then verify only "
                "with the old public key)") from None
        return SigningKey(Ed25519PrivateKey.from_private_bytes(seed))
    raise SigningKeyError(f"{path} vanished while being created; start again")


@dataclass
class ChainState:
    """Where the chain stands, as persisted in ``traffic-chain.json``.

    ``seq``/``hash``: the last record the state vouches for (the ``close`` checkpoint after a
    clean shutdown, else the last checkpoint); ``clean``: the previous run shut down
    cleanly and ``seq`` is its very last record; ``reserved``: no run has used a
    ``log_seq`` at or above it (a run raises it before it gets there).
    """

    key: str = ""
    seq: int = 0
    hash: str = ZERO_HASH.hex()
    clean: bool = True
    reserved: int = 1

    def as_json(self) -> dict[str, Any]:
        """The state as a JSON object."""
        return dict(self.__dict__)


def load_chain_state(state_dir: Path) -> ChainState | None:
    """The persisted chain state, or None when there is none (a new log).

    Raises :class:`SigningKeyError` when the file is there but unreadable or garbage.
    """
    path = Path(state_dir) / CHAIN_STATE_FILE
    try:
        data = _read_small(path, "traffic-log chain state")
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
        st = ChainState(key=str(doc["key"]), seq=int(doc["seq"]), hash=str(doc["hash"]),
                        clean=bool(doc["clean"]), reserved=int(doc["reserved"]))
        bytes.fromhex(st.hash)
        if len(st.hash) != 64 or st.seq < 0 or st.reserved <= st.seq:
            raise ValueError("inconsistent values")
    except (ValueError, KeyError, TypeError) as exc:
        raise SigningKeyError(
            f"{path} is not a tsnet2 chain state ({exc}); delete it to start a new chain "
            "segment (tsnet2 log verify then reports the break)") from None
    return st


def save_chain_state(state_dir: Path, state: ChainState) -> None:
    """Persist ``state`` atomically (fsynced). Raises :class:`OSError`."""
    _write_atomic(Path(state_dir), CHAIN_STATE_FILE,
                  json.dumps(state.as_json(), sort_keys=True).encode() + b"\n", exclusive=False)
