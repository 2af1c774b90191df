"""Traffic-log records as bytes (pure): one JSON object per line, seed-spec §4 field for field.

The prototype built records as Go maps, so every line has its keys in **alphabetical
order** (nested objects too) and Go's HTML-safe string escaping; :func:`go_json` on a
key-sorted dict reproduces that byte for byte.
"""

from __future__ import annotations

import base64
import datetime as _dt
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from tsnet2.proto.gojson import go_json, go_time, go_time_ns

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DataDir",
    "FlowDir",
    "chunks",
    "close_record",
    "data_record",
    "format_time",
    "open_record",
]

DEFAULT_CHUNK_SIZE = 16384
"""Largest payload of one ``data`` record (16 KiB), as in the prototype."""

FlowDir = Literal["in", "out"]
"""``open.dir``: ``in`` = a peer connected to our listener; ``out`` = the app dialled."""

DataDir = Literal["app->peer", "peer->app"]
"""``data.dir``: which way the bytes went."""


def format_time(dt: _dt.datetime | int) -> str:
    """UTC RFC 3339 with nanoseconds, trailing zeros trimmed, no fraction when zero, ``Z``.

    ``dt`` is a datetime (naive = UTC) or an int of nanoseconds since the Unix epoch
    (``time.time_ns()``), which keeps Go's nanosecond precision.
    """
    if isinstance(dt, int):
        return go_time_ns(dt)
    return go_time(dt)


def _sorted(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj


def _line(record: dict[str, Any]) -> bytes:
    return go_json(_sorted(record)) + b"\n"


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
) -> bytes:
    """An ``open`` line. ``whois`` is always present (``null`` when unknown);
    ``listener_id`` only for inbound flows (left out when ``None`` or empty)."""
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
    return _line(record)


def data_record(
    *,
    conn_id: str,
    direction: DataDir,
    seq: int,
    data: bytes | bytearray | memoryview,
    t: _dt.datetime | int,
    include_payload: bool = True,
) -> bytes:
    """A ``data`` line for one chunk: ``len``, ``seq`` and (unless metadata-only)
    ``payload_b64`` (standard base64, padded)."""
    record: dict[str, Any] = {
        "conn_id": conn_id,
        "dir": direction,
        "kind": "data",
        "len": len(data) if not isinstance(data, memoryview) else data.nbytes,
        "seq": seq,
        "t": format_time(t),
    }
    if include_payload:
        record["payload_b64"] = base64.b64encode(data).decode("ascii")
    return _line(record)


def close_record(
    *,
    conn_id: str,
    bytes_in: int,
    bytes_out: int,
    duration_ms: int,
    t: _dt.datetime | int,
    error: str | None = None,
) -> bytes:
    """A ``close`` line: totals (``bytes_in`` = peer->app, ``bytes_out`` = app->peer),
    duration, and ``error`` only when non-empty."""
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
