"""The JSONL traffic-log writer: one ``os.write`` per record, append-only, mode 0600."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Literal, Self

from tsnet2.proto.ids import new_id
from tsnet2.traffic.records import (
    DEFAULT_CHUNK_SIZE,
    DataDir,
    FlowDir,
    chunks,
    close_record,
    data_record,
    open_record,
)

__all__ = ["Flow", "LogMode", "TrafficLog", "TrafficLogError"]

LogMode = Literal["payload", "metadata", "off"]
"""``payload``: every byte (prototype behaviour); ``metadata``: data records without
``payload_b64``; ``off``: nothing is written (flows still count bytes)."""

_MODES = ("payload", "metadata", "off")
_DATA_DIRS = ("app->peer", "peer->app")
_FLOW_DIRS = ("in", "out")


class TrafficLogError(Exception):
    """The traffic log could not be opened or written (disk full, closed, bad path...).

    ``errno`` is the OS error number when there is one. Callers choose the policy (fail
    the flow, or count and continue).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        """Create the error with a message that names the path and the cause."""
        super().__init__(message)
        self.errno = errno


class TrafficLog:
    """Append-only JSONL traffic log.

    ``path``: a file (created with mode 0600; an existing file keeps its mode), ``"-"``
    for standard output, or ``None`` to discard. Each record is written with one
    ``os.write`` (continued only after a short write), so lines never interleave and are
    visible at once; there is no fsync. ``on_record(kind, nbytes)`` is called after
    each record is written, with the line's length in bytes.
    """

    def __init__(
        self,
        path: str | None,
        mode: LogMode = "payload",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        """Configure the log; nothing is opened until :meth:`open` (or ``with``)."""
        if mode not in _MODES:
            raise ValueError(f"traffic log mode must be one of {', '.join(_MODES)}; got {mode!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.path = path
        self.mode: LogMode = mode
        self.chunk_size = chunk_size
        self.on_record: Callable[[str, int], None] | None = None
        self._fd: int | None = None
        self._owns_fd = False
        self._opened = False
        self._closed = False
        self._lock = threading.Lock()

    @property
    def writes_records(self) -> bool:
        """True when records reach a file or stdout (not ``off``, not discarding)."""
        return self.mode != "off" and self.path is not None

    def open(self) -> None:
        """Open (create) the file for appending. Idempotent; raises :class:`TrafficLogError`."""
        with self._lock:
            if self._closed:
                raise TrafficLogError("traffic log is closed; create a new TrafficLog")
            if self._opened:
                return
            if self.path == "-":
                self._fd = 1
            elif self.path is not None:
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                try:
                    self._fd = os.open(self.path, flags, 0o600)
                except OSError as e:
                    raise TrafficLogError(
                        f"cannot open traffic log {self.path}: {e.strerror}", e.errno
                    ) from e
                self._owns_fd = True
            self._opened = True

    def close(self) -> None:
        """Close the file (never stdout). Idempotent."""
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
            if fd is not None and self._owns_fd:
                os.close(fd)

    def __enter__(self) -> Self:
        """Open the log."""
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the log."""
        self.close()

    def write_record(self, kind: str, line: bytes) -> None:
        """Write one complete line (already ending in ``\\n``). Used by :class:`Flow`.

        Raises :class:`TrafficLogError` when the log is not open or the write fails.
        """
        if not self.writes_records:
            return
        with self._lock:
            if self._fd is None:
                state = "closed" if self._closed else "not open"
                raise TrafficLogError(f"traffic log {self.path} is {state}")
            view = memoryview(line)
            try:
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError as e:
                raise TrafficLogError(
                    f"cannot write traffic log {self.path}: {e.strerror}", e.errno
                ) from e
        hook = self.on_record
        if hook is not None:
            hook(kind, len(line))

    def open_flow(
        self,
        *,
        direction: FlowDir,
        local: str,
        remote: str,
        whois: Mapping[str, Any] | None,
        listener_id: str | None = None,
        proto: str = "tcp",
        conn_id: str | None = None,
    ) -> Flow:
        """Write the ``open`` record of a new flow and return it (raises on write failure)."""
        if direction not in _FLOW_DIRS:
            raise ValueError(f'flow direction must be "in" or "out", got {direction!r}')
        flow = Flow(self, conn_id or new_id())
        if self.writes_records:
            self.write_record(
                "open",
                open_record(
                    conn_id=flow.conn_id,
                    direction=direction,
                    local=local,
                    remote=remote,
                    whois=whois,
                    listener_id=listener_id,
                    proto=proto,
                    t=time.time_ns(),
                ),
            )
        return flow


class Flow:
    """One logged connection: counts bytes and writes its ``data`` and ``close`` records.

    Safe to use from the two copy loops of a splice at once.
    """

    def __init__(self, log: TrafficLog, conn_id: str) -> None:
        """Create a flow; use :meth:`TrafficLog.open_flow` instead."""
        self._log = log
        self.conn_id = conn_id
        self.bytes_in = 0
        """Bytes peer->app so far."""
        self.bytes_out = 0
        """Bytes app->peer so far."""
        self._seq = {"app->peer": 0, "peer->app": 0}
        self._started_ns = time.monotonic_ns()
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` wrote (or tried to write) the close record."""
        return self._closed

    def data(self, direction: DataDir, data: bytes | bytearray | memoryview) -> None:
        """Count ``data`` and log it as chunks of at most ``chunk_size`` bytes.

        ``seq`` starts at 1 per direction. Bytes are counted even when the write fails
        (they were read from the socket). Raises :class:`TrafficLogError` on a write
        failure or after :meth:`close`.
        """
        if direction not in _DATA_DIRS:
            raise ValueError(
                f'data direction must be "app->peer" or "peer->app", got {direction!r}'
            )
        log = self._log
        with self._lock:
            if self._closed:
                raise TrafficLogError(f"flow {self.conn_id} is closed")
            n = memoryview(data).nbytes
            if direction == "peer->app":
                self.bytes_in += n
            else:
                self.bytes_out += n
            if not log.writes_records:
                return
            include = log.mode == "payload"
            for chunk in chunks(data, log.chunk_size):
                self._seq[direction] += 1
                line = data_record(
                    conn_id=self.conn_id,
                    direction=direction,
                    seq=self._seq[direction],
                    data=chunk,
                    t=time.time_ns(),
                    include_payload=include,
                )
                log.write_record("data", line)

    def close(self, error: str | None = None) -> None:
        """Write the ``close`` record exactly once (later calls do nothing).

        ``duration_ms`` is whole milliseconds since the flow was opened (monotonic clock).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            duration_ms = (time.monotonic_ns() - self._started_ns) // 1_000_000
            if self._log.writes_records:
                line = close_record(
                    conn_id=self.conn_id,
                    bytes_in=self.bytes_in,
                    bytes_out=self.bytes_out,
                    duration_ms=duration_ms,
                    error=error,
                    t=time.time_ns(),
                )
                self._log.write_record("close", line)
