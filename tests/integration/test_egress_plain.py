"""The egress proxy and DNS responder of a tsnet2d whose node never started (no netns):
startup errors, refusals while the node is down, the client limit, the socket file."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tsnet2.daemon.egress import MAX_CLIENTS
from tsnet2.proto import dns

from .plain_daemon import DAEMON, Daemon
from .tailnet import wait_for


def _free_ports() -> tuple[int, int]:
    """Two ports free for TCP and UDP right now."""
    with socket.socket() as a, socket.socket() as b, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        u.bind(("127.0.0.1", b.getsockname()[1]))
        return int(a.getsockname()[1]), int(b.getsockname()[1])


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[Daemon, int, int]]:
    """A daemon with the egress proxy and the DNS responder; (daemon, their ports)."""
    port, dns_port = _free_ports()
    d = Daemon(tmp_path, "--egress-listen", f"127.0.0.1:{port}", "--egress-socket",
               str(tmp_path / "run" / "egress.sock"), "--traffic-log",
               str(tmp_path / "traffic.jsonl"), "--dns-listen", f"127.0.0.1:{dns_port}",
               "--dns-upstream", "127.0.0.1:9")
    try:
        yield d, port, dns_port
    finally:
        assert d.stop() == 0, d.text()


def _rejects(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "traffic.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines())
            if r.get("kind") == "reject"]


def _answer(s: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(4096):
            out += chunk
    return out


def test_refused_while_the_node_is_down(proxy: tuple[Daemon, int, int]) -> None:
    d, port, _ = proxy
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"GET http://peer:80/ HTTP/1.1\r\nHost: peer\r\n\r\n")
        out = _answer(s)
    assert out.startswith(b"HTTP/1.1 503 "), out
    assert b"egress proxy: " in out
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(15)
        s.connect(str(d.dir / "run" / "egress.sock"))
        s.sendall(b"\x05\x01\x00\x05\x01\x00\x03\x04peer\x00\x50")
        assert s.recv(2) == b"\x05\x00"
        assert s.recv(10)[:2] == b"\x05\x01"
    recs = wait_for(lambda: len(_rejects(d.dir)) >= 2 and _rejects(d.dir), what="rejects")
    assert [(r["via"], r["reason"], r["remote"]) for r in recs] == [
        ("http-proxy", "dial_failed", "peer:80"), ("socks5", "dial_failed", "peer:80")]


def test_socket_file_mode_and_removal(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "egress.sock"
    d = Daemon(tmp_path, "--egress-socket", str(sock), "--socket-mode", "0600")
    try:
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    finally:
        assert d.stop() == 0, d.text()
    assert not sock.exists()


def test_a_taken_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = subprocess.run([*DAEMON, "--socket", str(tmp_path / "s.sock"), "--state-dir",
                              str(tmp_path / "st"), "--egress-listen", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stderr
    assert f"tsnet2d: cannot listen on --egress-listen 127.0.0.1:{port}: " in out.stderr
    assert "Traceback" not in out.stderr


def test_client_limit(proxy: tuple[Daemon, int, int]) -> None:
    """MAX_CLIENTS connections that send nothing hold every place; the next is told 503 and
    logged; once they leave, requests are served (refused here: the node is down) again."""
    d, port, _ = proxy
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < MAX_CLIENTS + 100:
        pytest.skip(f"needs {MAX_CLIENTS + 100} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, MAX_CLIENTS + 100), hard))
    idle: list[socket.socket] = []
    try:
        for _ in range(MAX_CLIENTS):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=15))
        # The daemon accepts in order: once a connection after them is answered, they are
        # all counted.
        def over_limit() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
                s.sendall(b"GET http://peer/ HTTP/1.1\r\n\r\n")
                return _answer(s)
        out = over_limit()
        assert out.startswith(b"HTTP/1.1 503 "), out
        assert b"clients are being served" in out
        rec = wait_for(lambda: _rejects(d.dir), what="reject")[-1]
        assert rec["via"] == "http-proxy" and "clients are being served" in rec["error"]
        assert rec["reason"] == "over_limit"
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def served_again() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(b"GET http://peer/ HTTP/1.1\r\n\r\n")
            out = _answer(s)
        assert out.startswith(b"HTTP/1.1 503 "), out
        return b"clients are being served" not in out
    wait_for(served_again, what="served again")


def test_dns_while_the_node_is_down(proxy: tuple[Daemon, int, int]) -> None:
    """Names under no known domain go upstream (here a closed port: SERVFAIL); malformed
    queries get FORMERR; TCP works the same."""
    _, _, port = proxy
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(15)
        s.connect(("127.0.0.1", port))
        s.send(dns.build_query("example.com", dns.RType.A, id_=5))
        msg = dns.parse_message(s.recv(4096))
        assert msg.id == 5 and msg.rcode == dns.RCode.SERVFAIL
        s.send(struct.pack(">HHHHHH", 6, 0, 1, 0, 0, 0))
        assert dns.parse_message(s.recv(4096)).rcode == dns.RCode.FORMERR
    with socket.create_connection(("127.0.0.1", port), timeout=15) as t:
        q = dns.build_query("example.com", dns.RType.A, id_=8)
        t.sendall(struct.pack(">H", len(q)) + q)
        size = struct.unpack(">H", t.recv(2))[0]
        data = b""
        while len(data) < size:
            data += t.recv(size - len(data))
        assert dns.parse_message(data).rcode == dns.RCode.SERVFAIL


# Runs as root, drops to (uid, gid), sends a SOCKS5 greeting on the egress socket.
SOCKS_CLIENT = """\
import os, socket, sys
path, uid = sys.argv[1], int(sys.argv[2])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(path)
except PermissionError:
    print("EACCES"); sys.exit(0)
try:
    s.sendall(b"\\x05\\x01\\x00")
    reply = s.recv(2)
except (BrokenPipeError, ConnectionResetError):
    reply = b""
print("REPLY " + reply.hex() if reply else "CLOSED")
"""


def _socks_as(path: Path, uid: int) -> str:
    out = subprocess.run(["/usr/bin/python3", "-I", "-c", SOCKS_CLIENT, str(path), str(uid)],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_egress_socket_checks_the_uid(open_dir: Path) -> None:
    """The egress socket has the main socket's mode and uid check: with 0666 and no
    --allow-uid another uid can connect but is disconnected unserved; --allow-uid lets it
    in."""
    sock = open_dir / "run" / "egress.sock"
    d = Daemon(open_dir, "--egress-socket", str(sock), "--socket-mode", "0666")
    try:
        assert _socks_as(sock, 10001) == "CLOSED"
        wait_for(lambda: "egress: refused a connection from uid 10001" in d.text(),
                 what="the refusal in the daemon's log")
    finally:
        assert d.stop() == 0, d.text()
    d = Daemon(open_dir, "--egress-socket", str(sock), "--allow-uid", "10001",
               "--socket-mode", "0666")
    try:
        assert _socks_as(sock, 10001) == "REPLY 0500"
    finally:
        assert d.stop() == 0, d.text()
