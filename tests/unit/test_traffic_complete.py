"""Traffic log completeness: reject/gap records, delivered counts, cut flows, payload cap,
rotation, and the write-failure policy (on /dev/full; real full disks are in
tests/integration/test_traffic_disk.py)."""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.chained import unchain
from tsnet2.traffic import (
    CUT_ERROR,
    REJECT_REASONS,
    TrafficLog,
    TrafficLogError,
    data_record,
    gap_record,
    load_schema,
    reject_record,
)

T_NS = 1_779_206_770_123_450_000  # 2026-05-19T16:06:10.12345Z
CID = "9f0c2a7be1d34c55"
LID = "3a1b3a1b3a1b3a1b"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)  # so only the explicit 0o600 can explain the mode
    try:
        yield
    finally:
        os.umask(old)


def records_of(validator: jsonschema.Draft202012Validator, *paths: Path) -> list[dict[str, Any]]:
    """Every record of the files in order; each line whole, valid and key-sorted."""
    lines = []
    for path in paths:
        raw = path.read_bytes()
        assert raw == b"" or raw.endswith(b"\n"), f"{path} ends in a partial line"
        lines += raw.splitlines()
    return unchain(lines, validator=validator, strict=False)


def rotated(path: Path) -> list[Path]:
    """The rotated copies of ``path``, oldest first, then ``path``."""
    copies = sorted(
        (p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    return [*copies, path]


# --------------------------------------------------------------------------- records


def test_reject_record_bytes() -> None:
    full = reject_record(
        conn_id=CID,
        direction="in",
        local="100.64.0.1:8080",
        remote="100.64.0.2:40211",
        reason="no_slot",
        error="no accept slot within 10s",
        whois={"user": "u", "node": "b.ts.net.", "node_id": "n2"},
        listener_id=LID,
        t=T_NS,
    )
    assert full == (
        b'{"conn_id":"9f0c2a7be1d34c55","dir":"in","error":"no accept slot within 10s",'
        b'"kind":"reject","listener_id":"3a1b3a1b3a1b3a1b","local":"100.64.0.1:8080",'
        b'"proto":"tcp","reason":"no_slot","remote":"100.64.0.2:40211",'
        b'"t":"2026-05-19T16:06:10.12345Z","whois":{"node":"b.ts.net.","node_id":"n2","user":"u"}}\n'
    )
    minimal = reject_record(
        conn_id=CID, direction="out", remote="db:5432", reason="dial_failed", t=T_NS, error=""
    )
    assert minimal == (
        b'{"conn_id":"9f0c2a7be1d34c55","dir":"out","kind":"reject","proto":"tcp",'
        b'"reason":"dial_failed","remote":"db:5432","t":"2026-05-19T16:06:10.12345Z"}\n'
    )
    with pytest.raises(ValueError, match="reject reason must be one of"):
        reject_record(conn_id=CID, direction="out", remote="x", reason="nope", t=T_NS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="direction"):
        reject_record(conn_id=CID, direction="up", remote="x", reason="no_slot", t=T_NS)  # type: ignore[arg-type]


def test_gap_and_truncated_record_bytes() -> None:
    assert gap_record(
        dropped={"open": 1, "data": 3, "close": 0},
        error="ENOSPC: No space left on device",
        since=T_NS,
        t=1_779_206_771_000_000_000,
    ) == (
        b'{"dropped":4,"error":"ENOSPC: No space left on device","kind":"gap",'
        b'"kinds":{"data":3,"open":1},"since":"2026-05-19T16:06:10.12345Z",'
        b'"t":"2026-05-19T16:06:11Z"}\n'
    )
    with pytest.raises(ValueError):
        gap_record(dropped={"data": 0}, error="x", since=T_NS, t=T_NS)
    assert data_record(
        conn_id=CID,
        direction="peer->app",
        seq=7,
        data=b"abc",
        t=T_NS,
        include_payload=False,
        truncated=True,
    ) == (
        b'{"conn_id":"9f0c2a7be1d34c55","dir":"peer-\\u003eapp","kind":"data","len":3,"seq":7,'
        b'"t":"2026-05-19T16:06:10.12345Z","truncated":true}\n'
    )
    with pytest.raises(ValueError, match="no payload"):
        data_record(conn_id=CID, direction="peer->app", seq=1, data=b"a", t=T_NS, truncated=True)


# --------------------------------------------------------------------------- reject, close


def test_reject_through_the_log(tmp_path: Path, validator: jsonschema.Draft202012Validator) -> None:
    path = tmp_path / "r.jsonl"
    kinds: list[tuple[str, int]] = []
    with TrafficLog(str(path)) as log:
        log.on_record = lambda k, n: kinds.append((k, n))
        ids = [
            log.reject(direction="out", remote="db.ts.net:5432", reason=reason, error=f"e-{reason}")
            for reason in REJECT_REASONS
        ]
        inbound = log.reject(
            direction="in",
            local="100.64.0.1:80",
            remote="100.64.0.9:5000",
            reason="no_listener",
            whois=None,
            listener_id=LID,
            conn_id=CID,
        )
        with pytest.raises(ValueError):
            log.reject(direction="out", remote="x", reason="bogus")  # type: ignore[arg-type]
        assert log.active_flows == 0
    records = records_of(validator, path)
    assert [r["reason"] for r in records] == [*REJECT_REASONS, "no_listener"]
    assert [r["conn_id"] for r in records] == [*ids, inbound]
    assert len(set(ids)) == len(ids)
    assert all(r["kind"] == "reject" for r in records)
    assert records[0]["error"] == "e-dial_failed" and "local" not in records[0]
    assert records[-1]["listener_id"] == LID and "whois" not in records[-1]
    assert [k for k, _ in kinds] == ["reject"] * len(records) + ["checkpoint"]


def test_reject_never_raises(tmp_path: Path) -> None:
    drops: list[tuple[str, str]] = []
    log = TrafficLog(str(tmp_path / "x.jsonl"))
    log.on_drop = lambda k, r: drops.append((k, r))
    log.reject(direction="out", remote="a:1", reason="dial_failed")  # not open yet
    log.open()
    log.close()
    log.reject(direction="out", remote="a:1", reason="shutdown")
    assert log.dropped == 2
    assert drops == [("reject", "not_open"), ("reject", "closed")]
    # off mode: nothing written, nothing dropped
    off = TrafficLog(str(tmp_path / "off.jsonl"), mode="off")
    assert len(off.reject(direction="in", remote="a:1", reason="no_slot")) == 16
    assert off.dropped == 0


def test_close_with_delivered_counts_and_cut(
    tmp_path: Path, validator: jsonschema.Draft202012Validator
) -> None:
    path = tmp_path / "c.jsonl"
    with TrafficLog(str(path)) as log:
        a = log.open_flow(direction="in", local="a:1", remote="b:2", whois=None)
        a.data("peer->app", b"x" * 100)
        a.data("app->peer", b"y" * 50)
        with pytest.raises(ValueError, match="bytes_in=101"):
            a.close(bytes_in=101)
        with pytest.raises(ValueError, match="bytes_out=-1"):
            a.close(bytes_out=-1)
        assert not a.closed  # a bad count writes nothing
        a.close("peer: connection reset", bytes_in=60, bytes_out=50)
        b = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
        b.data("app->peer", b"z" * 10)
        b.close(cut=True, bytes_out=4)
        c = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
        c.close("app: broken pipe", cut=True)
        d = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
        d.data("peer->app", b"q" * 3)
        d.close()
    closes = {r["conn_id"]: r for r in records_of(validator, path) if r["kind"] == "close"}
    assert (closes[a.conn_id]["bytes_in"], closes[a.conn_id]["bytes_out"]) == (60, 50)
    assert closes[a.conn_id]["error"] == "peer: connection reset"
    assert (closes[b.conn_id]["bytes_out"], closes[b.conn_id]["error"]) == (4, CUT_ERROR)
    assert closes[c.conn_id]["error"] == "app: broken pipe"  # an explicit error wins
    assert (closes[d.conn_id]["bytes_in"], closes[d.conn_id]["bytes_out"]) == (3, 0)
    assert "error" not in closes[d.conn_id]
    # the read counts stay available on the flow
    assert (a.bytes_in, a.bytes_out) == (100, 50)


def test_closing_the_log_cuts_open_flows(
    tmp_path: Path, validator: jsonschema.Draft202012Validator
) -> None:
    path = tmp_path / "cut.jsonl"
    log = TrafficLog(str(path))
    log.open()
    flows = [
        log.open_flow(direction="in", local="a:1", remote=f"b:{i}", whois=None) for i in range(3)
    ]
    flows[0].data("peer->app", b"hello")
    flows[1].close()
    assert log.active_flows == 2
    log.close()
    assert all(f.closed for f in flows)
    flows[0].close("too late")  # no second close record
    with pytest.raises(TrafficLogError, match="closed"):
        flows[2].data("peer->app", b"x")
    with pytest.raises(TrafficLogError, match="closed"):
        log.check_writable()
    records = records_of(validator, path)
    opens = [r["conn_id"] for r in records if r["kind"] == "open"]
    closes = [r for r in records if r["kind"] == "close"]
    assert sorted(opens) == sorted(r["conn_id"] for r in closes)  # exactly one close each
    by_id = {r["conn_id"]: r for r in closes}
    assert by_id[flows[0].conn_id]["error"] == CUT_ERROR
    assert by_id[flows[0].conn_id]["bytes_in"] == 5
    assert by_id[flows[2].conn_id]["error"] == CUT_ERROR
    assert "error" not in by_id[flows[1].conn_id]


# --------------------------------------------------------------------------- payload cap


def test_payload_cap_per_direction(
    tmp_path: Path, validator: jsonschema.Draft202012Validator
) -> None:
    path = tmp_path / "cap.jsonl"
    first, second, reply = os.urandom(6), os.urandom(8), os.urandom(30)
    with TrafficLog(str(path), chunk_size=4, payload_cap=10) as log:
        flow = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
        flow.data("app->peer", first)
        assert not flow.truncated
        flow.data("app->peer", second)  # crosses the cap: split at byte 10
        flow.data("peer->app", reply)
        assert flow.truncated
        flow.close()
    records = records_of(validator, path)
    out = [r for r in records if r.get("dir") == "app->peer"]
    assert [(r["seq"], r["len"], "payload_b64" in r, r.get("truncated")) for r in out] == [
        (1, 4, True, None),
        (2, 2, True, None),
        (3, 4, True, None),
        (4, 4, False, True),
    ]
    logged = b"".join(base64.b64decode(r["payload_b64"]) for r in out if "payload_b64" in r)
    assert logged == (first + second)[:10]
    inn = [r for r in records if r.get("dir") == "peer->app"]
    assert sum(r["len"] for r in inn) == 30  # byte accounting stays complete
    assert (
        b"".join(base64.b64decode(r["payload_b64"]) for r in inn if "payload_b64" in r)
        == (reply[:10])
    )
    assert [r["seq"] for r in inn] == list(range(1, len(inn) + 1))
    assert (records[-1]["bytes_in"], records[-1]["bytes_out"]) == (30, 14)


@pytest.mark.parametrize(("mode", "cap"), [("payload", 0), ("metadata", 5)])
def test_payload_cap_zero_and_metadata(
    tmp_path: Path, validator: jsonschema.Draft202012Validator, mode: Any, cap: int
) -> None:
    path = tmp_path / "cap0.jsonl"
    with TrafficLog(str(path), mode=mode, payload_cap=cap) as log:
        flow = log.open_flow(direction="in", local="a:1", remote="b:2", whois=None)
        flow.data("peer->app", b"0123456789")
        flow.close()
    data = [r for r in records_of(validator, path) if r["kind"] == "data"]
    assert [r["len"] for r in data] == [10]
    assert "payload_b64" not in data[0]
    # metadata mode never has payloads, so nothing is "truncated" there
    assert data[0].get("truncated") is (True if mode == "payload" else None)


# --------------------------------------------------------------------------- rotation


def write_flows(log: TrafficLog, n: int, size: int = 20) -> None:
    flow = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
    for i in range(n):
        flow.data("app->peer", bytes([i % 256]) * size)
    flow.close()


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_rotation_sizes_keep_and_modes(
    tmp_path: Path, validator: jsonschema.Draft202012Validator, umask0: None, keep: int
) -> None:
    path = tmp_path / "rot.jsonl"
    with TrafficLog(str(path), max_bytes=1000, keep=keep) as log:
        write_flows(log, 100)
        assert log.rotations > keep + 1
    files = rotated(path)
    assert [p.name for p in files] == [f"rot.jsonl.{i}" for i in range(keep, 0, -1)] + ["rot.jsonl"]
    assert not (tmp_path / "rot.jsonl.new").exists()
    for p in files:
        assert 0 < p.stat().st_size <= 1000
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    # the kept files hold the newest records, in order, with nothing missing in between
    # (records_of checks that log_seq goes up by one from file to file)
    records = records_of(validator, *files)
    seqs = [r["seq"] for r in records if r["kind"] == "data"]
    assert seqs == list(range(seqs[0], 101)) if seqs else keep == 0
    # (with keep=0 the one file may hold only the close checkpoint, which records_of skips)
    assert [r["kind"] for r in records][-1:] == ["close"] or (keep == 0 and not records)


def test_rotation_never_splits_a_record(
    tmp_path: Path, validator: jsonschema.Draft202012Validator
) -> None:
    path = tmp_path / "big.jsonl"
    with TrafficLog(str(path), max_bytes=50, keep=100) as log:
        write_flows(log, 5, size=100)
    files = rotated(path)
    # start checkpoint, open, 5 data, close, close checkpoint: each record alone in its file
    assert len(files) == 9
    for p in files:
        assert p.read_bytes().count(b"\n") == 1
    assert [r["kind"] for r in records_of(validator, *files)] == ["open"] + ["data"] * 5 + ["close"]


def test_existing_file_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    path.write_bytes(b'{"kind":"old"}\n' * 100)
    path.chmod(0o640)
    with TrafficLog(str(path), max_bytes=500, keep=3) as log:
        log.reject(direction="out", remote="a:1", reason="dial_failed")
    # the start checkpoint, the reject and the close checkpoint each went to a new file
    oldest, *newer = rotated(path)
    assert oldest.name == "old.jsonl.3"
    assert oldest.read_bytes() == b'{"kind":"old"}\n' * 100
    assert stat.S_IMODE(oldest.stat().st_mode) == 0o640
    kinds = [json.loads(p.read_bytes())["kind"] for p in newer]
    assert kinds == ["checkpoint", "reject", "checkpoint"]


def test_rotation_keeps_path_present_and_readers_whole(tmp_path: Path) -> None:
    """A tailing reader: the path never disappears and an old fd reads whole lines."""
    path = tmp_path / "tail.jsonl"
    missing = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal missing
        while not stop.is_set():
            if not os.path.exists(path):
                missing += 1

    with TrafficLog(str(path), max_bytes=400, keep=2) as log:
        log.reject(direction="out", remote="a:1", reason="dial_failed")
        with open(path, "rb") as reader:
            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                write_flows(log, 300)
            finally:
                stop.set()
                watcher.join()
            old = reader.read()
    assert missing == 0
    assert old.endswith(b"\n") and all(json.loads(line) for line in old.splitlines())


def test_concurrent_writers_rotate_whole_lines(
    tmp_path: Path, validator: jsonschema.Draft202012Validator
) -> None:
    path = tmp_path / "conc.jsonl"
    n_threads, n_records = 8, 150
    with TrafficLog(str(path), max_bytes=16384, keep=1000, chunk_size=64) as log:
        barrier = threading.Barrier(n_threads)

        def run(i: int) -> None:
            flow = log.open_flow(direction="in", local="a:1", remote=f"b:{i}", whois=None)
            barrier.wait()
            for j in range(n_records):
                flow.data("peer->app" if j % 2 else "app->peer", bytes([i]) * (j % 90 + 1))
            flow.close()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert log.rotations > 10
    files = rotated(path)
    assert all(p.stat().st_size <= 16384 for p in files)
    records = records_of(validator, *files)
    by_flow: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_flow.setdefault(r["conn_id"], []).append(r)
    assert len(by_flow) == n_threads
    for recs in by_flow.values():
        assert recs[0]["kind"] == "open" and recs[-1]["kind"] == "close"
        for d in ("app->peer", "peer->app"):
            data = [r for r in recs if r.get("dir") == d]
            assert [r["seq"] for r in data] == list(range(1, len(data) + 1))
        total = sum(r["len"] for r in recs if r.get("dir") == "peer->app")
        assert total == recs[-1]["bytes_in"]


# --------------------------------------------------------------------------- write failures


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_fail_closed_policy_on_dev_full(caplog: pytest.LogCaptureFixture) -> None:
    drops: list[tuple[str, str]] = []
    caplog.set_level(logging.ERROR, logger="tsnet2.traffic")
    log = TrafficLog("/dev/full", max_bytes=10)  # rotation is for regular files only
    log.on_drop = lambda k, r: drops.append((k, r))
    with log:
        # the start checkpoint could not be written: the log knows it is unwritable
        assert not log.healthy and not log.probe()
        with pytest.raises(TrafficLogError, match="refusing new flows") as info:
            log.check_writable()
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(TrafficLogError) as info:
            log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
        assert info.value.errno == errno.ENOSPC
        assert log.active_flows == 0
        log.reject(direction="out", remote="b:2", reason="log_unavailable")  # never raises
        assert not log.probe()
        assert log.dropped == 3
        assert log.rotations == 0
    assert drops == [("checkpoint", "ENOSPC"), ("open", "ENOSPC"), ("reject", "ENOSPC"),
                     ("checkpoint", "ENOSPC")]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("cannot be written" in m and "refusing new flows" in m for m in errors) == 1
    assert any("4 records that could not be written" in m for m in errors)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_continue_policy_on_dev_full(caplog: pytest.LogCaptureFixture) -> None:
    drops: list[tuple[str, str]] = []
    caplog.set_level(logging.ERROR, logger="tsnet2.traffic")
    log = TrafficLog("/dev/full", on_error="continue", chunk_size=4)
    log.on_drop = lambda k, r: drops.append((k, r))
    with log:
        flow = log.open_flow(direction="in", local="a:1", remote="b:2", whois=None)
        flow.data("peer->app", b"0123456789")  # three chunks, all dropped
        log.check_writable()  # continue: new flows are allowed
        assert not log.healthy
        flow.close(bytes_in=10)
        assert flow.closed and log.active_flows == 0
        assert log.dropped == 6
    assert drops == ([("checkpoint", "ENOSPC"), ("open", "ENOSPC")] + [("data", "ENOSPC")] * 3
                     + [("close", "ENOSPC"), ("checkpoint", "ENOSPC")])
    transitions = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(transitions) == 1 and "counting dropped records" in transitions[0].getMessage()


def test_bad_arguments() -> None:
    for kwargs in (
        {"max_bytes": 0},
        {"keep": -1},
        {"payload_cap": -1},
        {"on_error": "ignore"},
    ):
        with pytest.raises(ValueError):
            TrafficLog(None, **kwargs)


@pytest.mark.parametrize(
    "record",
    [
        {
            "conn_id": CID,
            "dir": "in",
            "kind": "data",
            "len": 1,
            "payload_b64": "YQ==",
            "seq": 1,
            "t": "2026-01-01T00:00:00Z",
            "truncated": True,
        },
        {
            "conn_id": CID,
            "dir": "in",
            "kind": "data",
            "len": 1,
            "seq": 1,
            "t": "2026-01-01T00:00:00Z",
            "truncated": False,
        },
        {
            "conn_id": CID,
            "dir": "out",
            "kind": "reject",
            "proto": "tcp",
            "reason": "because",
            "remote": "a:1",
            "t": "2026-01-01T00:00:00Z",
        },
        {
            "conn_id": CID,
            "dir": "out",
            "kind": "reject",
            "proto": "tcp",
            "remote": "a:1",
            "t": "2026-01-01T00:00:00Z",
        },
        {
            "dropped": 0,
            "error": "x",
            "kind": "gap",
            "kinds": {},
            "since": "2026-01-01T00:00:00Z",
            "t": "2026-01-01T00:00:00Z",
        },
        {
            "dropped": 1,
            "error": "x",
            "kind": "gap",
            "kinds": {"other": 1},
            "since": "2026-01-01T00:00:00Z",
            "t": "2026-01-01T00:00:00Z",
        },
    ],
)
def test_schema_is_strict_on_new_records(
    validator: jsonschema.Draft202012Validator, record: dict[str, Any]
) -> None:
    assert not validator.is_valid(record)


def test_documented_examples_are_valid(validator: jsonschema.Draft202012Validator) -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "traffic-log.md"
    lines = [ln for ln in doc.read_text(encoding="utf-8").splitlines() if ln.startswith('{"')]
    kinds = set()
    for line in lines:
        rec = json.loads(line)
        validator.validate(rec)
        assert list(rec) == sorted(rec)
        kinds.add(rec["kind"])
    assert kinds == {"open", "data", "close", "reject", "gap"}


@pytest.mark.parametrize("direction", ["app->peer", "peer->app"])
@pytest.mark.parametrize("include_payload,truncated", [(True, False), (False, False),
                                                       (False, True)])
def test_fast_data_record_matches_generic_encoder(direction: str, include_payload: bool,
                                                  truncated: bool) -> None:
    from tsnet2.traffic import records

    data = bytes(range(256)) * 70
    kw = dict(conn_id="0123456789abcdef", direction=direction, seq=7, data=data,
              t=1_700_000_000_123_456_789, include_payload=include_payload, truncated=truncated)
    fast = records.data_record(**kw)  # type: ignore[arg-type]
    generic = records._generic_data_record(
        conn_id="0123456789abcdef", direction=direction, seq=7, n=len(data), data=data,
        t=1_700_000_000_123_456_789, include_payload=include_payload, truncated=truncated)
    assert fast == generic
