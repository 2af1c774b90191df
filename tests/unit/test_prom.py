"""tsnet2.daemon.prom writes what prometheus_client writes for the same metrics.

prometheus_client (a test dependency only) is the oracle: random operations go to both, and
the text expositions must be byte-identical, without prometheus_client's ``*_created``
series (which tsnet2d never exposed).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import prometheus_client as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tsnet2.daemon import prom

LABEL_VALUES = st.text(alphabet=st.characters(codec="utf-8"), max_size=6)
AMOUNTS = st.floats(min_value=0, max_value=1e12, allow_nan=False)
VALUES = st.floats(allow_nan=False, allow_infinity=True, width=64)


def oracle_text(registry: pc.CollectorRegistry) -> bytes:
    class WithoutCreated:
        def collect(self) -> Iterator[pc.Metric]:
            for fam in registry.collect():
                fam.samples = [s for s in fam.samples if not s.name.endswith("_created")]
                yield fam

    return bytes(pc.generate_latest(WithoutCreated()))


class Pair:
    """The same metrics in both implementations."""

    def __init__(self) -> None:
        self.ours = prom.Registry()
        self.theirs = pc.CollectorRegistry()
        o, t = self.ours, self.theirs
        self.c = (prom.Counter("t_requests_total", "Requests \\ seen\nby kind.", ["kind"],
                               registry=o),
                  pc.Counter("t_requests_total", "Requests \\ seen\nby kind.", ["kind"],
                             registry=t))
        self.c0 = (prom.Counter("t_errors_total", "Errors.", registry=o),
                   pc.Counter("t_errors_total", "Errors.", registry=t))
        self.g = (prom.Gauge("t_level", "A level.", ["a", "b"], registry=o),
                  pc.Gauge("t_level", "A level.", ["a", "b"], registry=t))
        self.g0 = (prom.Gauge("t_up", "Up.", registry=o), pc.Gauge("t_up", "Up.", registry=t))
        buckets = (0.005, 0.1, 1, 30, 3600)
        self.h = (prom.Histogram("t_seconds", "Time.", ["d"], buckets=buckets, registry=o),
                  pc.Histogram("t_seconds", "Time.", ["d"], buckets=buckets, registry=t))
        self.h0 = (prom.Histogram("t_wait", "Wait.", buckets=buckets, registry=o),
                   pc.Histogram("t_wait", "Wait.", buckets=buckets, registry=t))

    def check(self) -> None:
        assert self.ours.render() == oracle_text(self.theirs)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), LABEL_VALUES, LABEL_VALUES, AMOUNTS, VALUES),
                max_size=25))
def test_random_operations_render_the_same(ops: list[tuple[int, str, str, float, float]]) -> None:
    p = Pair()
    p.check()
    for op, a, b, amount, value in ops:
        if op == 0:
            for m in p.c:
                m.labels(a).inc(amount)
        elif op == 1:
            for m0 in p.c0:
                m0.inc(amount)
        elif op == 2:
            for g in p.g:
                g.labels(a, b).set(value)
        elif op == 3:
            for g in p.g:
                g.labels(b, a).inc(value if math.isfinite(value) else 1)
        elif op == 4:
            for g0 in p.g0:
                g0.dec(amount)
        elif op == 5:
            for h in p.h:
                h.labels(a).observe(amount)
        elif op == 6:
            for h0 in p.h0:
                h0.observe(amount)
        else:
            for g0 in p.g0:
                g0.set(value)
    p.check()


def test_collector_families_render_the_same() -> None:
    ours = prom.Registry()
    theirs = pc.CollectorRegistry()

    class Ours:
        def collect(self) -> Iterator[prom.Family]:
            rx = prom.CounterFamily("t_rx_bytes", "Received.", labels=["peer"])
            rx.add_metric(['a"b'], 1.5)
            rx.add_metric(["c"], 1e21)
            n = prom.GaugeFamily("t_peers", "Peers.")
            n.add_metric([], 2)
            yield rx
            yield n

    class Theirs:
        def collect(self) -> Iterator[pc.Metric]:
            rx = CounterMetricFamily("t_rx_bytes", "Received.", labels=["peer"])
            rx.add_metric(['a"b'], 1.5)
            rx.add_metric(["c"], 1e21)
            n = GaugeMetricFamily("t_peers", "Peers.")
            n.add_metric([], 2)
            yield rx
            yield n

    ours.register(Ours(), ["t_rx_bytes_total", "t_peers"])
    theirs.register(Theirs())
    assert ours.render() == oracle_text(theirs)


def test_misuse_is_refused() -> None:
    r = prom.Registry()
    c = prom.Counter("x_total", "X.", ["k"], registry=r)
    with pytest.raises(ValueError, match="1 label values expected, got 2"):
        c.labels("a", "b")
    with pytest.raises(ValueError, match="counters only go up"):
        c.labels("a").inc(-1)
    with pytest.raises(ValueError, match="0 label values expected"):
        prom.Gauge("y", "Y.", registry=r).labels("a")
    with pytest.raises(ValueError, match="already registered: x_total"):
        prom.Counter("x_total", "X again.", registry=r)
    with pytest.raises(ValueError, match="buckets must be distinct"):
        prom.Histogram("h", "H.", buckets=(1, 1), registry=r)


def test_concurrent_increments_are_not_lost() -> None:
    r = prom.Registry()
    c = prom.Counter("n_total", "N.", ["k"], registry=r)
    h = prom.Histogram("d", "D.", buckets=(1,), registry=r)

    def work() -> None:
        for _ in range(2000):
            c.labels("a").inc()
            h.observe(0.5)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = r.render().decode()
    assert 'n_total{k="a"} 16000.0' in text
    assert 'd_bucket{le="1.0"} 16000.0' in text and "d_count 16000.0" in text


def test_tsnet2d_metrics_render_as_prometheus_client_rendered_them() -> None:
    """Every tsnet2d metric, after a fixed set of events, byte for byte as it was rendered
    by prometheus_client (the golden file was written with it, before this module)."""
    import logging
    from pathlib import Path

    from tsnet2.daemon.metrics import Metrics, PeerSample

    calls = {"n": 0}

    def peers() -> list[PeerSample]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the second scrape cannot read the device")
        return [PeerSample("b", 10, 20, 1700000000.5), PeerSample("a", 1, 2, None),
                PeerSample("b", 5, 5, 1700000001.25)]

    m = Metrics(peers=peers)
    m.flow_opened("in")
    m.flow_opened("out")
    m.flow_closed("in", "ok", 0.3)
    m.flow_closed("out", "error", 7200)
    add = m.flow_bytes_counter("out")
    add("app->peer", 12345)
    add("peer->app", 1)
    m.flow_bytes("in", "peer->app", 99)
    m.flow_refused("out", "dial_failed")
    m.flow_refused("in", "weird")
    m.slot_parked(+1)
    m.slot_parked(+1)
    m.slot_parked(-1)
    m.slot_wait(0.02)
    m.slot_wait(100)
    m.slot_dropped("app_closed")
    m.slot_dropped("x")
    m.log_record("data", 100)
    m.log_record("newkind", 5)
    m.log_record("Bad Kind", 1)
    m.log_dropped("queue_full")
    m.log_dropped("zzz")
    m.log_write_error()
    m.set_log_queue(4096, True, 77)
    m.set_node_up(True)
    m.set_control_connected(False)
    m.set_netmap_version(12)
    m.node_start_failed("auth_key")
    m.node_start_failed("nope")
    m.node_lost()
    m.set_sessions(3)
    m.connection_refused("uid")
    m.connection_refused("?")
    m.egress_request("socks5", "ok")
    m.egress_request("http-connect", "not_tailnet")
    m.egress_request("gopher", "weird")
    m.dns_query("udp", "tailnet")
    m.dns_query("tcp", "forwarded")
    m.dns_query("sctp", "?")
    m.tls_cert_renewal("error")
    m.tls_cert_renewal("ok", 1800000000.0)
    logging.getLogger("tsnet2d.metrics").disabled = True
    try:
        out = m.render() + b"---\n" + m.render() + b"---\n" + m.render()
    finally:
        logging.getLogger("tsnet2d.metrics").disabled = False
    golden = Path(__file__).with_name("metrics_exposition.golden.txt").read_bytes()
    assert out.decode() == golden.decode()
