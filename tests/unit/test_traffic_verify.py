"""``tsnet2 log verify``'s core (tsnet2/traffic/verify.py) on logs written by the real
TrafficLog, intact and then damaged line by line. The chain itself, on logs built record by
record: test_traffic_verify_chain.py; the command: tests/integration/test_log_verify.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsnet2.traffic import TrafficLog
from tsnet2.traffic.verify import ordered, record_of, verify


def _write(path: Path, *, max_bytes: int | None = None) -> list[str]:
    """Three flows: two closed (one with data both ways, in several chunks), one open; the
    lines are read while the log is still open (a live log: no close checkpoint yet)."""
    with TrafficLog(str(path), chunk_size=4, max_bytes=max_bytes, keep=50) as log:
        a = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
        a.data("app->peer", b"hello world")
        a.data("peer->app", b"pong")
        a.close()
        b = log.open_flow(direction="in", local="a:3", remote="c:4", whois=None)
        b.data("peer->app", b"0123456789")
        b.close()
        log.reject(direction="in", remote="d:5", reason="no_listener")
        c = log.open_flow(direction="out", local="a:5", remote="e:6", whois=None)
        c.data("app->peer", b"xy")
        files = sorted(path.parent.glob(path.name + "*"))
        lines = [line for f in ordered([str(f) for f in files])
                 for line in Path(f).read_text().splitlines()]
        c.close()
    return lines


def test_an_intact_log_verifies(tmp_path: Path) -> None:
    lines = _write(tmp_path / "t.jsonl")
    rep = verify(lines)
    assert rep.failures(allow_open=True) == [], rep.problems
    assert rep.flows == 3 and rep.closed == 2 and rep.rejects == 1
    assert len(rep.open_flows) == 1
    assert not rep.ok() and rep.ok(allow_open=True)
    assert {p.kind for p in rep.problems} == {"unsigned", "open-end"}  # live: allowed above
    whole = verify((tmp_path / "t.jsonl").read_text().splitlines())
    assert whole.ok(require_start=True) and whole.problems == [], whole.problems
    (node,) = whole.nodes
    assert node["closed"] and node["verified"] == [[1, node["last_seq"] - 1]]


def test_collector_prefixes_and_other_lines_are_skipped(tmp_path: Path) -> None:
    lines = [f"2026-12-03T01:02:03.4Z stdout F {x}" for x in _write(tmp_path / "t.jsonl")]
    lines.insert(3, "tsnet2d: 2026-12-03 INFO something else")
    rep = verify(lines)
    assert rep.failures(allow_open=True) == [] and rep.foreign_lines == 1 and rep.flows == 3
    assert record_of('{"kind": "other", "t": "x"}') is None
    assert record_of('x {"kind": "checkpoint", "t": "x"}') == {"kind": "checkpoint", "t": "x"}


@pytest.mark.parametrize(("damage", "kind", "needle"), [
    ("delete a data line", "missing", "data records 2..2 are missing"),
    ("delete the close", "missing", "has no close"),
    ("duplicate the close", "duplicate", "the same record as line"),
    ("swap two data lines", "reordered", "came before"),
    ("raise a close total", "altered", "but its data records hold"),
    ("truncate after the open", "unsigned", "has no close"),
])
def test_damage_is_found_by_log_seq(tmp_path: Path, damage: str, kind: str,
                                    needle: str) -> None:
    path = tmp_path / "t.jsonl"
    _write(path)
    lines = path.read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    first = next(r["conn_id"] for r in recs if r["kind"] == "open")
    data_idx = [i for i, r in enumerate(recs) if r["kind"] == "data" and r["conn_id"] == first
                and r["dir"] == "app->peer"]
    open_idx = next(i for i, r in enumerate(recs) if r["kind"] == "open")
    close_idx = next(i for i, r in enumerate(recs) if r["kind"] == "close"
                     and r["conn_id"] == first)
    if damage == "delete a data line":
        at = [recs[data_idx[1]]["log_seq"]]
        del lines[data_idx[1]]
    elif damage == "delete the close":
        at = [recs[close_idx]["log_seq"]]
        del lines[close_idx]
    elif damage == "duplicate the close":
        at = [recs[close_idx]["log_seq"]]
        lines.insert(close_idx, lines[close_idx])
    elif damage == "swap two data lines":
        i, j = data_idx[0], data_idx[1]
        at = [recs[i]["log_seq"], recs[j]["log_seq"]]
        lines[i], lines[j] = lines[j], lines[i]
    elif damage == "raise a close total":
        r = recs[close_idx]
        at = [r["log_seq"]]
        r["bytes_out"] += 1
        lines[close_idx] = json.dumps(r)
    else:
        lines = lines[:open_idx + 1]
        at = [recs[open_idx]["log_seq"]]
    rep = verify(lines)
    found = [p for p in rep.problems if p.kind == kind]
    assert found and all(
        p.first_seq is not None and p.last_seq is not None and p.first_seq <= s <= p.last_seq
        for p in found[:1] for s in at), rep.problems
    text = "\n".join([str(p) for p in rep.problems]
                     + [f"flow {c} has no close" for c in rep.open_flows])
    assert needle in text, text
    assert not rep.ok()


def test_rotated_sets_are_read_oldest_first() -> None:
    assert ordered(["t.jsonl", "t.jsonl.1", "t.jsonl.10", "t.jsonl.2"]) == [
        "t.jsonl.10", "t.jsonl.2", "t.jsonl.1", "t.jsonl"]
    assert ordered(["b.log", "a.log"]) == ["b.log", "a.log"]  # unrelated files: as given
