"""The node key file: created 0600 atomically, reused, unsafe or garbage files refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tsnet2.node import KeyFileError, load_or_create_private_key, public_key_b64
from tsnet2.node.wgkey import WireguardKey


def test_created_0600_and_reused(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        key = load_or_create_private_key(tmp_path)
    finally:
        os.umask(old)
    path = tmp_path / "node.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert WireguardKey(path.read_text().strip()) == key
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]  # no temp file left
    again = load_or_create_private_key(tmp_path)
    assert again == key
    assert public_key_b64(key) == str(key.public_key())


def test_distinct_dirs_get_distinct_keys(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert load_or_create_private_key(tmp_path / "a") != load_or_create_private_key(tmp_path / "b")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_group_or_other_permissions_refused(tmp_path: Path, mode: int) -> None:
    key = load_or_create_private_key(tmp_path)
    path = tmp_path / "node.key"
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_private_key(tmp_path)
    assert WireguardKey(path.read_text().strip()) == key  # never overwritten


@pytest.mark.parametrize(
    "content",
    [b"", b"not a key\n", b"A" * 43 + b"\n", b"\xff\xfe" * 22, b"x" * 10000, b"A" * 43 + b"=\n"],
)
def test_garbage_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    with pytest.raises(KeyFileError, match="does not hold a base64 WireGuard private key"):
        load_or_create_private_key(tmp_path)
    assert path.read_bytes() == content


def test_symlink_and_missing_dir_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text(str(WireguardKey.generate()))
    target.chmod(0o600)
    (tmp_path / "node.key").symlink_to(target)
    with pytest.raises(OSError):
        load_or_create_private_key(tmp_path)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_or_create_private_key(tmp_path / "missing")
