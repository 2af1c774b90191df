"""Traffic-log records as bytes (pure): one JSON object per line, seed-spec §4 field for field.

The prototype built records as Go maps, so every line has its keys in **alphabetical
order** (nested objects too) and Go's HTML-safe string escaping; :func:`go_json` on a
key-sorted dict reproduces that byte for byte.

``open``/``data``/``close`` are the prototype's kinds; ``reject`` (a flow that never
opened), ``gap`` (records the writer could not write) and ``checkpoint`` (a signed head of
the hash chain, :mod:`~tsnet2.traffic.chain`) are tsnet2 additions that old parsers skip as
unknown kinds. The writer appends the chain fields ``log_hash``/``log_seq`` to each line
these functions return (all kinds but ``gap``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from tsnet2.proto.gojson import go_json, go_time, go_time_ns
from tsnet2.traffic.chain import CHECKPOINT_REASONS, ZERO_HASH, checkpoint_message, sort_keys

__all__ = [
    "CUT_ERROR",
    "DEFAULT_CHUNK_SIZE",
    "FLOW_VIAS",
    "RECORD_KINDS",
    "REJECT_REASONS",
    "DataDir",
    "FlowDir",
    "FlowVia",
    "RejectReason",
    "checkpoint_record",
    "chunks",
    "close_record",
    "data_record",
    "format_time",
    "gap_record",
    "open_record",
    "reject_record",
]

DEFAULT_CHUNK_SIZE = 16384
"""Largest payload of one ``data`` record (16 KiB), as in the prototype."""

FlowDir = Literal["in", "out"]
"""``open.dir``: ``in`` = a peer connected to our listener; ``out`` = the app dialled."""

DataDir = Literal["app->peer", "peer->app"]
"""``data.dir``: which way the bytes went."""

RejectReason = Literal[
    "dial_failed", "app_gone", "no_listener", "no_slot", "log_unavailable", "shutdown",
    "bad_request", "not_tailnet", "target_failed", "over_limit", "tls_failed",
]
"""``reject.reason``: why a flow never opened (docs/traffic-log.md explains each)."""

REJECT_REASONS: tuple[RejectReason, ...] = (
    "dial_failed",
    "app_gone",
    "no_listener",
    "no_slot",
    "log_unavailable",
    "shutdown",
    "bad_request",
    "not_tailnet",
    "target_failed",
    "over_limit",
    "tls_failed",
)
"""Every value :data:`RejectReason` allows, in the order the docs list them."""

FlowVia = Literal["serve", "socks5", "http-connect", "http-proxy"]
"""``open.via`` / ``reject.via``: the sidecar entry point a flow came through, for flows
that do not belong to a tsnet2 library app: ``serve`` (an inbound port the daemon forwards
to a target in the pod), ``socks5``, ``http-connect`` and ``http-proxy`` (the egress
proxy). Left out for the library's own dials and listeners."""

FLOW_VIAS: tuple[FlowVia, ...] = ("serve", "socks5", "http-connect", "http-proxy")
"""Every value :data:`FlowVia` allows."""

RECORD_KINDS = ("open", "data", "close", "reject", "gap", "checkpoint")
"""Every ``kind`` this module writes."""

CUT_ERROR = "daemon: flow cut by shutdown"
"""``close.error`` of a flow that the daemon ended because it was shutting down."""


def format_time(dt: _dt.datetime | int) -> str:
    """UTC RFC 3339 with nanoseconds, trailing zeros trimmed, no fraction when zero, ``Z``.

    ``dt`` is a datetime (naive = UTC) or an int of nanoseconds since the Unix epoch
    (``time.time_ns()``), which keeps Go's nanosecond precision.
    """
    if isinstance(dt, int):
        return go_time_ns(dt)
    return go_time(dt)


def _line(record: dict[str, Any]) -> bytes:
    return go_json(sort_keys(record)) + b"\n"


def open_record(
    *,
    conn_id: str,
    direction: FlowDir,
    local: str,
    remote: str,
    whois: Mapping[str, Any] | None,
    t: _dt.datetime | int,
    listener_id: str | None = None,
    proto: str = "tcp",
    via: FlowVia | None = None,
    target: str | None = None,
    tls: Mapping[str, Any] | None = None,
) -> bytes:
    """An ``open`` line. ``whois`` is always present (``null`` when unknown);
    ``listener_id`` only for inbound flows (left out when ``None`` or empty). ``via`` names
    the sidecar entry point of a flow no library app owns (:data:`FlowVia`), ``target``
    where a ``serve`` flow was forwarded to (``127.0.0.1:8080``, ``unix:/path``); both are
    left out when ``None``. ``tls``: the TLS session the daemon terminated or originated for
    this flow (``TLSInfo.to_json()``: ``version``, ``cipher``, ``sni``, ``alpn``,
    ``peer_name``), left out for a flow without TLS in the daemon. Raises
    :class:`ValueError` for an unknown ``via``."""
    _check_via(via)
    record: dict[str, Any] = {
        "conn_id": conn_id,
        "dir": direction,
        "kind": "open",
        "local": local,
        "proto": proto,
        "remote": remote,
        "t": format_time(t),
        "whois": dict(whois) if whois is not None else None,
    }
    if listener_id:
        record["listener_id"] = listener_id
    if tls is not None:
        record["tls"] = dict(tls)
    _add_via(record, via, target)
    return _line(record)


def _check_via(via: str | None) -> None:
    if via is not None and via not in FLOW_VIAS:
        raise ValueError(f"via must be one of {', '.join(FLOW_VIAS)}; got {via!r}")


def _add_via(record: dict[str, Any], via: str | None, target: str | None) -> None:
    if via is not None:
        record["via"] = via
    if target:
        record["target"] = target


def data_record(
    *,
    conn_id: str,
    direction: DataDir,
    seq: int,
    data: bytes | bytearray | memoryview | int,
    t: _dt.datetime | int,
    include_payload: bool = True,
    truncated: bool = False,
) -> bytes:
    """A ``data`` line for one chunk: ``len``, ``seq`` and (unless metadata-only)
    ``payload_b64`` (standard base64, padded).

    ``data`` may be the chunk's length alone (an int) when no payload is written (bytes
    relayed without being read, ``Flow.count``). ``truncated=True`` marks a chunk past the
    flow's payload cap: ``"truncated":true`` and no payload (so ``include_payload`` must be
    false).
    """
    if truncated and include_payload:
        raise ValueError("a truncated data record carries no payload: pass include_payload=False")
    if isinstance(data, int):
        if include_payload:
            raise ValueError("a payload needs the bytes, not their length: pass "
                             "include_payload=False")
        n, data = data, b""
    else:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
    if _SAFE_ID.fullmatch(conn_id) and direction in _DIR_JSON:
        # The hot path (one record per 16 KiB chunk): every value here is JSON-safe as it
        # stands (hex id, fixed direction, digits, RFC 3339, base64), so the line is built
        # directly, byte-identical to the generic encoder's (tests compare the two).
        parts = [b'{"conn_id":"', conn_id.encode(), b'","dir":"', _DIR_JSON[direction],
                 b'","kind":"data","len":', str(n).encode()]
        if include_payload:
            parts += [b',"payload_b64":"', base64.b64encode(data), b'"']
        parts += [b',"seq":', str(seq).encode(), b',"t":"', format_time(t).encode(), b'"']
        if truncated:
            parts.append(b',"truncated":true')
        parts.append(b"}\n")
        return b"".join(parts)
    return _generic_data_record(conn_id=conn_id, direction=direction, seq=seq, n=n, data=data,
                                t=t, include_payload=include_payload, truncated=truncated)


_SAFE_ID = re.compile(r"[0-9a-f]{1,64}")
_DIR_JSON = {"app->peer": b"app-\\u003epeer", "peer->app": b"peer-\\u003eapp"}


def _generic_data_record(
    *, conn_id: str, direction: str, seq: int, n: int, data: bytes | bytearray | memoryview,
    t: _dt.datetime | int, include_payload: bool, truncated: bool,
) -> bytes:
    record: dict[str, Any] = {
        "conn_id": conn_id,
        "dir": direction,
        "kind": "data",
        "len": n,
        "seq": seq,
        "t": format_time(t),
    }
    if include_payload:
        record["payload_b64"] = base64.b64encode(data).decode("ascii")
    if truncated:
        record["truncated"] = True
    return _line(record)


def close_record(
    *,
    conn_id: str,
    bytes_in: int,
    bytes_out: int,
    duration_ms: int,
    t: _dt.datetime | int,
    error: str | None = None,
    proto: str | None = None,
    datagrams_in: int | None = None,
    datagrams_out: int | None = None,
) -> bytes:
    """A ``close`` line: totals (``bytes_in`` = peer->app, ``bytes_out`` = app->peer),
    duration, and ``error`` only when non-empty. A UDP flow's close also carries
    ``proto: "udp"`` and its datagram counts ``datagrams_in``/``datagrams_out`` (left out
    when ``None``, as for every TCP flow, whose close keeps the prototype's keys)."""
    record: dict[str, Any] = {
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "conn_id": conn_id,
        "duration_ms": duration_ms,
        "kind": "close",
        "t": format_time(t),
    }
    if error:
        record["error"] = error
    if proto:
        record["proto"] = proto
    if datagrams_in is not None:
        record["datagrams_in"] = datagrams_in
    if datagrams_out is not None:
        record["datagrams_out"] = datagrams_out
    return _line(record)


def reject_record(
    *,
    conn_id: str,
    direction: FlowDir,
    remote: str,
    reason: RejectReason,
    t: _dt.datetime | int,
    local: str | None = None,
    error: str | None = None,
    whois: Mapping[str, Any] | None = None,
    listener_id: str | None = None,
    proto: str = "tcp",
    via: FlowVia | None = None,
    target: str | None = None,
) -> bytes:
    """A ``reject`` line: a flow that never opened (no ``open``, no ``close``).

    ``remote`` is the peer (inbound: its ``ip:port``; outbound: the address the app asked
    for, resolved or not). ``local``, ``error``, ``whois``, ``listener_id``, ``via`` and
    ``target`` are left out when ``None`` or empty (``via`` and ``target`` as in
    :func:`open_record`). Raises :class:`ValueError` for an unknown ``reason`` or ``via``.
    """
    _check_via(via)
    if reason not in REJECT_REASONS:
        raise ValueError(
            f"reject reason must be one of {', '.join(REJECT_REASONS)}; got {reason!r}"
        )
    if direction not in ("in", "out"):
        raise ValueError(f'flow direction must be "in" or "out", got {direction!r}')
    record: dict[str, Any] = {
        "conn_id": conn_id,
        "dir": direction,
        "kind": "reject",
        "proto": proto,
        "reason": reason,
        "remote": remote,
        "t": format_time(t),
    }
    if local:
        record["local"] = local
    if error:
        record["error"] = error
    if whois is not None:
        record["whois"] = dict(whois)
    if listener_id:
        record["listener_id"] = listener_id
    _add_via(record, via, target)
    return _line(record)


def gap_record(
    *,
    dropped: Mapping[str, int],
    error: str,
    since: _dt.datetime | int,
    t: _dt.datetime | int,
    first_seq: int | None = None,
    last_seq: int | None = None,
    sink: str | None = None,
) -> bytes:
    """A ``gap`` line: records of the given kinds (kind -> count) that could not be
    written since ``since`` (the first failure), with the last ``error``.

    ``dropped`` is the total; ``kinds`` the per-kind counts (kinds with zero left out).
    ``first_seq``/``last_seq``: the ``log_seq`` range the lost records lie in (records of
    that range not lost were written); ``sink``: ``file`` or ``stdout`` when the log has
    both. A gap line is not chained.
    """
    kinds = {k: n for k, n in dropped.items() if n > 0}
    if not kinds:
        raise ValueError("a gap record needs at least one dropped record")
    record: dict[str, Any] = {
        "dropped": sum(kinds.values()),
        "error": error or "unknown error",
        "kind": "gap",
        "kinds": kinds,
        "since": format_time(since),
        "t": format_time(t),
    }
    if first_seq is not None and last_seq is not None:
        record["first_seq"], record["last_seq"] = first_seq, last_seq
    if sink:
        record["sink"] = sink
    return _line(record)


def checkpoint_record(
    *,
    reason: str,
    key: str,
    head_seq: int,
    head_hash: str,
    seq: int,
    t: int,
    sign: Callable[[bytes], bytes],
    node: str | None = None,
    prev_seq: int | None = None,
    prev_hash: str | None = None,
    unclean: bool = False,
) -> bytes:
    """A ``checkpoint`` line signing the chain's head (see :mod:`~tsnet2.traffic.chain`).

    ``sign`` signs :func:`~tsnet2.traffic.chain.checkpoint_message` with the log's Ed25519
    key and returns the 64-byte signature; ``seq`` is the ``log_seq`` the record will get.
    ``node``: the node's name once known.
    ``prev_seq``/``prev_hash``/``unclean`` only for ``reason="start"``.
    """
    if reason not in CHECKPOINT_REASONS:
        raise ValueError(f"checkpoint reason must be one of {', '.join(CHECKPOINT_REASONS)}; "
                         f"got {reason!r}")
    when = format_time(t)
    sig = sign(checkpoint_message(key=key, head_seq=head_seq, head_hash=head_hash, t=when,
                                  reason=reason, seq=seq))
    record: dict[str, Any] = {
        "head_hash": head_hash,
        "head_seq": head_seq,
        "key": key,
        "kind": "checkpoint",
        "reason": reason,
        "sig": base64.b64encode(sig).decode("ascii"),
        "t": when,
    }
    if node:
        record["node"] = node
    if reason == "start":
        record["prev_seq"] = prev_seq or 0
        record["prev_hash"] = prev_hash or ZERO_HASH.hex()
        if unclean:
            record["unclean"] = True
    return _line(record)


def chunks(
    data: bytes | bytearray | memoryview, size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[memoryview]:
    """Split ``data`` into consecutive views of at most ``size`` bytes (none for empty data)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    view = memoryview(data).cast("B")
    for start in range(0, view.nbytes, size):
        yield view[start : start + size]
