"""The audit log is complete: refusals, failed dials, cut flows, rotation, payload caps.

Seed-spec S15 (dropped inbound flows and failed dials are logged), S17 (rotation and the
per-flow payload cap), S19's LocalAPI dial (refused: it would bypass the log), and flows cut
by a daemon shutdown. Every record validates against the JSON Schema in the package.
"""

from __future__ import annotations

import base64
import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import tsnet2
from tsnet2.traffic import load_schema

from .tailnet import TwoNodes, read_log, recv_exactly, running_tailnet, two_nodes, wait_for

pytestmark = pytest.mark.netns

CAP = 1000
MAX_BYTES = 20_000


@pytest.fixture(scope="module")
def net() -> Iterator[TwoNodes]:
    extra = ("--traffic-log-max-bytes", str(MAX_BYTES), "--traffic-log-keep", "3",
             "--traffic-log-payload-cap", str(CAP))
    with two_nodes(("aa", "ab"), extra_a=extra) as n:
        yield n


def all_records(log: Path) -> list[dict[str, Any]]:
    """The current log and its rotated predecessors, oldest first."""
    files = sorted(log.parent.glob(log.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    out: list[dict[str, Any]] = []
    for f in [*files, log]:
        out += read_log(f)
    return out


def test_failed_dials_are_logged(net: TwoNodes) -> None:
    for target in ("nosuch:80", "100.100.1.1:80"):
        with pytest.raises(tsnet2.DialError):
            net.b.dial("tcp", target, timeout=10)
    recs = wait_for(lambda: [r for r in read_log(net.db.traffic_log)
                             if r["kind"] == "reject" and r["dir"] == "out"], 5,
                    "reject records")
    remotes = {r["remote"]: r for r in recs}
    assert remotes["nosuch:80"]["reason"] == "dial_failed"
    assert "no tailnet node named" in remotes["nosuch:80"]["error"]
    assert "100.100.1.1:80" in remotes


def test_refused_inbound_flows_are_logged(net: TwoNodes) -> None:
    a_ip = net.a.tailscale_ips()[0]
    with pytest.raises(tsnet2.DialError, match="Connect call failed"):
        net.b.dial("tcp", f"{a_ip}:4444", timeout=10)

    def refused() -> list[dict[str, Any]]:
        return [r for r in all_records(net.da.traffic_log)
                if r["kind"] == "reject" and r["reason"] == "no_listener"
                and r["local"].endswith(":4444")]
    recs = wait_for(refused, 5, "a no_listener reject in A's log")
    assert recs[0]["dir"] == "in"
    assert recs[0]["whois"]["node"] == "ab.tail-scale.ts.net."


def test_payload_cap_and_rotation(net: TwoNodes) -> None:
    payload = b"z" * 5000
    results: list[bytes] = []
    with net.a.listen("tcp", ":4500") as ln:
        def serve() -> None:
            for _ in range(6):
                with ln.accept(timeout=10) as c:
                    data = recv_exactly(c, len(payload))
                    c.sendall(data)
                    results.append(data)
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        for _ in range(6):
            with net.b.dial("tcp", "aa:4500", timeout=10) as conn:
                conn.sendall(payload)
                assert recv_exactly(conn, len(payload)) == payload
        t.join(10)
    log = net.da.traffic_log

    def closed_all() -> list[dict[str, Any]] | None:
        recs = all_records(log)
        ids = {r["conn_id"] for r in recs if r["kind"] == "open" and r["local"].endswith(":4500")}
        closes = [r for r in recs if r["kind"] == "close" and r["conn_id"] in ids]
        return recs if len(ids) == 6 and len(closes) == 6 else None
    recs = wait_for(closed_all, 10, "six flows opened and closed in A's logs")
    rotated = sorted(p.name for p in log.parent.glob(log.name + ".*"))
    assert rotated and len(rotated) <= 3, rotated
    for f in [log, *(log.parent / n for n in rotated)]:
        assert f.stat().st_size <= MAX_BYTES
        assert f.stat().st_mode & 0o777 == 0o600
    schema = load_schema()
    for r in recs:
        jsonschema.validate(r, schema)
    ids = {r["conn_id"] for r in recs if r["kind"] == "open" and r["local"].endswith(":4500")}
    for cid in ids:
        for direction in ("peer->app", "app->peer"):
            data = [r for r in recs if r["conn_id"] == cid and r["kind"] == "data"
                    and r["dir"] == direction]
            if not data:
                continue  # in an older file that rotation already dropped
            logged = b"".join(base64.b64decode(r.get("payload_b64", "")) for r in data)
            assert len(logged) <= CAP
            assert any(r.get("truncated") for r in data)
            assert all("payload_b64" not in r for r in data if r.get("truncated"))
        close = next(r for r in recs if r["conn_id"] == cid and r["kind"] == "close")
        assert close["bytes_in"] == close["bytes_out"] == len(payload)


def test_localapi_dial_is_refused(net: TwoNodes) -> None:
    """S19's hijacked dial would reach a peer without the traffic log: refused, 403."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    with s:
        s.connect(str(net.db.socket_path))
        s.sendall(b"\x02POST /localapi/v0/dial HTTP/1.1\r\nHost: local-tailscaled.sock\r\n"
                  b"Dial-Host: aa\r\nDial-Port: 4500\r\nUpgrade: ts-dial\r\n"
                  b"Connection: upgrade\r\nContent-Length: 0\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"traffic log" in head


def test_flows_cut_by_shutdown_are_closed_in_the_log() -> None:
    with running_tailnet() as lnet:
        key = lnet.authkey(reusable=True)
        da, db = lnet.add_daemon("ca", auth_key=key), lnet.add_daemon("cb", auth_key=key)
        a = tsnet2.Server(socket_path=str(da.socket_path), hostname="ca")
        b = tsnet2.Server(socket_path=str(db.socket_path), hostname="cb")
        try:
            a.up(timeout=30)
            b.up(timeout=30)
            ln = a.listen("tcp", ":4600")
            conns = [b.dial("tcp", "ca:4600", timeout=10) for _ in range(3)]
            accepted = [ln.accept(timeout=10) for _ in range(3)]
            for c in conns:
                c.sendall(b"hi")
            for c in accepted:
                assert recv_exactly(c, 2) == b"hi"
            assert lnet.stop_daemon("cb", signal.SIGTERM) == 0
            recs = read_log(db.traffic_log)
            opens = [r for r in recs if r["kind"] == "open"]
            closes = {r["conn_id"]: r for r in recs if r["kind"] == "close"}
            assert len(opens) == 3 and set(closes) == {r["conn_id"] for r in opens}
            for r in closes.values():
                assert r["error"] == "daemon: flow cut by shutdown"
                assert r["bytes_out"] == 2
            for c in [*conns, *accepted]:
                c.close()
            ln.close()
        finally:
            a.close()
            with contextlib.suppress(tsnet2.Error):
                b.close()  # its daemon is gone: closing is best effort
