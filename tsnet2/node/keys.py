"""The node's WireGuard private key on disk (``<state_dir>/node.key``, base64, mode 0600)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .errors import KeyFileError
from .wgkey import WireguardKey

__all__ = ["KEY_FILE_NAME", "load_or_create_private_key", "public_key_b64"]

KEY_FILE_NAME = "node.key"
_MAX_KEY_FILE = 4096  # a base64 key is 44 bytes plus a newline; anything larger is garbage


def public_key_b64(key: WireguardKey) -> str:
    """Return the base64 public key that belongs to the private key ``key``."""
    return str(key.public_key())


def _read_key(path: Path) -> WireguardKey:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(
                f"{path} is not a regular file; remove it or point --state-dir elsewhere"
            )
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: a private key must not be "
                f"readable by group or others; run `chmod 600 {path}` if the key is still secret, "
                "or delete it to create a new node key"
            )
        data = os.read(fd, _MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii").strip()
        if len(data) > _MAX_KEY_FILE or len(text) != 44:
            raise ValueError("not a 44-character base64 key")
        key = WireguardKey(text)
        if not key:
            raise ValueError("all-zero key")
    except ValueError as exc:
        raise KeyFileError(
            f"{path} does not hold a base64 WireGuard private key ({exc}); "
            "restore it from a backup or delete it to create a new node key"
        ) from None
    return key


def load_or_create_private_key(state_dir: Path) -> WireguardKey:
    """Load ``state_dir/node.key``, or create it (0600, atomically) with a new key.

    Raises ``KeyFileError`` if an existing file is group/other accessible or holds garbage.
    The file is written to a temporary name opened with O_EXCL and mode 0600, fsynced and
    renamed into place, so a crash never leaves a half-written key behind; if another process
    created the key first, that key is used.
    """
    state_dir = Path(state_dir)
    path = state_dir / KEY_FILE_NAME
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    if not state_dir.is_dir():
        raise KeyFileError(f"state directory {state_dir} does not exist; create it first")
    key = WireguardKey.generate()
    tmp = state_dir / f".{KEY_FILE_NAME}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # umask may only have narrowed it; make it exact
            os.write(fd, f"{key}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if someone else created node.key meanwhile
        except FileExistsError:
            return _read_key(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):
        dfd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return key
