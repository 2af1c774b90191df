"""Helpers for tests that run a whole tailnet (control + tsnet2d daemons) in a netns lab."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tsnet2
from tsnet2.lab import Lab, find_leftovers
from tsnet2.lab.tailnet import DaemonProc, LocalTailnet


@contextmanager
def running_tailnet(**kwargs: Any) -> Iterator[LocalTailnet]:
    """A lab with a control server; removed (and checked clean) afterwards."""
    lab = Lab()
    try:
        with LocalTailnet(lab, **kwargs) as net:
            net.start_control()
            yield net
    finally:
        lab.close()
    leftovers = find_leftovers(lab.prefix)
    assert not leftovers, f"lab {lab.prefix} left behind: {leftovers}"


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `pred` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def echo_once(ln: tsnet2.Listener) -> threading.Thread:
    """Serve one echo connection on `ln` in a thread."""
    def serve() -> None:
        with ln.accept(timeout=30) as conn:
            conn.sendall(conn.recv(100))
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def read_log(path: Path, *, checkpoints: bool = False) -> list[dict[str, Any]]:
    """Parse a JSONL traffic log; blank lines skipped, bad JSON fails the test. The hash
    chain's ``checkpoint`` records are left out unless ``checkpoints``."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if checkpoints or rec.get("kind") != "checkpoint":
                out.append(rec)
    return out


def recv_exactly(sock: Any, n: int) -> bytes:
    """Read exactly n bytes from a blocking socket (fails on early EOF)."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


def relay_sockets(timeout: float) -> tuple[socket.socket, socket.socket, socket.socket,
                                           socket.socket]:
    """Real sockets around a daemon's relay: ``(remote, daemon_peer, daemon_app, app)``.

    ``remote`` is a tailnet peer's TCP socket (over loopback), ``daemon_peer`` the daemon's
    end of it; ``daemon_app``/``app`` a Unix socket pair for the app side. The outer two
    block with ``timeout``, the daemon's two are non-blocking, as the daemon has them.
    """
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        remote = socket.create_connection(lsock.getsockname(), timeout=timeout)
        daemon_peer, _ = lsock.accept()
    daemon_app, app = socket.socketpair()
    for s in (remote, app):
        s.settimeout(timeout)
    for s in (daemon_peer, daemon_app):
        s.setblocking(False)
    return remote, daemon_peer, daemon_app, app


@dataclass
class TwoNodes:
    """Two daemons on one lab tailnet (``da``, ``db``) and a library Server on each."""

    lnet: LocalTailnet
    da: DaemonProc
    db: DaemonProc
    a: tsnet2.Server
    b: tsnet2.Server


@contextmanager
def two_nodes(names: tuple[str, str], *, extra_a: tuple[str, ...] = (),
              extra_b: tuple[str, ...] = (), up: bool = True,
              stdout_a: int | None = None) -> Iterator[TwoNodes]:
    """:func:`running_tailnet` with daemons ``names`` (one reusable key) and their Servers,
    brought up unless ``up`` is false; the Servers are closed afterwards. ``stdout_a``: a
    descriptor for the first daemon's stdout."""
    with running_tailnet() as lnet:
        key = lnet.authkey(reusable=True)
        da = lnet.add_daemon(names[0], auth_key=key, extra_args=extra_a, stdout=stdout_a)
        db = lnet.add_daemon(names[1], auth_key=key, extra_args=extra_b)
        n = TwoNodes(lnet, da, db,
                     tsnet2.Server(socket_path=str(da.socket_path), hostname=names[0]),
                     tsnet2.Server(socket_path=str(db.socket_path), hostname=names[1]))
        try:
            if up:
                n.a.up(timeout=30)
                n.b.up(timeout=30)
            yield n
        finally:
            for s in (n.a, n.b):
                if not s.closed:
                    s.close()
