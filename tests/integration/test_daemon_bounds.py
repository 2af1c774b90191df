"""Bounded everything (issue 9): what one client can make tsnet2d hold, and typed refusals.

Each flood below is bounded in count and time, talks only to the daemon's Unix socket, and
checks the daemon keeps serving another client meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tsnet2 import proto
from tsnet2.daemon.server import MAX_INFLIGHT, MAX_SESSIONS

from .plain_daemon import Daemon, _readline, assert_serving, rpc


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_pipelined_requests_without_reading_replies_stay_bounded(daemon: Daemon) -> None:
    """200,000 small requests on one connection whose replies are never read: the daemon
    stops reading once MAX_INFLIGHT are in progress and their replies fill the socket, so
    its memory stays flat, and it answers another client at once meanwhile."""
    before = rss_kib(daemon.proc.pid)
    flood = daemon.connect(proto.ChannelKind.CONTROL)
    flood.settimeout(None)
    frames = b"".join(b'{"id":%d,"method":"tailscale_ips"}\n' % i for i in range(1, 200_001))
    sent = threading.Event()

    def send() -> None:
        with contextlib.suppress(OSError):
            flood.sendall(frames)  # blocks once the daemon stops reading
        sent.set()
    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        # The daemon is stuck on nothing: a fresh client is answered while the flood waits.
        for _ in range(20):
            t0 = time.monotonic()
            assert_serving(daemon)
            assert time.monotonic() - t0 < 5
        assert not sent.is_set(), "all 7 MB went in: the daemon did not stop reading"
        grown = rss_kib(daemon.proc.pid) - before
        assert grown < 30 * 1024, f"RSS grew by {grown} KiB"
    finally:
        flood.close()
        t.join(30)
    assert_serving(daemon)
    assert MAX_INFLIGHT <= 64


def test_control_sessions_are_capped_with_a_reason(daemon: Daemon) -> None:
    conns: list[socket.socket] = []
    try:
        for i in range(MAX_SESSIONS):
            s = daemon.connect(proto.ChannelKind.CONTROL)
            conns.append(s)
            rpc(s, b'{"id":%d,"method":"tailscale_ips"}\n' % (i + 1))  # now a session
        before = fd_count(daemon.proc.pid)
        with daemon.connect(proto.ChannelKind.CONTROL) as extra:
            frame = json.loads(_readline(extra))
            assert frame["code"] == "limit" and f"{MAX_SESSIONS} clients" in frame["error"]
            assert extra.recv(10) == b""
        assert fd_count(daemon.proc.pid) <= before + 1
    finally:
        for s in conns:
            s.close()
    assert_serving(daemon)


def test_connections_that_never_name_a_channel_are_capped(daemon: Daemon) -> None:
    idle = []
    try:
        for _ in range(400):  # more than MAX_HANDSHAKES; each would wait KIND_TIMEOUT
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon.sock))
            idle.append(s)
        assert_serving_soon(daemon)
        assert fd_count(daemon.proc.pid) < 400
    finally:
        for s in idle:
            s.close()
    assert_serving(daemon)


def assert_serving_soon(d: Daemon) -> None:
    """A fresh client gets an answer once the idle connections above time out or are refused."""
    deadline = time.monotonic() + 30
    while True:
        try:
            assert_serving(d)
            return
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_refused_uid_gets_a_permission_error_with_the_fix(open_daemon: Daemon) -> None:
    os.chmod(open_daemon.sock.parent, 0o755)
    os.chmod(open_daemon.sock, 0o666)
    code = (
        "import os, sys, tsnet2\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "srv = tsnet2.Server(socket_path=sys.argv[1], reconnect_timeout=0)\n"
        "for call in (srv.start, lambda: srv.dial('tcp', 'x:1', timeout=5),\n"
        "             lambda: tsnet2.LocalClient(sys.argv[1]).status()):\n"
        "    try:\n"
        "        call()\n"
        "    except tsnet2.Error as exc:\n"
        "        print(type(exc).__name__, isinstance(exc, PermissionError), exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(open_daemon.sock)],
                         capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout + out.stderr
    # Control and dial: typed, a PermissionError, naming the uid and the fix.
    for line in lines[:2]:
        assert line.startswith("PermissionDeniedError True "), line
        assert "uid 65534 may not use this socket" in line and "--allow-uid 65534" in line
    # LocalAPI: HTTP 403 with the same reason.
    assert "403" in lines[2] and "uid 65534" in lines[2], lines[2]
