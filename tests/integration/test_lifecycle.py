"""Lifecycle at the daemon boundary: apps that die, dials that time out, frozen daemons.

Seed-spec S11 (restarted app listens again), S13 (dial honours its timeout in both phases).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import tsnet2

from .tailnet import TwoNodes, recv_exactly, two_nodes, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def net() -> Iterator[TwoNodes]:
    with two_nodes(("la", "lb")) as n:
        yield n


APP = textwrap.dedent("""
    import sys, time, tsnet2
    srv = tsnet2.Server(socket_path=sys.argv[1], hostname="la")
    srv.up(timeout=30)
    ln = srv.listen("tcp", ":" + sys.argv[2])
    print("listening", flush=True)
    time.sleep(600)
""")


def test_killed_app_releases_its_listener_at_once(net: TwoNodes) -> None:
    """S11: an app SIGKILLed while listening; a new app listens on the same port at once."""
    proc = subprocess.Popen([sys.executable, "-c", APP, str(net.da.socket_path), "9100"],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"listening"
        with pytest.raises(tsnet2.DaemonError, match="already registered"):
            net.a.listen("tcp", ":9100")
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()

    def relisten() -> Any:
        try:
            return net.a.listen("tcp", ":9100")
        except tsnet2.DaemonError:
            return None

    ln = wait_for(relisten, 2.0, "the port to be free again")
    with ln:
        results: list[bytes] = []

        def serve() -> None:
            with ln.accept(timeout=10) as c:
                results.append(c.recv(10))
                c.sendall(b"ok")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with net.b.dial("tcp", "la:9100", timeout=10) as conn:
            conn.sendall(b"again")
            assert recv_exactly(conn, 2) == b"ok"
        t.join(10)
    assert results == [b"again"]


def test_dial_timeout_in_reply_phase(net: TwoNodes) -> None:
    """S13: the peer exists in the netmap but never answers: dial(timeout=1) ends (at its
    timeout; 10 s is a hang check), and the daemon drops the connect it was making."""
    key = net.lnet.authkey(reusable=True)
    dc = net.lnet.add_daemon("lc", auth_key=key)
    with tsnet2.Server(socket_path=str(dc.socket_path), hostname="lc") as c:
        c_ip = c.up(timeout=30).tailscale_ips[0]
    wait_for(lambda: "lc" in str(net.b.local_client().status()["Peer"]), 5, "lc in B's map")
    # Kill lc's daemon hard: it stays in the netmap (not ephemeral), its WireGuard is gone.
    net.lnet.stop_daemon("lc", signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises((tsnet2.DeadlineExceededError, tsnet2.DialError)):
        net.b.dial("tcp", f"{c_ip}:80", timeout=1.0)
    assert time.monotonic() - t0 < 10
    wait_for(lambda: "abandoned" in net.db.log_text(), 5, "the daemon to drop the dial")


def test_dial_timeout_when_daemon_is_frozen(net: TwoNodes) -> None:
    """S13, connect/reply phase against a daemon that does not run at all (SIGSTOP)."""
    assert net.da.proc is not None
    pid = net.da.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises((tsnet2.DeadlineExceededError, tsnet2.DialError)):
            net.a.dial("tcp", "lb:80", timeout=1.0)
        assert time.monotonic() - t0 < 10  # a frozen daemon cannot hang the app
    finally:
        os.kill(pid, signal.SIGCONT)
    # And it serves again once thawed.
    assert net.a.tailscale_ips()[0] is not None


def test_listener_on_a_specific_address(net: TwoNodes) -> None:
    """Host-specific listeners get exactly the flows to that address."""
    v4, v6 = net.a.tailscale_ips()
    assert v4 is not None and v6 is not None
    with net.a.listen("tcp", f"{v4}:9200") as ln:
        assert ln.addr.endswith(":9200")
        got: list[Any] = []

        def serve() -> None:
            with ln.accept(timeout=10) as c:
                got.append(c.tailnet_local)
                c.sendall(b"v4")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with net.b.dial("tcp", f"{v4}:9200", timeout=10) as conn:
            assert recv_exactly(conn, 2) == b"v4"
        t.join(10)
        assert got == [(v4, 9200)]
        # The same port on the IPv6 address has no listener: refused.
        with pytest.raises(tsnet2.DialError):
            net.b.dial("tcp", f"[{v6}]:9200", timeout=10)
