"""``tsnet2 log verify``'s core (tsnet2/traffic/verify.py) on logs written by the real
TrafficLog, intact and then damaged line by line. The command itself:
tests/integration/test_log_verify.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsnet2.traffic import TrafficLog
from tsnet2.traffic.verify import ordered, record_of, verify


def _write(path: Path, *, max_bytes: int | None = None) -> list[str]:
    """Three flows: two closed (one with data both ways, in several chunks), one open."""
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
    assert rep.problems == [] and rep.flows == 3 and rep.closed == 2 and rep.rejects == 1
    assert len(rep.open_flows) == 1
    assert not rep.ok() and rep.ok(allow_open=True)
    whole = (tmp_path / "t.jsonl").read_text().splitlines()
    assert verify(whole).ok()


def test_collector_prefixes_and_other_lines_are_skipped(tmp_path: Path) -> None:
    lines = [f"2026-12-03T01:02:03.4Z stdout F {x}" for x in _write(tmp_path / "t.jsonl")]
    lines.insert(3, "tsnet2d: 2026-12-03 INFO something else")
    rep = verify(lines)
    assert rep.problems == [] and rep.foreign_lines == 1 and rep.flows == 3
    assert record_of('{"kind": "other", "t": "x"}') is None


@pytest.mark.parametrize(("damage", "needle"), [
    ("delete a data line", "data records 2..2 are missing"),
    ("delete the close", "has no close"),
    ("duplicate the close", "closed a second time"),
    ("swap two data lines", "again or out of order"),
    ("raise a close total", "but its data records hold"),
    ("truncate after the open", "has no close"),
])
def test_damage_is_found_by_line(tmp_path: Path, damage: str, needle: str) -> None:
    path = tmp_path / "t.jsonl"
    _write(path)
    lines = path.read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    first = recs[0]["conn_id"]
    data_idx = [i for i, r in enumerate(recs) if r["kind"] == "data" and r["conn_id"] == first
                and r["dir"] == "app->peer"]
    close_idx = next(i for i, r in enumerate(recs) if r["kind"] == "close"
                     and r["conn_id"] == first)
    if damage == "delete a data line":
        del lines[data_idx[1]]
    elif damage == "delete the close":
        del lines[close_idx]
    elif damage == "duplicate the close":
        lines.insert(close_idx, lines[close_idx])
    elif damage == "swap two data lines":
        i, j = data_idx[0], data_idx[1]
        lines[i], lines[j] = lines[j], lines[i]
    elif damage == "raise a close total":
        r = recs[close_idx]
        r["bytes_out"] += 1
        lines[close_idx] = json.dumps(r)
    else:
        lines = lines[:1]
    rep = verify(lines)
    text = "\n".join(rep.problems + [f"flow {c} has no close" for c in rep.open_flows])
    assert needle in text, text
    assert not rep.ok()


def test_rotated_sets_are_read_oldest_first() -> None:
    assert ordered(["t.jsonl", "t.jsonl.1", "t.jsonl.10", "t.jsonl.2"]) == [
        "t.jsonl.10", "t.jsonl.2", "t.jsonl.1", "t.jsonl"]
    assert ordered(["b.log", "a.log"]) == ["b.log", "a.log"]  # unrelated files: as given
