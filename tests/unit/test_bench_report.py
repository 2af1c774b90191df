"""The benchmark's verdicts (tests/bench/report.py): ratios and deltas against the tunnel and
Go tsnet, PASS/MISS per target, n/a for a missing figure, info for a row without targets, and
the printed table staying within its width."""

from __future__ import annotations

import math

import pytest

from tests.bench.report import WIDTH, Row, Target, markdown, percentile, summary, table

BULK = (Target("ratio>=", 0.9), Target("ratio>=", 1.0, "go"))


def bulk(value: float, tunnel: float | None, go: float | None) -> Row:
    return Row("bulk_1", "bulk 1 stream, log metadata", "Mbit/s", value, tunnel, go, BULK)


def test_ratio_delta_and_vs_go() -> None:
    r = bulk(900.0, 1000.0, 1200.0)
    assert r.ratio == pytest.approx(0.9)
    assert r.delta == pytest.approx(-100.0)
    assert r.vs_go == pytest.approx(0.75)


@pytest.mark.parametrize(("value", "verdicts"), [
    (900.0, ["PASS", "MISS"]),     # exactly 0.9x the tunnel passes; 0.75x Go misses
    (899.0, ["MISS", "MISS"]),
    (1200.0, ["PASS", "PASS"]),    # exactly 1.0x Go passes
    (1199.0, ["PASS", "MISS"]),
])
def test_two_targets_two_verdicts(value: float, verdicts: list[str]) -> None:
    r = bulk(value, 1000.0, 1200.0)
    assert r.verdicts == verdicts
    assert r.verdict == "/".join(verdicts)
    assert r.target == ">=0.9x, >=1x Go"


def test_missing_reference_is_na_not_pass() -> None:
    assert bulk(900.0, 1000.0, None).verdict == "PASS/n/a"  # no Go row (--no-go)
    assert bulk(900.0, float("nan"), 1000.0).verdict == "n/a/MISS"
    assert bulk(900.0, 0.0, 1000.0).verdicts[0] == "n/a"  # no division by zero
    assert bulk(float("nan"), 1000.0, 1000.0).verdict == "n/a/n/a"
    assert bulk(float("nan"), 1000.0, 1000.0).ratio is None


def test_delta_target_against_the_tunnel() -> None:
    t = (Target("delta<=", 0.25),)
    assert Row("c", "connect", "ms", 0.85, 0.6, 0.4, t).verdict == "PASS"   # +0.25 exactly
    assert Row("c", "connect", "ms", 0.86, 0.6, 0.4, t).verdict == "MISS"
    assert Row("c", "connect", "ms", 0.5, 0.6, None, t).verdict == "PASS"  # faster is fine
    assert Row("c", "connect", "ms", 0.5, 0.6, None, t).target == "<=+0.25 ms"


def test_ratio_upper_bound_and_value_targets() -> None:
    cpu = (Target("ratio<=", 1.5),)
    assert Row("cpu", "CPU per GB", "CPU-s", 15.0, 10.0, 7.0, cpu).verdict == "PASS"
    assert Row("cpu", "CPU per GB", "CPU-s", 15.1, 10.0, 7.0, cpu).verdict == "MISS"
    rss = (Target("value<=", 40),)
    assert Row("rss", "RSS idle", "MB", 40.0, targets=rss).verdict == "PASS"
    assert Row("rss", "RSS idle", "MB", 41.7, targets=rss).verdict == "MISS"
    assert Row("rss", "RSS idle", "MB", 41.7, targets=rss).target == "<=40 MB"
    flows = (Target("value>=", 2000),)
    assert Row("f", "flows", "flows/s", 1999.0, 1.0, targets=flows).verdict == "MISS"


def test_row_without_targets_is_info() -> None:
    r = Row("veth", "  raw veth, 1 stream", "Mbit/s", 40000.0)
    assert r.verdict == "info"
    assert r.verdicts == []
    assert r.target == ""


def test_bad_target_is_refused() -> None:
    with pytest.raises(ValueError, match="check"):
        Target("ratio>", 1.0)
    with pytest.raises(ValueError, match="against"):
        Target("ratio>=", 1.0, "veth")


def test_json_keeps_every_verdict() -> None:
    doc = bulk(950.0, 1000.0, 1200.0).as_json()
    assert doc["ratio"] == 0.95 and doc["vs_go"] == pytest.approx(0.7917)
    assert [t["verdict"] for t in doc["targets"]] == ["PASS", "MISS"]
    assert [t["against"] for t in doc["targets"]] == ["tunnel", "go"]
    assert doc["verdict"] == "PASS/MISS"
    nan = Row("x", "x", "ms", float("nan"), 1.0).as_json()
    assert nan["value"] is None and nan["ratio"] is None  # JSON has no NaN


def test_table_shows_both_baselines_and_fits() -> None:
    rows = [
        Row("idle_rss_a", "daemon A RSS idle (after up)", "MB", 41.7,
            targets=(Target("value<=", 40),)),
        Row("connect_p50", "connect+1B echo p50", "ms", 1.692, 0.604, 0.392,
            (Target("delta<=", 0.25),)),
        bulk(1219.0, 1518.0, 2170.0),
        Row("bulk_1_cpu", "CPU per GB, 1 stream, metadata", "CPU-s", 9.04, 7.13, 6.66,
            (Target("ratio<=", 1.5),), note="a note that is long " * 8),
        Row("flows_16", "new flows, 16 workers", "flows/s", 252.0, 638.0, 2181.0,
            (Target("ratio>=", 0.8),)),
        Row("veth", "  raw veth, 1 stream", "Mbit/s", 43603.0),
    ]
    text = table(rows)
    lines = text.splitlines()
    body = lines[: lines.index("notes:")]
    assert max(len(line) for line in body) <= WIDTH
    assert body[0].split() == ["row", "tsnet2", "tunnel", "ratio", "delta", "Go", "tsnet", "vs",
                               "Go", "target", "result"]
    bulk_line = next(line for line in body if line.startswith("bulk 1 stream"))
    assert "0.80x" in bulk_line and "0.56x" in bulk_line and "MISS/MISS" in bulk_line
    assert "2,170" in bulk_line and "1,518" in bulk_line
    assert next(line for line in body if "raw veth" in line).endswith("info")
    assert lines[-1].startswith("  CPU per GB, 1 stream, metadata: a note")
    assert summary(rows) == ("targets: 1 PASS, 5 MISS, 0 n/a; missed: daemon A RSS idle "
                             "(after up), connect+1B echo p50, bulk 1 stream, log metadata, "
                             "new flows, 16 workers")
    md = markdown(rows).splitlines()
    assert md[0].startswith("| row | tsnet2 | tunnel |") and len(md) == 2 + len(rows)


def test_percentile() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 25) == 1.25
    assert math.isnan(percentile([], 50))
