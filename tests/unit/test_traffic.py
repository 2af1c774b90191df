"""Traffic log: byte-exact records (seed-spec §4), the writer, and the JSON Schema."""

from __future__ import annotations

import base64
import datetime as dt
import errno
import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.chained import unchain
from tsnet2.traffic import (
    TrafficLog,
    TrafficLogError,
    chunks,
    close_record,
    data_record,
    format_time,
    load_schema,
    open_record,
    reject_record,
)

T_NS = 1_779_206_770_123_450_000  # 2026-05-19T16:06:10.12345Z
CID = "9f0c2a7be1d34c55"
LID = "3a1b3a1b3a1b3a1b"
TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{0,8}[1-9])?Z")


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The records (chain checked and stripped, checkpoints left out)."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n") or raw == b""
    return unchain(raw.splitlines())


def assert_valid(validator: jsonschema.Draft202012Validator, path: Path) -> list[dict[str, Any]]:
    """Every line valid, keys sorted (chain keys last), chain intact; records without chain
    keys and checkpoints."""
    return unchain(path.read_bytes().splitlines(), validator=validator)


# --------------------------------------------------------------------------- records


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (T_NS, "2026-05-19T16:06:10.12345Z"),
        (1_779_206_770_000_000_000, "2026-05-19T16:06:10Z"),
        (1_779_206_770_000_000_001, "2026-05-19T16:06:10.000000001Z"),
        (1_779_206_770_999_999_999, "2026-05-19T16:06:10.999999999Z"),
        (0, "1970-01-01T00:00:00Z"),
        (dt.datetime(2026, 5, 19, 16, 6, 10, 120000, tzinfo=dt.UTC), "2026-05-19T16:06:10.12Z"),
        (
            dt.datetime(2026, 5, 19, 18, 6, 10, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2026-05-19T16:06:10Z",
        ),
    ],
)
def test_format_time(value: int | dt.datetime, expected: str) -> None:
    assert format_time(value) == expected


def test_open_record_bytes() -> None:
    got = open_record(
        conn_id=CID,
        direction="in",
        local="100.64.0.1:8080",
        remote="100.64.0.2:40211",
        whois={"user": "u@example.com", "node": "tsnet2-b.tail-scale.ts.net.", "node_id": "n1"},
        listener_id=LID,
        t=T_NS,
    )
    assert got == (
        b'{"conn_id":"9f0c2a7be1d34c55","dir":"in","kind":"open","listener_id":"3a1b3a1b3a1b3a1b",'
        b'"local":"100.64.0.1:8080","proto":"tcp","remote":"100.64.0.2:40211",'
        b'"t":"2026-05-19T16:06:10.12345Z","whois":{"node":"tsnet2-b.tail-scale.ts.net.",'
        b'"node_id":"n1","user":"u@example.com"}}\n'
    )
    out = open_record(
        conn_id=CID,
        direction="out",
        local="[fd7a:115c:a1e0::2]:5",
        remote="x<y>:1",
        whois=None,
        t=T_NS,
    )
    assert out == (
        b'{"conn_id":"9f0c2a7be1d34c55","dir":"out","kind":"open","local":"[fd7a:115c:a1e0::2]:5",'
        b'"proto":"tcp","remote":"x\\u003cy\\u003e:1","t":"2026-05-19T16:06:10.12345Z","whois":null}\n'
    )


def test_data_and_close_record_bytes() -> None:
    assert data_record(conn_id=CID, direction="peer->app", seq=1, data=b"hello tsnet2", t=T_NS) == (
        b'{"conn_id":"9f0c2a7be1d34c55","dir":"peer-\\u003eapp","kind":"data","len":12,'
        b'"payload_b64":"aGVsbG8gdHNuZXQy","seq":1,"t":"2026-05-19T16:06:10.12345Z"}\n'
    )
    assert data_record(
        conn_id=CID,
        direction="app->peer",
        seq=3,
        data=memoryview(b"abc"),
        t=T_NS,
        include_payload=False,
    ) == (
        b'{"conn_id":"9f0c2a7be1d34c55","dir":"app-\\u003epeer","kind":"data","len":3,"seq":3,'
        b'"t":"2026-05-19T16:06:10.12345Z"}\n'
    )
    # The length alone (bytes relayed without being read) gives the same line.
    for conn_id in (CID, "not-hex"):  # the fast path and the generic encoder
        assert data_record(conn_id=conn_id, direction="app->peer", seq=3, data=3, t=T_NS,
                           include_payload=False) == data_record(
            conn_id=conn_id, direction="app->peer", seq=3, data=b"abc", t=T_NS,
            include_payload=False)
    with pytest.raises(ValueError, match="a payload needs the bytes"):
        data_record(conn_id=CID, direction="app->peer", seq=3, data=3, t=T_NS)
    assert close_record(conn_id=CID, bytes_in=12, bytes_out=12, duration_ms=3, t=T_NS) == (
        b'{"bytes_in":12,"bytes_out":12,"conn_id":"9f0c2a7be1d34c55","duration_ms":3,"kind":"close",'
        b'"t":"2026-05-19T16:06:10.12345Z"}\n'
    )
    assert close_record(
        conn_id=CID, bytes_in=0, bytes_out=5, duration_ms=0, t=T_NS, error="write unix: broken pipe"
    ) == (
        b'{"bytes_in":0,"bytes_out":5,"conn_id":"9f0c2a7be1d34c55","duration_ms":0,'
        b'"error":"write unix: broken pipe","kind":"close","t":"2026-05-19T16:06:10.12345Z"}\n'
    )
    assert b"error" not in close_record(
        conn_id=CID, bytes_in=0, bytes_out=0, duration_ms=0, t=T_NS, error=""
    )


def test_chunks() -> None:
    payload = os.urandom(40 * 1024)
    parts = list(chunks(payload, 16384))
    assert [len(p) for p in parts] == [16384, 16384, 8192]
    assert b"".join(parts) == payload
    assert list(chunks(b"")) == []
    assert [bytes(c) for c in chunks(b"abcde", 2)] == [b"ab", b"cd", b"e"]
    with pytest.raises(ValueError):
        list(chunks(b"x", 0))


# --------------------------------------------------------------------------- writer


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)  # so only the explicit 0o600 can explain the mode
    try:
        yield
    finally:
        os.umask(old)


def test_flow_in_file(
    tmp_path: Path, validator: jsonschema.Draft202012Validator, umask0: None
) -> None:
    path = tmp_path / "traffic.jsonl"
    hook_calls: list[tuple[str, int]] = []
    payload = os.urandom(40 * 1024)
    with TrafficLog(str(path)) as log:
        log.on_record = lambda kind, n: hook_calls.append((kind, n))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        flow = log.open_flow(
            direction="in",
            local="100.64.0.1:8080",
            remote="100.64.0.2:40211",
            whois={"node": "b.ts.net.", "node_id": "n2", "user": "u"},
            listener_id=LID,
        )
        assert re.fullmatch(r"[0-9a-f]{16}", flow.conn_id)
        flow.data("peer->app", b"hello tsnet2")
        flow.data("app->peer", payload)
        flow.data("app->peer", b"")  # nothing read, nothing logged
        flow.data("peer->app", memoryview(b"bye"))
        time.sleep(0.02)
        flow.close()
        flow.close("ignored: already closed")
        assert (flow.bytes_in, flow.bytes_out) == (15, 40 * 1024)
        with pytest.raises(TrafficLogError, match="closed"):
            flow.data("peer->app", b"late")
    records = assert_valid(validator, path)
    assert [r["kind"] for r in records] == ["open", "data", "data", "data", "data", "data", "close"]
    assert all(r["conn_id"] == flow.conn_id for r in records)
    assert all(TIME_RE.fullmatch(r["t"]) for r in records)
    opened = records[0]
    assert (opened["dir"], opened["listener_id"], opened["proto"]) == ("in", LID, "tcp")
    out = [r for r in records if r.get("dir") == "app->peer"]
    inn = [r for r in records if r.get("dir") == "peer->app"]
    assert [r["seq"] for r in out] == [1, 2, 3] and [r["len"] for r in out] == [16384, 16384, 8192]
    assert b"".join(base64.b64decode(r["payload_b64"]) for r in out) == payload
    assert [r["seq"] for r in inn] == [1, 2]
    assert b"".join(base64.b64decode(r["payload_b64"]) for r in inn) == b"hello tsnet2bye"
    close = records[-1]
    assert (close["bytes_in"], close["bytes_out"]) == (15, 40 * 1024)
    assert "error" not in close and close["duration_ms"] >= 20
    raw_lines = path.read_bytes().splitlines(keepends=True)
    # the hook sees every record after open: the flow's, then the close checkpoint
    assert hook_calls == [
        (json.loads(line)["kind"], len(line)) for line in raw_lines[1:]
    ]
    assert [json.loads(line)["reason"] for line in (raw_lines[0], raw_lines[-1])] == [
        "start", "close"]


def test_existing_file_keeps_mode_and_is_appended(
    tmp_path: Path, validator: jsonschema.Draft202012Validator
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"")
    path.chmod(0o640)
    for _ in range(2):
        with TrafficLog(str(path)) as log:
            flow = log.open_flow(
                direction="out", local="100.64.0.2:5", remote="100.64.0.1:80", whois=None
            )
            flow.close("dial peer: connection reset")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    records = assert_valid(validator, path)
    assert [r["kind"] for r in records] == ["open", "close"] * 2
    assert records[0]["whois"] is None and "listener_id" not in records[0]
    assert records[1]["error"] == "dial peer: connection reset"


def test_metadata_mode(tmp_path: Path, validator: jsonschema.Draft202012Validator) -> None:
    path = tmp_path / "m.jsonl"
    with TrafficLog(str(path), mode="metadata", chunk_size=4) as log:
        flow = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
        flow.data("app->peer", b"0123456789")
        flow.close()
    records = assert_valid(validator, path)
    data = [r for r in records if r["kind"] == "data"]
    assert [(r["seq"], r["len"]) for r in data] == [(1, 4), (2, 4), (3, 2)]
    assert all("payload_b64" not in r for r in data)
    assert records[-1]["bytes_out"] == 10


@pytest.mark.parametrize(("path", "mode"), [("file", "off"), (None, "payload")])
def test_off_and_discard_write_nothing_but_count(
    tmp_path: Path, path: str | None, mode: Any
) -> None:
    target = tmp_path / "off.jsonl"
    calls: list[tuple[str, int]] = []
    with TrafficLog(str(target) if path else None, mode=mode) as log:
        log.on_record = lambda k, n: calls.append((k, n))
        flow = log.open_flow(direction="in", local="a:1", remote="b:2", whois=None)
        flow.data("peer->app", b"x" * 100)
        flow.data("app->peer", b"y" * 7)
        flow.close()
        assert (flow.bytes_in, flow.bytes_out) == (100, 7)
    assert calls == []
    assert not target.exists() or target.read_bytes() == b""


def test_stdout(
    capfd: pytest.CaptureFixture[str], validator: jsonschema.Draft202012Validator
) -> None:
    log = TrafficLog("-")
    log.open()
    flow = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None, conn_id=CID)
    flow.data("app->peer", b"hi")
    flow.close()
    log.close()
    os.write(1, b"")  # stdout still open after close
    lines = capfd.readouterr().out.encode().splitlines()
    assert len(lines) == 5  # start checkpoint, open, data, close, close checkpoint
    records = unchain(lines, validator=validator)
    assert records[1]["payload_b64"] == "aGk="


def test_write_errors_are_typed(tmp_path: Path) -> None:
    log = TrafficLog(str(tmp_path / "x.jsonl"))
    with pytest.raises(TrafficLogError, match="not open"):
        log.open_flow(direction="in", local="a:1", remote="b:2", whois=None)
    log.open()
    log.close()
    with pytest.raises(TrafficLogError, match="closed"):
        log.open_flow(direction="in", local="a:1", remote="b:2", whois=None)
    with pytest.raises(TrafficLogError, match="closed"):
        log.open()
    with pytest.raises(TrafficLogError, match="cannot open traffic log") as info:
        TrafficLog(str(tmp_path / "missing-dir" / "t.jsonl")).open()
    assert info.value.errno == errno.ENOENT


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_raises_and_flow_still_closes() -> None:
    with TrafficLog("/dev/full") as log:
        with pytest.raises(TrafficLogError) as info:
            log.open_flow(direction="in", local="a:1", remote="b:2", whois=None)
        assert info.value.errno == errno.ENOSPC
        log.mode = "off"  # the caller's policy: stop logging, keep the flow
        flow = log.open_flow(direction="in", local="a:1", remote="b:2", whois=None)
        log.mode = "payload"
        with pytest.raises(TrafficLogError):
            flow.data("peer->app", b"abc")
        assert flow.bytes_in == 3  # read bytes are counted even when logging failed
        with pytest.raises(TrafficLogError):
            flow.close()
        assert flow.closed
        flow.close()  # exactly once: no second attempt


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        TrafficLog(None, mode="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TrafficLog(None, chunk_size=0)
    log = TrafficLog(None)
    with pytest.raises(ValueError):
        log.open_flow(direction="sideways", local="", remote="", whois=None)  # type: ignore[arg-type]
    flow = log.open_flow(direction="in", local="", remote="", whois=None)
    with pytest.raises(ValueError):
        flow.data("up", b"x")  # type: ignore[arg-type]


def test_concurrent_directions(tmp_path: Path, validator: jsonschema.Draft202012Validator) -> None:
    path = tmp_path / "c.jsonl"
    with TrafficLog(str(path), chunk_size=100) as log:
        flow = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)

        def pump(direction: Any) -> None:
            for i in range(200):
                flow.data(direction, bytes([i % 256]) * 250)

        threads = [threading.Thread(target=pump, args=(d,)) for d in ("app->peer", "peer->app")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flow.close()
    records = assert_valid(validator, path)
    for d in ("app->peer", "peer->app"):
        seqs = [r["seq"] for r in records if r.get("dir") == d]
        assert seqs == list(range(1, 601))
    assert (records[-1]["bytes_in"], records[-1]["bytes_out"]) == (50_000, 50_000)


@pytest.mark.parametrize(
    "record",
    [
        {
            "conn_id": CID,
            "dir": "in",
            "kind": "open",
            "local": "a",
            "proto": "tcp",
            "remote": "b",
            "t": "2026-01-01T00:00:00Z",
        },
        {
            "conn_id": CID,
            "dir": "in",
            "kind": "open",
            "local": "a",
            "proto": "tcp",
            "remote": "b",
            "t": "2026-01-01T00:00:00Z",
            "whois": None,
            "extra": 1,
        },
        {
            "conn_id": CID,
            "dir": "in",
            "kind": "open",
            "local": "a",
            "proto": "tcp",
            "remote": "b",
            "t": "2026-01-01T00:00:00.10Z",
            "whois": None,
        },
        {
            "conn_id": "XYZ",
            "dir": "peer->app",
            "kind": "data",
            "len": 1,
            "seq": 1,
            "t": "2026-01-01T00:00:00Z",
        },
        {
            "conn_id": CID,
            "dir": "peer->app",
            "kind": "data",
            "len": 1,
            "seq": 0,
            "t": "2026-01-01T00:00:00Z",
        },
        {
            "conn_id": CID,
            "dir": "peer->app",
            "kind": "data",
            "len": 1,
            "seq": 1,
            "t": "2026-01-01T00:00:00Z",
            "payload_b64": "a",
        },
        {
            "bytes_in": 0,
            "bytes_out": 0,
            "conn_id": CID,
            "duration_ms": 0,
            "kind": "close",
            "t": "2026-01-01T00:00:00Z",
            "error": "",
        },
        {
            "bytes_in": -1,
            "bytes_out": 0,
            "conn_id": CID,
            "duration_ms": 0,
            "kind": "close",
            "t": "2026-01-01T00:00:00Z",
        },
        {"kind": "other", "t": "2026-01-01T00:00:00Z"},
    ],
)
def test_schema_is_strict(
    validator: jsonschema.Draft202012Validator, record: dict[str, Any]
) -> None:
    assert not validator.is_valid(record)


def test_via_and_target_mark_sidecar_flows(validator: jsonschema.Draft202012Validator) -> None:
    """``via``/``target`` appear only when given, in key order, and validate; an unknown
    ``via`` is a ValueError, not a record the schema would refuse later."""
    plain = json.loads(open_record(conn_id="a" * 16, direction="in", local="100.64.0.1:80",
                                   remote="100.64.0.2:4000", whois=None, t=0))
    assert "via" not in plain and "target" not in plain
    line = open_record(conn_id="a" * 16, direction="in", local="100.64.0.1:80",
                       remote="100.64.0.2:4000", whois=None, t=0, via="serve",
                       target="unix:/tsnet2/app.sock")
    rec = json.loads(line)
    assert (rec["via"], rec["target"]) == ("serve", "unix:/tsnet2/app.sock")
    assert list(rec) == sorted(rec)
    validator.validate(rec)
    for reason in ("bad_request", "not_tailnet", "target_failed"):
        rej = json.loads(reject_record(conn_id="b" * 16, direction="out", remote="x:1",
                                       reason=reason, t=0, via="socks5"))
        validator.validate(rej)
        assert rej["via"] == "socks5"
    with pytest.raises(ValueError, match="via must be one of"):
        open_record(conn_id="a" * 16, direction="in", local="l", remote="r", whois=None, t=0,
                    via="ftp")  # type: ignore[arg-type]


def test_tls_object_on_open_and_tls_failed_reject(
    validator: jsonschema.Draft202012Validator,
) -> None:
    """A flow the daemon terminated or originated TLS for carries ``tls`` on its open
    record (empty keys left out); ``tls_failed`` is a reject reason."""
    from tsnet2.proto import TLSInfo

    info = TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", sni="b.ts.example",
                   alpn="h2", peer_name="")
    rec = json.loads(open_record(conn_id="a" * 16, direction="in", local="100.64.0.1:443",
                                 remote="100.64.0.2:4000", whois=None, t=0,
                                 tls=info.to_json()))
    assert rec["tls"] == {"alpn": "h2", "cipher": "TLS_AES_256_GCM_SHA384",
                          "sni": "b.ts.example", "version": "TLSv1.3"}
    assert list(rec) == sorted(rec) and list(rec["tls"]) == sorted(rec["tls"])
    validator.validate(rec)
    assert TLSInfo.from_json(rec["tls"]) == info
    bad = dict(rec, tls={"version": "TLSv1.3"})  # no cipher
    assert not validator.is_valid(bad)
    rej = json.loads(reject_record(conn_id="b" * 16, direction="out", remote="b:443",
                                   reason="tls_failed", t=0,
                                   error="TLS: certificate verify failed"))
    validator.validate(rej)


def test_udp_flow_counts_datagrams(tmp_path: Path,
                                   validator: jsonschema.Draft202012Validator) -> None:
    """A UDP flow: one data record per datagram (an empty one too), and a close record
    with ``proto`` and the datagram counts; a TCP flow's close keeps the prototype's keys."""
    path = tmp_path / "u.jsonl"
    with TrafficLog(str(path), mode="payload") as log:
        flow = log.open_flow(direction="out", local="100.64.0.1:40000",
                             remote="100.64.0.2:53", whois=None, proto="udp")
        flow.datagram("app->peer", b"query")
        flow.datagram("peer->app", b"answer!")
        flow.datagram("peer->app", b"")
        flow.close()
        tcp = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
        tcp.close()
    records = assert_valid(validator, path)
    opened, *data, closed = records[:5]
    assert opened["proto"] == "udp"
    assert [(r["dir"], r["len"], r["seq"]) for r in data] == [
        ("app->peer", 5, 1), ("peer->app", 7, 1), ("peer->app", 0, 2)]
    assert base64.b64decode(data[1]["payload_b64"]) == b"answer!"
    assert (closed["proto"], closed["datagrams_in"], closed["datagrams_out"],
            closed["bytes_in"], closed["bytes_out"]) == ("udp", 2, 1, 7, 5)
    assert "proto" not in records[-1] and "datagrams_in" not in records[-1]
    # The counts come with proto, and proto with the counts.
    assert not validator.is_valid({k: v for k, v in closed.items() if k != "proto"})
    assert not validator.is_valid({k: v for k, v in closed.items() if k != "datagrams_in"})
