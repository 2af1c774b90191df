"""What the end-to-end suite asserts about the apps' output, the traffic log and /metrics, as pure
functions over text (the same checks as the podman pod test, tests/image/test_image.py).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1 << 20


def results_of(log: str) -> list[dict[str, Any]]:
    """Every ``RESULT {json}`` line an app printed (tests/image/apps.py), in order."""
    found: list[dict[str, Any]] = []
    for line in log.splitlines():
        if line.startswith("RESULT "):
            doc = json.loads(line[len("RESULT "):])
            if not isinstance(doc, dict):
                raise AssertionError(f"RESULT is not a JSON object: {line[:200]}")
            found.append(doc)
    return found


def result_of(log: str) -> dict[str, Any] | None:
    """The last ``RESULT {json}`` line an app printed (tests/image/apps.py), or None."""
    found = results_of(log)
    return found[-1] if found else None


def traffic_records(text: str) -> list[dict[str, Any]]:
    """The records of a JSONL traffic log (docs/traffic-log.md); a torn last line (the
    daemon may be writing) is left out, any other bad line fails."""
    lines = [line for line in text.split("\n") if line.strip()]
    records = []
    for i, line in enumerate(lines):
        if len(line) > MAX_LINE:
            raise AssertionError(f"traffic log line {i + 1} is {len(line)} characters")
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break
            raise AssertionError(f"traffic log line {i + 1} is not JSON: {line[:200]}") from None
        records.append(doc)
    return records


def cri_stdout(text: str) -> str:
    """The standard output of a container as the kubelet's (CRI) container log file holds it:
    ``<time> <stream> <tags> <content>`` per line, ``tags`` starting with ``P`` for a partial
    piece (the runtime splits lines longer than 16 KiB) and ``F`` for the last one. Pieces
    are joined, ``stderr`` (the daemon's diagnostics) is left out; a torn last CRI line
    (the runtime may be writing) is dropped, and a record whose last piece has not come yet
    is left without its newline (:func:`traffic_records` then leaves it out)."""
    out: list[str] = []
    pending = ""
    lines = text.split("\n")
    del lines[-1]  # "" after the last newline, or a torn CRI line
    for i, line in enumerate(lines):
        if not line:
            continue
        parts = line.split(" ", 3)
        if len(parts) < 3 or parts[1] not in ("stdout", "stderr") or parts[2][:1] not in "PF":
            raise AssertionError(f"container log line {i + 1} is not CRI: {line[:200]}")
        if parts[1] != "stdout":
            continue
        pending += parts[3] if len(parts) == 4 else ""
        if parts[2].startswith("F"):
            out.append(pending + "\n")
            pending = ""
    return "".join(out) + pending


def chained(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records in the hash chain (those with a ``log_seq``: not ``gap``), in order."""
    return [r for r in records if "log_seq" in r]


def unclosed(records: Iterable[Mapping[str, Any]]) -> list[Any]:
    """conn_ids with an ``open`` and no ``close``, in order of their open."""
    records = list(records)
    closed = {r.get("conn_id") for r in records if r.get("kind") == "close"}
    return [r["conn_id"] for r in records
            if r.get("kind") == "open" and r.get("conn_id") not in closed]


def same_records_problems(a: Iterable[Mapping[str, Any]],
                          b: Iterable[Mapping[str, Any]]) -> list[str]:
    """Where two sinks of one log disagree: each record of the chain that both hold (same
    ``log_seq``) must be the same record; empty when they agree."""
    by_seq = {r["log_seq"]: r for r in chained(a)}
    return [f"log_seq {r['log_seq']}: {json.dumps(by_seq[r['log_seq']])[:300]} != "
            f"{json.dumps(r)[:300]}"
            for r in chained(b) if r["log_seq"] in by_seq and by_seq[r["log_seq"]] != r]


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text exposition -> ``{'name{labels}': value}``."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def host_of(remote: str) -> str:
    """``1.2.3.4:5`` / ``[fd7a::1]:5`` -> the address."""
    return remote.rsplit(":", 1)[0].strip("[]")


@dataclass(frozen=True)
class ServedFlow:
    """The inbound flow of one completed exchange, as the server's traffic log has it."""

    conn_id: Any
    remote_ip: str
    peer_to_app: bytes
    app_to_peer: bytes
    closed: bool


def served_flow(records: Iterable[Mapping[str, Any]], client_node: str) -> ServedFlow:
    """The last inbound flow whose WhoIs names ``client_node`` (``host.domain.``), with its
    payloads; fails when there is none."""
    records = list(records)
    opens = [r for r in records if r.get("kind") == "open" and r.get("dir") == "in"
             and (r.get("whois") or {}).get("node") == client_node]
    if not opens:
        raise AssertionError(f"no inbound open from {client_node} in the traffic log: "
                             f"{json.dumps(records)[-3000:]}")
    flow = opens[-1]
    payload = {"peer->app": b"", "app->peer": b""}
    closed = False
    for r in records:
        if r.get("conn_id") != flow["conn_id"]:
            continue
        if r.get("kind") == "data" and r.get("dir") in payload:
            payload[r["dir"]] += base64.b64decode(r["payload_b64"])
        elif r.get("kind") == "close":
            closed = True
            if (r.get("bytes_in"), r.get("bytes_out")) != (
                    len(payload["peer->app"]), len(payload["app->peer"])):
                raise AssertionError(f"close of {flow['conn_id']} counts {r} but the data "
                                     f"records hold {len(payload['peer->app'])} in, "
                                     f"{len(payload['app->peer'])} out")
    return ServedFlow(flow["conn_id"], host_of(str(flow["remote"])), payload["peer->app"],
                      payload["app->peer"], closed)


def metrics_problems(samples: Mapping[str, float],
                     records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Where the daemon's /metrics disagree with its traffic log (both from the start of one
    daemon process); empty when they agree."""
    records = list(records)
    in_ids = {r["conn_id"] for r in records if r.get("kind") == "open" and r.get("dir") == "in"}
    opens = len(in_ids)
    closes = sum(1 for r in records if r.get("kind") == "close" and r.get("conn_id") in in_ids)
    bytes_by_stream = {"peer->app": 0, "app->peer": 0}
    for r in records:
        if r.get("kind") == "data" and r.get("conn_id") in in_ids and r.get("dir") in (
                bytes_by_stream):
            bytes_by_stream[r["dir"]] += int(r["len"])
    expected = {
        'tsnet2_flows_opened_total{direction="in"}': float(opens),
        'tsnet2_flow_bytes_total{direction="in",stream="peer->app"}':
            float(bytes_by_stream["peer->app"]),
        'tsnet2_flow_bytes_total{direction="in",stream="app->peer"}':
            float(bytes_by_stream["app->peer"]),
        "tsnet2_node_up": 1.0,
    }
    problems = [f"{name} = {samples.get(name)}, expected {value}"
                for name, value in expected.items() if samples.get(name) != value]
    closed = sum(v for k, v in samples.items()
                 if k.startswith('tsnet2_flows_closed_total{direction="in"'))
    if closed != closes:
        problems.append(f"tsnet2_flows_closed_total{{direction=\"in\"}} sum = {closed}, "
                        f"the log has {closes} inbound closes")
    return problems


@dataclass(frozen=True)
class Flow:
    """One flow of a traffic log: its ``open`` record, both payloads and whether it closed."""

    open: Mapping[str, Any]
    peer_to_app: bytes
    app_to_peer: bytes
    closed: bool


def flows(records: Iterable[Mapping[str, Any]], direction: str) -> list[Flow]:
    """Every flow opened in ``direction`` (``in``/``out``), in order of their opens, with
    the payloads of their data records (``payload`` mode) and whether a close came."""
    records = list(records)
    out = []
    for opened in (r for r in records if r.get("kind") == "open"
                   and r.get("dir") == direction):
        payload = {"peer->app": b"", "app->peer": b""}
        closed = False
        for r in records:
            if r.get("conn_id") != opened["conn_id"]:
                continue
            if r.get("kind") == "data" and r.get("dir") in payload and "payload_b64" in r:
                payload[r["dir"]] += base64.b64decode(r["payload_b64"])
            elif r.get("kind") == "close":
                closed = True
        out.append(Flow(opened, payload["peer->app"], payload["app->peer"], closed))
    return out


@dataclass(frozen=True)
class UdpFlow:
    """One UDP flow of a traffic log: its ``open``, the datagrams of its data records (one
    record per datagram, ``payload`` mode) each way, and its ``close`` (None before it)."""

    open: Mapping[str, Any]
    peer_to_app: list[bytes]
    app_to_peer: list[bytes]
    close: Mapping[str, Any] | None


def udp_flows(records: Iterable[Mapping[str, Any]], direction: str) -> list[UdpFlow]:
    """Every ``proto: "udp"`` flow opened in ``direction`` (``in``/``out``), in order of
    their opens."""
    records = list(records)
    out = []
    for opened in (r for r in records if r.get("kind") == "open"
                   and r.get("dir") == direction and r.get("proto") == "udp"):
        grams: dict[str, list[bytes]] = {"peer->app": [], "app->peer": []}
        close = None
        for r in records:
            if r.get("conn_id") != opened["conn_id"]:
                continue
            if r.get("kind") == "data" and r.get("dir") in grams:
                grams[r["dir"]].append(base64.b64decode(r.get("payload_b64", "")))
            elif r.get("kind") == "close":
                close = r
        out.append(UdpFlow(opened, grams["peer->app"], grams["app->peer"], close))
    return out


def udp_close_problems(flow: UdpFlow) -> list[str]:
    """Where a closed UDP flow's ``close`` disagrees with its data records (``proto``,
    datagram and byte counts each way); empty when they agree."""
    close = flow.close
    if close is None:
        return [f"flow {flow.open.get('conn_id')} has no close"]
    want = {"proto": "udp",
            "datagrams_in": len(flow.peer_to_app), "datagrams_out": len(flow.app_to_peer),
            "bytes_in": sum(map(len, flow.peer_to_app)),
            "bytes_out": sum(map(len, flow.app_to_peer))}
    return [f"close {key} = {close.get(key)!r}, the data records say {value!r}"
            for key, value in want.items() if close.get(key) != value]
