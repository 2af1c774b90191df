"""TCP keepalive on tailnet sockets: a flow whose peer vanished without a FIN or RST (its
host cut off the network, its WireGuard gone) ends, with its ``close`` record, instead of
staying open for ever. Real daemons in the netns lab; ``--tcp-keepalive 2`` bounds it to
about 5 s (the default 30 s: about 60 s)."""

from __future__ import annotations

import contextlib
import socket
import subprocess

import pytest

from tsnet2.daemon.io import keepalive

from .tailnet import read_log, two_nodes, wait_for

pytestmark = pytest.mark.netns


def test_a_vanished_peer_ends_both_kinds_of_flow() -> None:
    with two_nodes(("ka", "kb"), extra_b=("--tcp-keepalive", "2")) as net, \
            contextlib.ExitStack() as stack:
        ln_a = stack.enter_context(net.a.listen("tcp", ":7001"))
        ln_b = stack.enter_context(net.b.listen("tcp", ":7000"))
        # kb -> ka: an outbound flow of kb (its dialled socket) ...
        out_b = stack.enter_context(net.b.dial("tcp", "ka:7001", timeout=10))
        peer_of_out = stack.enter_context(ln_a.accept(timeout=10))
        # ... and ka -> kb: an inbound flow of kb (a socket its listener accepted).
        out_a = stack.enter_context(net.a.dial("tcp", "kb:7000", timeout=10))
        in_b = stack.enter_context(ln_b.accept(timeout=10))
        for x, y in ((out_b, peer_of_out), (out_a, in_b)):
            x.sendall(b"hi")
            assert y.recv(2) == b"hi"

        def flows() -> dict[str, dict[str, str]]:
            out: dict[str, dict[str, str]] = {}
            for r in read_log(net.db.traffic_log):
                if r["kind"] == "open":
                    out[r["conn_id"]] = {"dir": r["dir"]}
                elif r["kind"] == "close" and r["conn_id"] in out:
                    out[r["conn_id"]]["error"] = r.get("error", "")
            return out

        assert sorted(f["dir"] for f in flows().values()) == ["in", "out"]
        # ka's host drops off the network: nothing of it (no FIN, no RST) reaches kb again.
        subprocess.run(["ip", "-n", net.da.node.netns, "link", "set", "eth0", "down"],
                       check=True)
        got = wait_for(lambda: (lambda f: f if all("error" in v for v in f.values()) else None)(
            flows()), 60, "kb to close both flows")
        assert all(v["error"] == "peer: ETIMEDOUT: Connection timed out"
                   for v in got.values()), got
        # kb's apps see their flows end too (the daemon resets them).
        for sock in (out_b, in_b):
            sock.settimeout(30)
            with contextlib.suppress(ConnectionError):
                assert sock.recv(10) == b""


def test_keepalive_options_from_one_number() -> None:
    with socket.socket() as s:
        assert keepalive(s, 0) == 0.0  # --tcp-keepalive 0: off
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert keepalive(s, 30) == 60.0
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000
        assert keepalive(s, 2) == 5.0
