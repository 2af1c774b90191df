"""tsnet2d's socket file: --socket-mode / --socket-group parsing and `bind_unix_socket`."""

from __future__ import annotations

import grp
import os
import socket
import stat
from pathlib import Path

import pytest

from tsnet2.daemon import cli
from tsnet2.daemon.server import (
    MAX_SOCKET_PATH,
    DaemonFatalError,
    bind_unix_socket,
    socket_dir_mode,
)

# ---- --socket-mode ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "mode"), [
    ("0660", 0o660), ("660", 0o660), ("0o666", 0o666), ("0600", 0o600), ("777", 0o777),
])
def test_socket_mode_accepts_octal(text: str, mode: int) -> None:
    assert cli.parse_socket_mode(text) == mode


@pytest.mark.parametrize(("text", "why"), [
    ("0999", "not an octal mode (e.g. 0660)"),
    ("rw-rw----", "not an octal mode"),
    ("", "not an octal mode"),
    ("0x1b6", "not an octal mode"),
    ("-660", "not an octal mode"),
    ("06600", "not an octal mode"),
    ("4660", "only permission bits (at most 0777) apply to a socket"),
    ("1666", "only permission bits"),
    ("0066", "the owner (the daemon's uid) needs rw"),
    ("0460", "the owner (the daemon's uid) needs rw"),
])
def test_socket_mode_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        cli.parse_socket_mode(text)
    assert str(info.value).startswith(f"--socket-mode {text}: {why}")


# ---- --socket-group --------------------------------------------------------------------


def test_socket_group_numbers_and_names() -> None:
    assert cli.parse_socket_group("0") == 0
    assert cli.parse_socket_group("10001") == 10001  # need not exist in /etc/group
    assert cli.parse_socket_group(str(cli.MAX_GID)) == cli.MAX_GID
    some = grp.getgrgid(0)
    assert cli.parse_socket_group(some.gr_name) == some.gr_gid


@pytest.mark.parametrize(("text", "message"), [
    ("no-such-group-x", "--socket-group no-such-group-x: no such group (give a GID or a group "
                        "name from /etc/group)"),
    ("4294967295", "--socket-group 4294967295: GID out of range (0..4294967294)"),
    ("", "--socket-group: empty; give a GID or a group name"),
    ("-1", "--socket-group -1: no such group (give a GID or a group name from /etc/group)"),
    ("١٢", "--socket-group ١٢: no such group (give a GID or a group name from /etc/group)"),
])
def test_socket_group_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        cli.parse_socket_group(text)
    assert str(info.value) == message


@pytest.mark.parametrize(("flags", "message"), [
    (["--socket-mode", "0999"], "tsnet2d: --socket-mode 0999: not an octal mode (e.g. 0660)\n"),
    (["--socket-group", "nope-nope"], "tsnet2d: --socket-group nope-nope: no such group"),
    (["--tcp-keepalive", "0.5"], "tsnet2d: --tcp-keepalive takes 0 (off) or 1 to 7200 seconds"),
    (["--tcp-keepalive", "-1"], "tsnet2d: --tcp-keepalive takes 0 (off) or 1 to 7200 seconds"),
])
def test_main_exits_2_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       flags: list[str], message: str) -> None:
    argv = ["--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "st"), *flags]
    assert cli.main(argv) == cli.USAGE_EXIT
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_help_describes_the_flags() -> None:
    text = cli.build_parser().format_help()
    assert "--socket-mode MODE" in text and "--socket-group GROUP" in text


# ---- the socket file -------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "dir_mode"), [
    (0o600, 0o700), (0o660, 0o750), (0o666, 0o755), (0o606, 0o705), (0o620, 0o750),
])
def test_socket_dir_mode(mode: int, dir_mode: int) -> None:
    assert socket_dir_mode(mode) == dir_mode


def _entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_bind_makes_dir_and_socket_with_mode_and_group(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "t.sock"
    gid = 4242 if os.geteuid() == 0 else os.getegid()
    with bind_unix_socket(path, 0o660, gid) as lsock:
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
        parent = path.parent.stat()
        assert (stat.S_IMODE(parent.st_mode), parent.st_gid) == (0o750, gid)
        assert _entries(path.parent) == ["t.sock"]  # the private directory is gone
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))  # listening already
            conn, _ = lsock.accept()
            conn.close()


def test_bind_keeps_the_group_it_is_given_and_an_existing_dir(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o711)
    path = tmp_path / "t.sock"
    with bind_unix_socket(path, 0o600, None):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, os.getegid())
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o711


def test_bind_replaces_a_stale_socket_but_not_a_live_one_or_a_file(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    with bind_unix_socket(path, 0o660, None):
        with pytest.raises(DaemonFatalError, match="another tsnet2d is listening on"):
            bind_unix_socket(path, 0o660, None)
        assert _entries(tmp_path) == ["t.sock"]
    path.unlink()
    path.write_text("x")
    with pytest.raises(DaemonFatalError, match="exists and is not a socket"):
        bind_unix_socket(path, 0o660, None)
    assert _entries(tmp_path) == ["t.sock"] and path.read_text() == "x"


def test_bind_rejects_a_path_clients_could_not_connect_to(tmp_path: Path) -> None:
    name = "s" * (MAX_SOCKET_PATH + 1 - len(str(tmp_path)) - 1)
    path = tmp_path / name
    assert len(os.fsencode(path)) == MAX_SOCKET_PATH + 1
    with pytest.raises(DaemonFatalError,
                       match=r"too long for a Unix socket \(108 bytes, at most 107"):
        bind_unix_socket(path, 0o660, None)
    assert _entries(tmp_path) == []
    path = tmp_path / name[1:]  # exactly at the limit works, though the bind name is short
    with bind_unix_socket(path, 0o660, None), socket.socket(socket.AF_UNIX) as c:
        c.connect(str(path))


def test_bind_parent_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(DaemonFatalError, match="is not a directory; pick another --socket path"):
        bind_unix_socket(tmp_path / "f" / "t.sock", 0o660, None)
    with pytest.raises(DaemonFatalError, match=r"cannot use socket directory .*: Not a directory"):
        bind_unix_socket(tmp_path / "f" / "d" / "t.sock", 0o660, None)
    assert _entries(tmp_path) == ["f"]
