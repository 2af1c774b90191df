"""Who can open tsnet2d's socket: --socket-mode, --socket-group and the uid check, for real.

A real tsnet2d (as root, as in the injected sidecar) and client processes that drop to
another uid and gid before connecting. The file permissions decide who gets EACCES from
connect(); the SO_PEERCRED check then decides whom the daemon serves.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .tailnet import wait_for
from .test_daemon import DAEMON, Daemon, assert_serving

APP_UID = 10001  # an app container's uid: not root, no group in common with the daemon
OTHER_UID = 10002

# Runs as root, drops to (uid, gid, no supplementary groups), then speaks the control channel.
CLIENT = """\
import os, socket, sys
path, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.setgroups([]); os.setgid(gid); os.setuid(uid)
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(path)
except PermissionError:
    print("EACCES"); sys.exit(0)
try:  # a refusing daemon may close before we write or read
    s.sendall(b'\\x01{"id":1,"method":"tailscale_ips"}\\n')
    reply = s.recv(100)
except (BrokenPipeError, ConnectionResetError):
    reply = b""
print("REPLY " + reply.decode().strip() if reply else "CLOSED")
s.close()
"""


def connect_as(path: Path, uid: int, gid: int | None = None) -> str:
    """What a process with this uid and gid gets: ``EACCES``, ``CLOSED`` or ``REPLY ...``."""
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, str(path), str(uid), str(uid if gid is None else gid)],
        capture_output=True, timeout=30, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


SERVED = 'REPLY {"id":1,"result":"e30="}'


def started(directory: Path, *flags: str) -> Daemon:
    return Daemon(directory, "--allow-any-uid", *flags)


def test_app_uid_gets_eacces_from_a_0660_root_socket(open_dir: Path) -> None:
    """The bug: --allow-any-uid admits the app, but a 0660 root:root file does not."""
    d = started(open_dir, "--socket-mode", "0660")
    try:
        st = d.sock.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, os.getegid())
        assert connect_as(d.sock, APP_UID) == "EACCES"
        assert_serving(d)
    finally:
        assert d.stop() == 0, d.text()


def test_socket_group_lets_that_group_in_and_nobody_else(open_dir: Path) -> None:
    d = started(open_dir, "--socket-mode", "0660", "--socket-group", str(APP_UID))
    try:
        st = d.sock.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, APP_UID)
        # The daemon made the directory: owner rwx, the group can reach the socket.
        parent = d.sock.parent.stat()
        assert (stat.S_IMODE(parent.st_mode), parent.st_gid) == (0o750, APP_UID)
        assert connect_as(d.sock, APP_UID) == SERVED
        assert connect_as(d.sock, OTHER_UID, APP_UID) == SERVED  # another uid, same group
        assert connect_as(d.sock, OTHER_UID) == "EACCES"
    finally:
        assert d.stop() == 0, d.text()


def test_socket_mode_0666_lets_every_uid_in(open_dir: Path) -> None:
    d = started(open_dir, "--socket-mode", "0666")
    try:
        assert stat.S_IMODE(d.sock.stat().st_mode) == 0o666
        assert stat.S_IMODE(d.sock.parent.stat().st_mode) == 0o755
        assert connect_as(d.sock, APP_UID) == SERVED
        assert connect_as(d.sock, OTHER_UID) == SERVED
    finally:
        assert d.stop() == 0, d.text()


def test_the_uid_check_still_applies_behind_the_file_mode(open_dir: Path) -> None:
    """A 0666 socket without --allow-any-uid: connect() succeeds, the daemon refuses."""
    d = Daemon(open_dir, "--socket-mode", "0666", "--allow-uid", str(OTHER_UID))
    try:
        refused = connect_as(d.sock, APP_UID)  # told why, then closed
        assert refused.startswith('REPLY {"error":"daemon: uid '), refused  # an id-0 frame
        assert f"uid {APP_UID} may not use this socket" in refused
        wait_for(lambda: f"refused CONTROL connection from uid {APP_UID}" in d.text(), 5,
                 "log line")
        assert connect_as(d.sock, OTHER_UID) == SERVED
    finally:
        assert d.stop() == 0, d.text()


def test_the_path_never_shows_other_permissions(open_dir: Path) -> None:
    """Watch the path while the daemon starts: whenever it exists it is a socket either closed
    to everyone (mode 0000, just bound) or finished, and nothing else is left next to it."""
    sock = open_dir / "run" / "tsnet2.sock"
    seen: set[tuple[int, int, int]] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                st = os.lstat(sock)
            except FileNotFoundError:
                continue
            seen.add((stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_gid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        d = started(open_dir, "--socket-mode", "0660", "--socket-group", str(APP_UID))
    finally:
        done.set()
        watcher.join()
    try:
        assert (stat.S_IFSOCK, 0o660, APP_UID) in seen
        assert {m for kind, m, _gid in seen if kind == stat.S_IFSOCK} <= {0, 0o660}
        assert {kind for kind, _m, _gid in seen} == {stat.S_IFSOCK}
        assert sorted(p.name for p in sock.parent.iterdir()) == ["tsnet2.sock"]
        assert connect_as(sock, APP_UID) == SERVED
    finally:
        assert d.stop() == 0, d.text()
    assert not sock.exists()


def test_existing_directory_that_keeps_others_out_is_warned_about(open_dir: Path) -> None:
    run = open_dir / "run"
    run.mkdir(mode=0o700)
    os.chmod(run, 0o700)
    d = started(open_dir)  # --allow-any-uid alone: 0666
    try:
        assert stat.S_IMODE(d.sock.stat().st_mode) == 0o666
        assert stat.S_IMODE(run.stat().st_mode) == 0o700  # not ours to change
        assert "other users cannot reach the socket" in d.text()
        assert connect_as(d.sock, APP_UID) == "EACCES"
    finally:
        assert d.stop() == 0, d.text()


def test_non_root_daemon_cannot_give_the_socket_a_foreign_group(open_dir: Path) -> None:
    """Fails cleanly (exit 1, a message that says why) and leaves nothing in the directory."""
    run, state = open_dir / "run", open_dir / "state"
    for d in (run, state):
        d.mkdir()
        os.chown(d, OTHER_UID, OTHER_UID)
    # Import first: after the drop the interpreter's own files (under /root) are out of reach.
    code = ("import os, sys\n"
            "from tsnet2.daemon import cli\n"
            "os.setgroups([]); os.setgid(int(sys.argv[1])); os.setuid(int(sys.argv[1]))\n"
            "sys.exit(cli.main(sys.argv[2:]))\n")
    out = subprocess.run(
        [sys.executable, "-c", code, str(OTHER_UID), "--socket", str(run / "tsnet2.sock"),
         "--state-dir", str(state), "--socket-group", str(APP_UID)],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert (f"tsnet2d: cannot give group {APP_UID} {run / 'tsnet2.sock'}: Operation not "
            "permitted (a tsnet2d that is not root can only use its own groups)") in out.stderr
    assert list(run.iterdir()) == []


@pytest.mark.parametrize(("flags", "message"), [
    (["--socket-mode", "0999"], "tsnet2d: --socket-mode 0999: not an octal mode (e.g. 0660)"),
    (["--socket-group", "no-such-group-x"],
     "tsnet2d: --socket-group no-such-group-x: no such group"),
])
def test_bad_flags_exit_2_before_anything_is_made(open_dir: Path, flags: list[str],
                                                  message: str) -> None:
    out = subprocess.run(
        [*DAEMON, "--socket", str(open_dir / "run" / "s.sock"), "--state-dir",
         str(open_dir / "state"), *flags], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert message in out.stderr
    assert list(open_dir.iterdir()) == []
