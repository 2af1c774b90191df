"""A tsnet2d process without a tailnet (its node never started), for wire and bounds tests."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tsnet2 import proto

from .tailnet import wait_for

DAEMON = [sys.executable, "-m", "tsnet2.daemon"]


class Daemon:
    """A running tsnet2d with its stderr captured to a file."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.dir = tmp
        self.sock = tmp / "run" / "tsnet2.sock"
        self.state = tmp / "state"
        self.log = tmp / "tsnet2d.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [*DAEMON, "--socket", str(self.sock), "--state-dir", str(self.state), *extra],
                stderr=logf, stdout=subprocess.DEVNULL,
            )
        wait_for(lambda: "listening on" in self.text() or self.proc.poll() is not None, 20,
                 "the readiness line")
        assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def connect(self, kind: int | None = None) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(15)
            s.connect(str(self.sock))
            if kind is not None:
                s.sendall(bytes([kind]))
        except BaseException:
            s.close()
            raise
        return s

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(20)


def rpc(sock: socket.socket, frame: bytes) -> list[bytes]:
    sock.sendall(frame)
    return [_readline(sock)]


def _readline(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def closed_by_daemon(s: socket.socket) -> bool:
    """True when the daemon closed the connection (EOF, or a reset if input was unread)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def assert_serving(d: Daemon) -> None:
    """The daemon still answers a fresh control connection."""
    with d.connect(proto.ChannelKind.CONTROL) as s:
        reply = rpc(s, b'{"id":7,"method":"tailscale_ips"}\n')[0]
    assert reply == b'{"id":7,"result":"e30="}\n'
