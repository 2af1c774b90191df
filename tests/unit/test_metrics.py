"""tsnet2d metrics: every Metrics method, read back from the text exposition with exact values."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tsnet2 import __version__
from tsnet2.daemon.metrics import (
    LOG_DROP_REASONS,
    MAX_RECORD_KINDS,
    REFUSE_REASONS,
    SLOT_DROP_REASONS,
    Metrics,
    PeerSample,
    peer_samples,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
Key = tuple[str, frozenset[tuple[str, str]]]


def scrape(m: Metrics) -> dict[Key, float]:
    """Parse `m.render()`; map (sample name, labels) -> value, refusing duplicate series."""
    out: dict[Key, float] = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def val(samples: dict[Key, float], name: str, **labels: str) -> float:
    """The value of one series; KeyError (with the name) if it is absent."""
    return samples[(name, frozenset(labels.items()))]


def series(samples: dict[Key, float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    """All series of one sample name."""
    return {lab: v for (n, lab), v in samples.items() if n == name}


def families(m: Metrics) -> dict[str, str]:
    """Family name -> type, as a scraper sees them (counters keep their _total)."""
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = fam.type
    return out


# ---- a fresh registry --------------------------------------------------------------------


def test_fresh_metrics_have_every_bounded_series_at_zero() -> None:
    s = scrape(Metrics())
    assert val(s, "tsnet2_build_info", version=__version__) == 1
    for d in ("in", "out"):
        assert val(s, "tsnet2_flows_opened_total", direction=d) == 0
        assert val(s, "tsnet2_flows_active", direction=d) == 0
        assert val(s, "tsnet2_flow_duration_seconds_count", direction=d) == 0
        for r in ("ok", "error", "cut"):
            assert val(s, "tsnet2_flows_closed_total", direction=d, result=r) == 0
        for st in ("app->peer", "peer->app"):
            assert val(s, "tsnet2_flow_bytes_total", direction=d, stream=st) == 0
        refused = series(s, "tsnet2_flows_refused_total")
        assert {dict(k)["reason"] for k in refused if dict(k)["direction"] == d} == set(
            REFUSE_REASONS[d])
    assert {dict(k)["reason"] for k in series(s, "tsnet2_accept_slots_dropped_total")} == set(
        SLOT_DROP_REASONS)
    assert {dict(k)["reason"] for k in series(
        s, "tsnet2_traffic_log_dropped_records_total")} == set(LOG_DROP_REASONS)
    assert {dict(k)["kind"] for k in series(s, "tsnet2_traffic_log_records_total")} == {
        "open", "data", "close"}
    for name in ("tsnet2_accept_slots_parked", "tsnet2_accept_slot_wait_seconds_count",
                 "tsnet2_traffic_log_write_errors_total", "tsnet2_node_up",
                 "tsnet2_control_connected", "tsnet2_netmap_version", "tsnet2_peers",
                 "tsnet2_peer_stats_errors_total"):
        assert val(s, name) == 0, name
    assert series(s, "tsnet2_peer_receive_bytes_total") == {}
    assert not any(n.endswith("_created") for n, _ in s), "no *_created series"


def test_every_label_is_bounded() -> None:
    m = Metrics(peers=lambda: [PeerSample("web", 1, 2, 3.0)])
    m.flow_opened("out")
    m.log_record("open", 10)
    allowed = {"direction", "result", "reason", "stream", "kind", "peer", "le", "version",
               "proto", "transport"}
    for _name, labels in scrape(m):
        assert {k for k, _ in labels} <= allowed


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.flow_opened("in")
    a.set_netmap_version(7)
    assert val(scrape(a), "tsnet2_flows_opened_total", direction="in") == 1
    sb = scrape(b)
    assert val(sb, "tsnet2_flows_opened_total", direction="in") == 0
    assert val(sb, "tsnet2_netmap_version") == 0


# ---- flows -------------------------------------------------------------------------------


def test_flow_lifecycle_counts_bytes_active_and_duration() -> None:
    m = Metrics()
    m.flow_opened("in")
    m.flow_opened("in")
    m.flow_opened("out")
    m.flow_bytes("in", "peer->app", 100)
    m.flow_bytes("in", "peer->app", 23)
    m.flow_bytes("in", "app->peer", 7)
    m.flow_bytes("out", "app->peer", 0)
    m.flow_bytes("out", "app->peer", 1 << 40)
    s = scrape(m)
    assert val(s, "tsnet2_flows_opened_total", direction="in") == 2
    assert val(s, "tsnet2_flows_opened_total", direction="out") == 1
    assert val(s, "tsnet2_flows_active", direction="in") == 2
    assert val(s, "tsnet2_flows_active", direction="out") == 1
    assert val(s, "tsnet2_flow_bytes_total", direction="in", stream="peer->app") == 123
    assert val(s, "tsnet2_flow_bytes_total", direction="in", stream="app->peer") == 7
    assert val(s, "tsnet2_flow_bytes_total", direction="out", stream="app->peer") == 1 << 40
    assert val(s, "tsnet2_flow_bytes_total", direction="out", stream="peer->app") == 0

    m.flow_closed("in", "ok", 0.2)
    m.flow_closed("in", "error", 45.0)
    m.flow_closed("out", "cut", -1.0)  # a clock oddity is clamped to 0
    s = scrape(m)
    assert val(s, "tsnet2_flows_closed_total", direction="in", result="ok") == 1
    assert val(s, "tsnet2_flows_closed_total", direction="in", result="error") == 1
    assert val(s, "tsnet2_flows_closed_total", direction="in", result="cut") == 0
    assert val(s, "tsnet2_flows_closed_total", direction="out", result="cut") == 1
    assert val(s, "tsnet2_flows_active", direction="in") == 0
    assert val(s, "tsnet2_flows_active", direction="out") == 0
    h = "tsnet2_flow_duration_seconds"
    assert val(s, h + "_count", direction="in") == 2
    assert val(s, h + "_sum", direction="in") == pytest.approx(45.2)
    assert val(s, h + "_bucket", direction="in", le="0.1") == 0
    assert val(s, h + "_bucket", direction="in", le="0.5") == 1
    assert val(s, h + "_bucket", direction="in", le="30.0") == 1
    assert val(s, h + "_bucket", direction="in", le="60.0") == 2
    assert val(s, h + "_bucket", direction="in", le="+Inf") == 2
    assert val(s, h + "_count", direction="out") == 1
    assert val(s, h + "_sum", direction="out") == 0
    assert val(s, h + "_bucket", direction="out", le="0.005") == 1


def test_flow_refused_by_reason_with_unknown_reasons_as_other() -> None:
    m = Metrics()
    m.flow_refused("out", "dial_failed")
    m.flow_refused("out", "dial_failed")
    m.flow_refused("out", "no_such_peer")
    m.flow_refused("in", "no_slot")
    m.flow_refused("in", "dial_timeout")  # not an inbound reason
    m.flow_refused("out", "conn 1a2b3c to 100.64.0.2:51234")  # never a label value
    s = scrape(m)
    r = "tsnet2_flows_refused_total"
    assert val(s, r, direction="out", reason="dial_failed") == 2
    assert val(s, r, direction="out", reason="no_such_peer") == 1
    assert val(s, r, direction="out", reason="other") == 1
    assert val(s, r, direction="in", reason="no_slot") == 1
    assert val(s, r, direction="in", reason="other") == 1
    assert sum(series(s, r).values()) == 6
    assert len(series(s, r)) == len(REFUSE_REASONS["in"]) + len(REFUSE_REASONS["out"])
    # Refused flows never opened: nothing active.
    assert val(s, "tsnet2_flows_active", direction="out") == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.flow_opened("inbound"),
        lambda m: m.flow_closed("up", "ok", 1.0),
        lambda m: m.flow_closed("in", "timeout", 1.0),
        lambda m: m.flow_bytes("in", "in", 1),
        lambda m: m.flow_bytes("sideways", "app->peer", 1),
        lambda m: m.flow_bytes("in", "app->peer", -1),
        lambda m: m.flow_refused("both", "no_slot"),
    ],
)
def test_bad_direction_stream_or_result_raises_and_counts_nothing(call: object) -> None:
    m = Metrics()
    before = scrape(m)
    with pytest.raises(ValueError, match="must be"):
        call(m)  # type: ignore[operator]
    assert scrape(m) == before


# ---- accept slots ------------------------------------------------------------------------


def test_accept_slots_parked_waits_and_drops() -> None:
    m = Metrics()
    m.slot_parked(1)
    m.slot_parked()
    m.slot_parked(+3)
    m.slot_parked(-2)
    m.slot_wait(0.0)
    m.slot_wait(0.3)
    m.slot_wait(10.0)
    m.slot_wait(-0.5)
    m.slot_dropped("app_closed")
    m.slot_dropped("app_closed")
    m.slot_dropped("over_limit")
    m.slot_dropped("listener 9f8e7d")  # unbounded text is never a label value
    s = scrape(m)
    assert val(s, "tsnet2_accept_slots_parked") == 3
    w = "tsnet2_accept_slot_wait_seconds"
    assert val(s, w + "_count") == 4
    assert val(s, w + "_sum") == pytest.approx(10.3)
    assert val(s, w + "_bucket", le="0.001") == 2
    assert val(s, w + "_bucket", le="0.25") == 2
    assert val(s, w + "_bucket", le="0.5") == 3
    assert val(s, w + "_bucket", le="5.0") == 3
    assert val(s, w + "_bucket", le="10.0") == 4
    d = "tsnet2_accept_slots_dropped_total"
    assert val(s, d, reason="app_closed") == 2
    assert val(s, d, reason="over_limit") == 1
    assert val(s, d, reason="other") == 1
    assert val(s, d, reason="listener_closed") == 0
    assert len(series(s, d)) == len(SLOT_DROP_REASONS)


# ---- traffic log -------------------------------------------------------------------------


def test_traffic_log_records_bytes_drops_and_errors() -> None:
    m = Metrics()
    m.log_record("open", 250)
    m.log_record("data", 1000)
    m.log_record("data", 24)
    m.log_record("close", 180)
    m.log_record("refused", 90)  # a new record kind gets its own series
    m.log_record("Not A Kind!", 5)  # not an identifier: "other"
    m.log_dropped("disk_full")
    m.log_dropped("disk_full")
    m.log_dropped("payload_cap")
    m.log_dropped("ENOSPC on /var/run/tsnet2/traffic.jsonl")
    m.log_write_error()
    m.log_write_error()
    s = scrape(m)
    rec, by = "tsnet2_traffic_log_records_total", "tsnet2_traffic_log_written_bytes_total"
    assert val(s, rec, kind="open") == 1
    assert val(s, rec, kind="data") == 2
    assert val(s, rec, kind="close") == 1
    assert val(s, rec, kind="refused") == 1
    assert val(s, rec, kind="other") == 1
    assert val(s, by, kind="open") == 250
    assert val(s, by, kind="data") == 1024
    assert val(s, by, kind="close") == 180
    assert val(s, by, kind="refused") == 90
    assert val(s, by, kind="other") == 5
    dr = "tsnet2_traffic_log_dropped_records_total"
    assert val(s, dr, reason="disk_full") == 2
    assert val(s, dr, reason="payload_cap") == 1
    assert val(s, dr, reason="other") == 1
    assert val(s, dr, reason="write_error") == 0
    assert val(s, "tsnet2_traffic_log_write_errors_total") == 2


def test_record_kinds_are_capped() -> None:
    m = Metrics()
    for i in range(MAX_RECORD_KINDS + 10):
        m.log_record(f"kind{i}", 1)
    kinds = series(scrape(m), "tsnet2_traffic_log_records_total")
    named = {dict(k)["kind"] for k in kinds} - {"other"}
    assert len(named) == MAX_RECORD_KINDS
    assert {"open", "data", "close"} <= named
    assert sum(kinds.values()) == MAX_RECORD_KINDS + 10
    assert val(scrape(m), "tsnet2_traffic_log_records_total", kind="other") == 13


# ---- node and control --------------------------------------------------------------------


def test_node_control_and_netmap_state() -> None:
    m = Metrics()
    m.set_node_up(True)
    m.set_control_connected(True)
    m.set_netmap_version(42)
    s = scrape(m)
    assert val(s, "tsnet2_node_up") == 1
    assert val(s, "tsnet2_control_connected") == 1
    assert val(s, "tsnet2_netmap_version") == 42
    m.set_control_connected(False)
    m.set_netmap_version(43)
    m.set_node_up(False)
    s = scrape(m)
    assert val(s, "tsnet2_node_up") == 0
    assert val(s, "tsnet2_control_connected") == 0
    assert val(s, "tsnet2_netmap_version") == 43


# ---- per-peer WireGuard ------------------------------------------------------------------


def test_peer_stats_are_read_fresh_at_each_scrape() -> None:
    calls = 0
    rx = 1000

    def source() -> list[PeerSample]:
        nonlocal calls
        calls += 1
        return [PeerSample("web", rx, 2000, 1_700_000_000.5), PeerSample("db", 0, 148, None)]

    m = Metrics(peers=source)
    assert calls == 0, "the callback runs at scrape time only"
    s = scrape(m)
    assert calls == 1
    assert val(s, "tsnet2_peer_receive_bytes_total", peer="web") == 1000
    assert val(s, "tsnet2_peer_transmit_bytes_total", peer="web") == 2000
    assert val(s, "tsnet2_peer_last_handshake_timestamp_seconds", peer="web") == 1_700_000_000.5
    assert val(s, "tsnet2_peer_receive_bytes_total", peer="db") == 0
    assert val(s, "tsnet2_peer_transmit_bytes_total", peer="db") == 148
    assert val(s, "tsnet2_peer_last_handshake_timestamp_seconds", peer="db") == 0
    assert val(s, "tsnet2_peers") == 2
    rx = 5000
    s = scrape(m)
    assert calls == 2
    assert val(s, "tsnet2_peer_receive_bytes_total", peer="web") == 5000
    fams = families(m)
    assert fams["tsnet2_peer_receive_bytes_total"] == "counter"
    assert fams["tsnet2_peer_transmit_bytes_total"] == "counter"
    assert fams["tsnet2_peer_last_handshake_timestamp_seconds"] == "gauge"


def test_peers_with_one_name_are_merged() -> None:
    m = Metrics(peers=lambda: [PeerSample("unknown", 10, 1, 100.0),
                               PeerSample("unknown", 5, 2, 300.0),
                               PeerSample("web", 1, 1, None)])
    s = scrape(m)
    assert val(s, "tsnet2_peer_receive_bytes_total", peer="unknown") == 15
    assert val(s, "tsnet2_peer_transmit_bytes_total", peer="unknown") == 3
    assert val(s, "tsnet2_peer_last_handshake_timestamp_seconds", peer="unknown") == 300
    assert val(s, "tsnet2_peers") == 2


def test_failing_peer_source_does_not_break_the_scrape() -> None:
    def broken() -> list[PeerSample]:
        raise OSError("UAPI socket gone")

    m = Metrics(peers=broken)
    m.flow_opened("out")
    s = scrape(m)
    assert val(s, "tsnet2_flows_opened_total", direction="out") == 1
    assert val(s, "tsnet2_peer_stats_errors_total") == 1
    assert val(s, "tsnet2_peers") == 0
    assert series(s, "tsnet2_peer_receive_bytes_total") == {}
    assert val(scrape(m), "tsnet2_peer_stats_errors_total") == 2


@dataclass
class _Dev:
    rx_bytes: int
    tx_bytes: int
    last_handshake: float | None


def test_peer_samples_names_device_peers_from_the_netmap() -> None:
    netmap = [
        {"name": "web", "stable_id": "n1", "public_key": "K1="},
        {"name": "", "stable_id": "n2", "public_key": "K2="},
        {"name": "nokey"},
    ]
    stats = {"K1=": _Dev(1, 2, 3.0), "K2=": _Dev(4, 5, None), "K9=": _Dev(7, 8, None)}
    assert peer_samples(netmap, stats) == [
        PeerSample("web", 1, 2, 3.0),
        PeerSample("n2", 4, 5, None),
        PeerSample("unknown", 7, 8, None),
    ]
    assert peer_samples([], {}) == []


# ---- docs --------------------------------------------------------------------------------


def test_docs_table_lists_exactly_the_exposed_metrics() -> None:
    m = Metrics(peers=lambda: [PeerSample("web", 1, 2, 3.0)])
    exposed = {n for n in families(m) if n.startswith("tsnet2_")}
    rows = re.findall(r"^\|\s*`(tsnet2_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|", DOCS.read_text(), re.M)
    documented = {name: kind for name, kind in rows}
    assert set(documented) == exposed
    for name, kind in families(m).items():
        if name in documented:
            assert documented[name] == kind, name


def test_before_scrape_hook_copies_state_in_at_render_time() -> None:
    state = {"up": False, "version": 0}

    def refresh() -> None:
        m.set_node_up(bool(state["up"]))
        m.set_netmap_version(int(state["version"]))
        if state["version"] == 99:
            raise RuntimeError("backend gone")

    m = Metrics(before_scrape=refresh)
    assert val(scrape(m), "tsnet2_node_up") == 0
    state.update(up=True, version=5)
    s = scrape(m)
    assert (val(s, "tsnet2_node_up"), val(s, "tsnet2_netmap_version")) == (1, 5)
    state["version"] = 99  # the hook fails after setting: the scrape still works
    assert val(scrape(m), "tsnet2_netmap_version") == 99
