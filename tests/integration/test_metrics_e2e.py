"""Metrics and health of real daemons: after a known exchange the counters say exactly that.

Also seed-spec S12: parked accept slots stay at K per listener however many flows are
accepted, and a listener's close releases them on the daemon's side too.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tsnet2
from tsnet2.lab.tailnet import DaemonProc, LocalTailnet

from .tailnet import TwoNodes, recv_exactly, two_nodes, wait_for

pytestmark = pytest.mark.netns

PORT = 9464


def scrape(net: LocalTailnet, d: DaemonProc, path: str = "/metrics") -> tuple[int, str]:
    """GET a health-port path from inside the daemon's namespace."""
    with net.lab.in_netns(d.node.netns):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            body = e.read().decode()
            e.close()
            return e.code, body


def samples(net: LocalTailnet, d: DaemonProc) -> dict[tuple[str, frozenset[Any]], float]:
    _, text = scrape(net, d)
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def net() -> Iterator[TwoNodes]:
    """Both daemons serve metrics; the Servers are not up yet (the first test checks that)."""
    extra = ("--metrics-addr", f"127.0.0.1:{PORT}")
    with two_nodes(("ma", "mb"), extra_a=extra, extra_b=extra, up=False) as n:
        yield n


def test_health_before_and_after_up(net: TwoNodes) -> None:
    lnet, da = net.lnet, net.da
    # Liveness: a daemon waiting for its first app is healthy (nothing should run yet);
    # readiness: not ready until the node is up and serving.
    assert scrape(lnet, da, "/healthz") == (200, "ok\n")
    code, body = scrape(lnet, da, "/readyz")
    assert code == 503 and "node is no_state" in body
    net.a.up(timeout=30)
    net.b.up(timeout=30)
    assert scrape(lnet, da, "/healthz") == (200, "ok\n")
    assert scrape(lnet, da, "/readyz") == (200, "ok\n")
    m = samples(lnet, da)
    assert value(m, "tsnet2_node_up") == 1
    assert value(m, "tsnet2_control_connected") == 1
    assert value(m, "tsnet2_netmap_version") >= 1


def test_counters_match_a_known_exchange(net: TwoNodes) -> None:
    lnet, da, db, a, b = net.lnet, net.da, net.db, net.a, net.b
    flows, size = 3, 5000
    a.up(timeout=30)
    b.up(timeout=30)
    before_a, before_b = samples(lnet, da), samples(lnet, db)
    ln = a.listen("tcp", ":9500")
    wait_for(lambda: value(samples(lnet, da), "tsnet2_accept_slots_parked") == 2, 5,
             "two parked slots")

    def serve() -> None:
        for _ in range(flows):
            with ln.accept(timeout=10) as c:
                c.sendall(recv_exactly(c, size))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    for i in range(flows):
        with b.dial("tcp", "ma:9500", timeout=10) as conn:
            conn.sendall(bytes([i]) * size)
            assert recv_exactly(conn, size) == bytes([i]) * size
    t.join(10)
    with pytest.raises(tsnet2.DialError):
        b.dial("tcp", "nobody:1", timeout=10)

    def closed(d: DaemonProc, direction: str) -> bool:
        m = samples(lnet, d)
        return value(m, "tsnet2_flows_closed_total", direction=direction,
                     result="ok") == flows
    wait_for(lambda: closed(db, "out") and closed(da, "in"), 5, "flows closed")
    ma, mb = samples(lnet, da), samples(lnet, db)

    def delta(m: dict[Any, float], before: dict[Any, float], name: str, **kw: str) -> float:
        return value(m, name, **kw) - value(before, name, **kw)

    assert delta(mb, before_b, "tsnet2_flows_opened_total", direction="out") == flows
    assert delta(ma, before_a, "tsnet2_flows_opened_total", direction="in") == flows
    assert delta(mb, before_b, "tsnet2_flow_duration_seconds_count", direction="out") \
        == flows
    for stream in ("app->peer", "peer->app"):
        assert delta(mb, before_b, "tsnet2_flow_bytes_total", direction="out",
                     stream=stream) == flows * size
        assert delta(ma, before_a, "tsnet2_flow_bytes_total", direction="in",
                     stream=stream) == flows * size
    assert delta(mb, before_b, "tsnet2_flows_refused_total", direction="out",
                 reason="no_such_peer") == 1
    assert value(mb, "tsnet2_flows_active", direction="out") == 0
    assert delta(ma, before_a, "tsnet2_accept_slot_wait_seconds_count") == flows
    assert value(ma, "tsnet2_traffic_log_records_total", kind="open") >= flows
    assert value(ma, "tsnet2_peer_receive_bytes_total", peer="mb") > flows * size
    assert value(ma, "tsnet2_peer_last_handshake_timestamp_seconds", peer="mb") > 0
    # S12: three accepts later the listener still has exactly K=2 parked slots ...
    assert value(ma, "tsnet2_accept_slots_parked") == 2
    # ... and closing it releases them on the daemon's side too.
    ln.close()
    wait_for(lambda: value(samples(lnet, da), "tsnet2_accept_slots_parked") == 0, 5,
             "slots released")
