"""Real WireGuard tunnels (wireguard-go) between lab namespaces, configured by ``Node``."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest

from tsnet2.lab import Lab, LabNode
from tsnet2.node import Node, PeerConfig, PeerState

pytestmark = pytest.mark.netns

PORT = 41641


def peer_of(node: Node, lab_node: LabNode, host: int, **kw: object) -> PeerConfig:
    """PeerConfig for ``node`` (running in ``lab_node``) with tailnet host number ``host``."""
    endpoint = kw.pop("endpoint", f"{lab_node.ip}:{PORT}")
    return PeerConfig(
        public_key=node.public_key,
        endpoint=endpoint,  # type: ignore[arg-type]
        allowed_ips=[f"100.64.0.{host}/32", f"fd7a:115c:a1e0::{host}/128"],
        **kw,  # type: ignore[arg-type]
    )


def tcp_echo(lab: Lab, server_ns: str, client_ns: str, addr: str, payload: bytes) -> bytes:
    """Listen on ``addr`` inside ``server_ns``, connect from ``client_ns``, echo ``payload``."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with lab.in_netns(server_ns):
        listener = socket.socket(family, socket.SOCK_STREAM)
    with listener:
        listener.bind((addr, 0))
        listener.listen(1)
        listener.settimeout(15)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(15)
                data = b""
                while len(data) < len(payload):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(data)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        with lab.in_netns(client_ns):
            client = socket.socket(family, socket.SOCK_STREAM)
        with client:
            client.settimeout(15)
            client.connect((addr, port))
            client.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = client.recv(65536)
                if not chunk:
                    break
                got += chunk
        server.join(15)
    return got


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``pred`` until true or fail."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_tcp_echo_over_tunnel(lab: Lab, start_node: Callable[..., Node]) -> None:
    a, b = lab.add_node("a"), lab.add_node("b")
    na, nb = start_node(a, 1), start_node(b, 2)
    assert na.backend == "userspace"
    assert na.apply_peers([peer_of(nb, b, 2)]).added == [nb.public_key]
    assert nb.apply_peers([peer_of(na, a, 1)]).added == [na.public_key]

    payload = bytes(range(256)) * 1024  # 256 KiB, many packets through the tunnel
    assert tcp_echo(lab, b.netns, a.netns, "100.64.0.2", payload) == payload
    assert tcp_echo(lab, a.netns, b.netns, "fd7a:115c:a1e0::1", b"over v6") == b"over v6"

    stats = na.peer_stats()[nb.public_key]
    assert stats.rx_bytes > len(payload) // 2 and stats.tx_bytes > 0
    assert stats.last_handshake is not None and abs(stats.last_handshake - time.time()) < 60
    assert stats.endpoint == f"{b.ip}:{PORT}"
    assert sorted(stats.allowed_ips) == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]
    assert stats.persistent_keepalive == 25
    state = na.state()
    assert state.listen_port == PORT and state.public_key == na.public_key


def test_device_link_mtu_routes_and_addresses(lab: Lab, start_node: Callable[..., Node]) -> None:
    a = lab.add_node("a")
    na = start_node(a, 7)
    link = lab.run(a.netns, ["ip", "-o", "link", "show", a.ifname]).stdout
    assert "mtu 1280" in link and ",UP" in link
    routes4 = lab.run(a.netns, ["ip", "-4", "route"]).stdout
    assert f"100.64.0.0/10 dev {a.ifname}" in routes4
    routes6 = lab.run(a.netns, ["ip", "-6", "route"]).stdout
    assert f"fd7a:115c:a1e0::/48 dev {a.ifname}" in routes6
    addrs = lab.run(a.netns, ["ip", "-o", "addr", "show", "dev", a.ifname]).stdout
    assert "100.64.0.7/32" in addrs and "fd7a:115c:a1e0::7/128" in addrs
    assert "tentative" not in addrs
    # idempotent, and stale addresses go
    na.set_addresses(IPv4Address("100.64.0.8"), None)
    na.set_addresses(IPv4Address("100.64.0.8"), None)
    addrs = lab.run(a.netns, ["ip", "-o", "addr", "show", "dev", a.ifname]).stdout
    assert "100.64.0.8/32" in addrs
    assert "100.64.0.7" not in addrs and "fd7a:115c:a1e0::7" not in addrs
    assert [str(x) for x in na.addresses()] == ["100.64.0.8"]


def _same_session(before: PeerState, after: PeerState) -> bool:
    return (
        after.last_handshake == before.last_handshake
        and after.rx_bytes >= before.rx_bytes
        and after.tx_bytes >= before.tx_bytes
    )


def test_incremental_peers(lab: Lab, start_node: Callable[..., Node]) -> None:
    a, b, c = lab.add_node("a"), lab.add_node("b"), lab.add_node("c")
    na, nb, nc = start_node(a, 1), start_node(b, 2), start_node(c, 3)
    pb, pa = peer_of(nb, b, 2), peer_of(na, a, 1)
    na.apply_peers([pb])
    nb.apply_peers([pa])
    assert tcp_echo(lab, b.netns, a.netns, "100.64.0.2", b"hello b") == b"hello b"
    before = na.peer_stats()[nb.public_key]
    assert before.last_handshake is not None and before.rx_bytes > 0

    # same config again: nothing sent
    assert not na.apply_peers([pb]).changed

    # add c as a listen-only peer on a (no endpoint: c must reach a first)
    pc = peer_of(nc, c, 3, endpoint=None)
    result = na.apply_peers([pb, pc])
    assert (result.added, result.updated, result.removed) == ([nc.public_key], [], [])
    stats = na.peer_stats()
    assert set(stats) == {nb.public_key, nc.public_key}
    assert stats[nc.public_key].endpoint is None
    nc.apply_peers([pa])
    assert _same_session(before, stats[nb.public_key]), (before, stats[nb.public_key])
    assert tcp_echo(lab, a.netns, c.netns, "100.64.0.1", b"from c") == b"from c"
    # a learned c's endpoint from the handshake
    assert na.peer_stats()[nc.public_key].endpoint == f"{c.ip}:{PORT}"

    # change b's allowed IPs and keepalive: only b is updated, its session stays
    before = na.peer_stats()[nb.public_key]
    pb2 = peer_of(nb, b, 2, persistent_keepalive=None)
    pb2.allowed_ips.append("100.64.9.0/24")
    result = na.apply_peers([pb2, pc])
    assert (result.added, result.updated, result.removed) == ([], [nb.public_key], [])
    b_stats = na.peer_stats()[nb.public_key]
    assert sorted(b_stats.allowed_ips) == [
        "100.64.0.2/32",
        "100.64.9.0/24",
        "fd7a:115c:a1e0::2/128",
    ]
    assert b_stats.persistent_keepalive is None
    assert _same_session(before, b_stats)

    # endpoint change applied (b is not listening there, but the device must take it)
    pb3 = peer_of(nb, b, 2, endpoint=f"{b.ip}:{PORT + 1}")
    result = na.apply_peers([pb3, pc])
    assert result.updated == [nb.public_key]
    assert na.peer_stats()[nb.public_key].endpoint == f"{b.ip}:{PORT + 1}"
    assert na.peer_stats()[nb.public_key].last_handshake == before.last_handshake

    # remove c: only c goes
    result = na.apply_peers([pb3])
    assert (result.added, result.updated, result.removed) == ([], [], [nc.public_key])
    assert set(na.peer_stats()) == {nb.public_key}
    assert na.peer_stats()[nb.public_key].last_handshake == before.last_handshake

    # back to the right endpoint: traffic flows again
    na.apply_peers([pb])
    assert tcp_echo(lab, b.netns, a.netns, "100.64.0.2", b"again") == b"again"
    wait_for(lambda: na.peer_stats()[nb.public_key].rx_bytes > before.rx_bytes)
