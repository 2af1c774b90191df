"""The JSONL traffic-log writer: one ``os.write`` per record, append-only, mode 0600.

Besides writing, the writer keeps the log *complete*: size-based rotation that never splits
a record, a per-flow payload cap that keeps byte accounting exact, an explicit policy for
a log that cannot be written (``fail-closed`` or ``continue``) with a ``gap`` record once
writing works again, and ``close`` records for flows still open when the log is closed.
See docs/traffic-log.md.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

from tsnet2.proto.ids import new_id
from tsnet2.traffic.files import open_append, rotate
from tsnet2.traffic.journal import COUNT_INTERVAL, FlowJournal, Orphan
from tsnet2.traffic.records import (
    CUT_ERROR,
    DEFAULT_CHUNK_SIZE,
    DataDir,
    FlowDir,
    RejectReason,
    chunks,
    close_record,
    data_record,
    gap_record,
    open_record,
    reject_record,
)

__all__ = ["ErrorPolicy", "Flow", "LogMode", "TrafficLog", "TrafficLogError"]

log = logging.getLogger("tsnet2.traffic")

LogMode = Literal["payload", "metadata", "off"]
"""``payload``: every byte (prototype behaviour); ``metadata``: data records without
``payload_b64``; ``off``: nothing is written (flows still count bytes)."""

ErrorPolicy = Literal["fail-closed", "continue"]
"""What a failed write does: ``fail-closed`` raises :class:`TrafficLogError` (the daemon
refuses new flows and cuts flows whose bytes cannot be logged); ``continue`` counts the
dropped record and carries on."""

_MODES = ("payload", "metadata", "off")
_POLICIES = ("fail-closed", "continue")
_DATA_DIRS = ("app->peer", "peer->app")
_FLOW_DIRS = ("in", "out")
_ROTATE_RETRY = 10.0  # seconds between rotation attempts after one failed
_JOURNAL_INTERVAL_NS = int(COUNT_INTERVAL * 1e9)


class TrafficLogError(Exception):
    """The traffic log could not be opened or written (disk full, closed, bad path...).

    ``errno`` is the OS error number when there is one (``ENOSPC``, ``EROFS``, ``EIO``...).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        """Create the error with a message that names the path and the cause."""
        super().__init__(message)
        self.errno = errno


def _reason(exc: OSError) -> str:
    """A short, bounded label for a write failure (an errno name such as ``ENOSPC``)."""
    if exc.errno is None:
        return "OSError"
    return _errno.errorcode.get(exc.errno, f"errno{exc.errno}")


@dataclass
class _Outcome:
    """What one locked write did; hooks, log lines and errors are handled after unlocking."""

    written: list[tuple[str, int]] = field(default_factory=list)
    dropped: str | None = None  # the kind of the record that was dropped
    error: OSError | None = None
    became_unhealthy: bool = False
    recovered: int = 0  # records reported by the gap record just written


RESTART_ERROR = "daemon restart"
"""How the ``close`` record of a flow left open by a crashed daemon starts."""


def _restart_close(orphan: Orphan) -> bytes:
    """The ``close`` record a restarted daemon writes for a flow its predecessor left open."""
    now = time.time_ns()
    return close_record(
        conn_id=orphan.conn_id,
        bytes_in=orphan.bytes_in,
        bytes_out=orphan.bytes_out,
        duration_ms=max(0, now - orphan.opened_ns) // 1_000_000,
        error=f"{RESTART_ERROR}: tsnet2d (pid {orphan.pid}) stopped without closing this "
        "flow; byte counts as journaled, at most 1 s behind its data records",
        t=now,
    )


class TrafficLog:
    """Append-only JSONL traffic log.

    ``path``: a file (created with mode 0600; an existing file keeps its mode), ``"-"``
    for standard output, or ``None`` to discard. Each record is written with one
    ``os.write`` (continued only after a short write) under a lock, so lines never
    interleave and are visible at once; there is no fsync.

    - ``max_bytes``/``keep``: rotate before a record would make the file larger than
      ``max_bytes`` (``path`` -> ``path.1`` -> ... -> ``path.<keep>``, the oldest deleted);
      a record is never split, so a file holds at least one record. Regular files only.
    - ``payload_cap``: bytes of payload logged per flow and direction; later data records
      carry ``"truncated":true`` and ``len``/``seq`` but no payload.
    - ``on_error``: the :data:`ErrorPolicy` for a failed write.
    - ``journal``: a file (in the daemon's state directory) where the flows opened and not
      yet closed are kept (:mod:`tsnet2.traffic.journal`). :meth:`open` first writes a
      ``close`` record, with :data:`RESTART_ERROR`, for every flow the previous process left
      open (it crashed), so every ``open`` has exactly one ``close`` across restarts.

    Hooks (called outside the lock, from the writing thread): ``on_record(kind, nbytes)``
    after each record is written; ``on_drop(kind, reason)`` for each record that could not
    be written (``reason``: an errno name such as ``ENOSPC``, or ``closed``).
    """

    def __init__(
        self,
        path: str | None,
        mode: LogMode = "payload",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        max_bytes: int | None = None,
        keep: int = 5,
        payload_cap: int | None = None,
        on_error: ErrorPolicy = "fail-closed",
        journal: str | None = None,
    ) -> None:
        """Configure the log; nothing is opened until :meth:`open` (or ``with``)."""
        if mode not in _MODES:
            raise ValueError(f"traffic log mode must be one of {', '.join(_MODES)}; got {mode!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 (or None for no rotation), got {max_bytes}")
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        if payload_cap is not None and payload_cap < 0:
            raise ValueError(f"payload_cap must be >= 0 (or None for no cap), got {payload_cap}")
        if on_error not in _POLICIES:
            raise ValueError(f"on_error must be one of {', '.join(_POLICIES)}; got {on_error!r}")
        self.path = path
        self.mode: LogMode = mode
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        self.keep = keep
        self.payload_cap = payload_cap
        self.on_error: ErrorPolicy = on_error
        self.on_record: Callable[[str, int], None] | None = None
        self.on_drop: Callable[[str, str], None] | None = None
        self.dropped = 0
        """Records that could not be written since the log was created (every policy)."""
        self.rotations = 0
        """Completed rotations."""
        self._fd: int | None = None
        self._owns_fd = False
        self._regular = False
        self._size = 0
        self._opened = False
        self._closing = False
        self._closed = False
        self._healthy = True
        self._gap: dict[str, int] = {}
        self._gap_since = 0
        self._gap_error = ""
        self._last_errno: int | None = None
        self._torn = False
        self._rotate_after = 0.0
        self._flows: dict[str, Flow] = {}
        self._journal = FlowJournal(journal) if journal and self.writes_records else None
        self.reconciled = 0
        """Flows of a crashed predecessor closed by :meth:`open`."""
        self._lock = threading.Lock()

    # ---- state ---------------------------------------------------------------------------

    @property
    def writes_records(self) -> bool:
        """True when records reach a file or stdout (not ``off``, not discarding)."""
        return self.mode != "off" and self.path is not None

    @property
    def healthy(self) -> bool:
        """False from a failed write until a write succeeds again (see :meth:`probe`).

        Health is learned from writes: an idle log stays healthy until a write fails.
        """
        return self._healthy

    @property
    def active_flows(self) -> int:
        """Flows opened and not yet closed."""
        return len(self._flows)

    def check_writable(self) -> None:
        """Raise :class:`TrafficLogError` if a new flow must be refused now.

        That is: the log is closed, or the policy is ``fail-closed`` and the log is
        unhealthy even after one :meth:`probe`. Call it before dialling a peer or handing
        an inbound flow to the app; :meth:`open_flow` applies the same policy by itself.
        """
        if self._closing or self._closed:
            raise TrafficLogError(f"traffic log {self.path} is closed")
        if self._healthy or self.probe() or self.on_error == "continue":
            return
        raise TrafficLogError(
            f"traffic log {self.path} cannot be written ({self._gap_error}); "
            "refusing new flows until it can",
            self._last_errno,
        )

    def probe(self) -> bool:
        """Try to recover; return :attr:`healthy`.

        When records were dropped since the last successful write, this writes the
        ``gap`` record that reports them: if that succeeds the log is healthy again. When
        nothing is pending it does no I/O. Never raises; cheap enough to call every
        second and before every new flow.
        """
        if not self.writes_records:
            return True
        with self._lock:
            if self._fd is None or not self._gap:
                return self._healthy and self._fd is not None
            out = _Outcome()
            try:
                self._flush_gap(out)
            except OSError as exc:
                self._gap_error = f"{_reason(exc)}: {exc.strerror or exc}"
                self._last_errno = exc.errno
                return False
            self._healthy = True
        self._after(out, raise_errors=False)
        return True

    # ---- open / close --------------------------------------------------------------------

    def open(self) -> None:
        """Open (create) the file for appending. Idempotent; raises :class:`TrafficLogError`."""
        with self._lock:
            if self._closed or self._closing:
                raise TrafficLogError("traffic log is closed; create a new TrafficLog")
            if self._opened:
                return
            if self.path == "-":
                self._fd = 1
            elif self.path is not None:
                try:
                    self._fd = open_append(self.path)
                    st = os.fstat(self._fd)
                except OSError as e:
                    if self._fd is not None:
                        os.close(self._fd)
                        self._fd = None
                    raise TrafficLogError(
                        f"cannot open traffic log {self.path}: {e.strerror}", e.errno
                    ) from e
                self._owns_fd = True
                self._regular = stat.S_ISREG(st.st_mode)
                self._size = st.st_size
            self._opened = True
            orphans = self._journal.recover() if self._journal is not None else []
            outcomes = [self._write_locked("close", _restart_close(o)) for o in orphans]
            if self._journal is not None:
                self._journal.start()
        for o, out in zip(orphans, outcomes, strict=True):
            if out.error is None:
                self.reconciled += 1
            log.warning("traffic log: flow %s was left open by a daemon that stopped without "
                        "closing it (pid %d): close record %s", o.conn_id, o.pid,
                        "written" if out.error is None else f"lost ({out.error})")
            self._after(out, raise_errors=False)

    def close(self) -> None:
        """Close the log. Idempotent; never closes stdout.

        Flows still open get their ``close`` record first, with ``error`` set to
        :data:`~tsnet2.traffic.records.CUT_ERROR` and their read byte counts; close your
        flows before (with delivered counts) to record more precise totals.
        """
        with self._lock:
            if self._closed:
                return
            self._closing = True
            flows = list(self._flows.values())
        for flow in flows:
            try:
                flow.close(cut=True)
            except TrafficLogError as exc:
                log.warning("traffic log: close record of cut flow %s lost: %s", flow.conn_id, exc)
        with self._lock:
            self._closed = True
            if self._journal is not None:
                self._journal.close()
            fd, self._fd = self._fd, None
            if fd is not None and self._owns_fd:
                os.close(fd)
            pending = sum(self._gap.values())
        if pending:
            log.error(
                "traffic log %s closed with %d records that could not be written (%s)",
                self.path,
                pending,
                self._gap_error,
            )

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

    # ---- records -------------------------------------------------------------------------

    def write_record(self, kind: str, line: bytes) -> None:
        """Write one complete line (already ending in ``\\n``). Used by :class:`Flow`.

        Raises :class:`TrafficLogError` when the log is not open or closed, and, under
        the ``fail-closed`` policy, when the write fails (under ``continue`` the record is
        counted in :attr:`dropped` and reported to ``on_drop``).
        """
        if not self.writes_records:
            return
        with self._lock:
            out = self._write_locked(kind, line)
        self._after(out, raise_errors=self.on_error == "fail-closed")

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
        """Write the ``open`` record of a new flow and return it.

        Raises :class:`TrafficLogError` when the log is closed or not open, or when the
        write fails under ``fail-closed`` (the flow then does not exist: refuse it and
        :meth:`reject` it with reason ``log_unavailable``).
        """
        if direction not in _FLOW_DIRS:
            raise ValueError(f'flow direction must be "in" or "out", got {direction!r}')
        flow = Flow(self, conn_id or new_id())
        out = _Outcome()
        with self._lock:
            if self._closing or self._closed:
                raise TrafficLogError(f"traffic log {self.path} is closed")
            opened_ns = time.time_ns()
            if self.writes_records:
                line = open_record(
                    conn_id=flow.conn_id,
                    direction=direction,
                    local=local,
                    remote=remote,
                    whois=whois,
                    listener_id=listener_id,
                    proto=proto,
                    t=opened_ns,
                )
                out = self._write_locked("open", line)
            if out.error is None or self.on_error == "continue":
                self._flows[flow.conn_id] = flow
                if self._journal is not None and out.error is None:  # its open is written
                    self._journal.opened(flow.conn_id, opened_ns)
        self._after(out, raise_errors=self.on_error == "fail-closed")
        return flow

    def reject(
        self,
        *,
        direction: FlowDir,
        remote: str,
        reason: RejectReason,
        local: str | None = None,
        error: str | None = None,
        whois: Mapping[str, Any] | None = None,
        listener_id: str | None = None,
        proto: str = "tcp",
        conn_id: str | None = None,
    ) -> str:
        """Write a ``reject`` record for a flow that never opened; return its ``conn_id``.

        Never raises :class:`TrafficLogError` (the flow is refused anyway): a record that
        cannot be written is counted in :attr:`dropped` and reported to ``on_drop``
        whatever the policy. Raises :class:`ValueError` for an unknown reason.
        """
        cid = conn_id or new_id()
        line = reject_record(
            conn_id=cid,
            direction=direction,
            remote=remote,
            reason=reason,
            local=local,
            error=error,
            whois=whois,
            listener_id=listener_id,
            proto=proto,
            t=time.time_ns(),
        )
        if not self.writes_records:
            return cid
        with self._lock:
            if self._fd is None:
                self.dropped += 1
                state = "closed" if self._closed or self._closing else "not_open"
                out = None
            else:
                out = self._write_locked("reject", line)
        if out is None:
            self._notify_drop("reject", state)
        else:
            self._after(out, raise_errors=False)
        return cid

    # ---- internals -----------------------------------------------------------------------

    def _write_locked(self, kind: str, line: bytes) -> _Outcome:
        """Write (a pending gap record, then) ``line``; the lock is held."""
        if self._fd is None:
            state = "closed" if self._closed or self._closing else "not open"
            raise TrafficLogError(f"traffic log {self.path} is {state}")
        out = _Outcome()
        try:
            if self._gap:
                self._flush_gap(out)
            self._append(line)
        except OSError as exc:
            self.dropped += 1
            if not self._gap:
                self._gap_since = time.time_ns()
            self._gap[kind] = self._gap.get(kind, 0) + 1
            self._gap_error = f"{_reason(exc)}: {exc.strerror or exc}"
            self._last_errno = exc.errno
            out.dropped, out.error = kind, exc
            out.became_unhealthy = self._healthy
            self._healthy = False
            return out
        out.written.append((kind, len(line)))
        self._healthy = True
        return out

    def _flush_gap(self, out: _Outcome) -> None:
        """Write the pending ``gap`` record (lock held); raises OSError, keeping it pending."""
        line = gap_record(
            dropped=self._gap, error=self._gap_error, since=self._gap_since, t=time.time_ns()
        )
        self._append(line)
        out.recovered = sum(self._gap.values())
        out.written.append(("gap", len(line)))
        self._gap = {}

    def _append(self, line: bytes) -> None:
        """Write all of ``line`` or nothing (lock held): a short write followed by an error
        is truncated away, so the file never keeps half a record."""
        if self._torn:
            line = b"\n" + line  # end the fragment a failed truncate left behind
        if self.max_bytes is not None and self._regular:
            self._maybe_rotate(len(line))
        fd = self._fd
        assert fd is not None
        view = memoryview(line)
        written = 0
        try:
            while written < len(line):
                n = os.write(fd, view[written:])
                if n <= 0:
                    raise OSError(_errno.EIO, "write returned 0")
                written += n
        except OSError:
            if written:
                self._undo(fd, written)
            raise
        self._size += written
        self._torn = False

    def _undo(self, fd: int, written: int) -> None:
        """Remove the ``written`` bytes of a record that could not be finished."""
        if self._regular:
            try:
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                return
            except OSError as exc:
                log.error("traffic log %s: cannot remove a partial record: %s", self.path, exc)
        self._torn = True

    def _maybe_rotate(self, nbytes: int) -> None:
        assert self.max_bytes is not None and self._fd is not None
        if self._size == 0 or self._size + nbytes <= self.max_bytes:
            return
        self._size = os.fstat(self._fd).st_size  # resync if someone truncated the file
        if self._size == 0 or self._size + nbytes <= self.max_bytes:
            return
        if time.monotonic() < self._rotate_after:
            return
        try:
            self._rotate()
        except OSError as exc:
            self._rotate_after = time.monotonic() + _ROTATE_RETRY
            log.error(
                "traffic log %s: rotation failed (%s); still writing to the current file, "
                "next try in %.0fs",
                self.path,
                exc,
                _ROTATE_RETRY,
            )

    def _rotate(self) -> None:
        """Rotate the files (see :func:`~tsnet2.traffic.files.rotate`) and switch to the
        fresh one; on :class:`OSError` the current file stays in use."""
        assert self.path is not None and self._fd is not None
        new_fd = rotate(self.path, self.keep)
        old, self._fd = self._fd, new_fd
        os.close(old)
        self._size = 0
        self.rotations += 1

    def _after(self, out: _Outcome, *, raise_errors: bool) -> None:
        """Hooks and log lines for a locked write, then the policy's error."""
        if out.recovered:
            log.warning(
                "traffic log %s is writable again; a gap record reports %d dropped records",
                self.path,
                out.recovered,
            )
        hook = self.on_record
        if hook is not None:
            for kind, nbytes in out.written:
                hook(kind, nbytes)
        exc = out.error
        if exc is None or out.dropped is None:
            return
        if out.became_unhealthy:
            action = (
                "refusing new flows"
                if self.on_error == "fail-closed"
                else "counting dropped records"
            )
            log.error(
                "traffic log %s cannot be written (%s); policy %s: %s",
                self.path,
                self._gap_error,
                self.on_error,
                action,
            )
        self._notify_drop(out.dropped, _reason(exc))
        if raise_errors:
            raise TrafficLogError(
                f"cannot write traffic log {self.path}: {exc.strerror or exc}", exc.errno
            ) from exc

    def _notify_drop(self, kind: str, reason: str) -> None:
        hook = self.on_drop
        if hook is not None:
            hook(kind, reason)

    def _journal_counts(self, flow: Flow) -> None:
        """Journal ``flow``'s byte counts (:class:`Flow` calls it once a second at most)."""
        if self._journal is not None:
            with self._lock:
                self._journal.counted(flow.conn_id, flow.bytes_in, flow.bytes_out)

    def _write_close(self, flow: Flow, line: bytes | None) -> None:
        """Write ``flow``'s close record (when records are written) and forget the flow."""
        with self._lock:
            self._flows.pop(flow.conn_id, None)
            if self._journal is not None:
                self._journal.closed(flow.conn_id)
            if line is None:
                return
            out = self._write_locked("close", line)
        self._after(out, raise_errors=self.on_error == "fail-closed")


class Flow:
    """One logged connection: counts bytes and writes its ``data`` and ``close`` records.

    Safe to use from the two copy loops of a splice at once.
    """

    def __init__(self, log: TrafficLog, conn_id: str) -> None:
        """Create a flow; use :meth:`TrafficLog.open_flow` instead."""
        self._log = log
        self.conn_id = conn_id
        self.bytes_in = 0
        """Bytes read peer->app so far."""
        self.bytes_out = 0
        """Bytes read app->peer so far."""
        self._seq = {"app->peer": 0, "peer->app": 0}
        cap = log.payload_cap
        self._cap_left: dict[str, int | None] = {"app->peer": cap, "peer->app": cap}
        self.truncated = False
        """True once the payload cap left some bytes out of the log."""
        self._started_ns = time.monotonic_ns()
        self._journal_due_ns = self._started_ns + _JOURNAL_INTERVAL_NS
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` wrote (or tried to write) the close record."""
        return self._closed

    def data(self, direction: DataDir, data: bytes | bytearray | memoryview) -> None:
        """Count ``data`` and log it as chunks of at most ``chunk_size`` bytes.

        ``seq`` starts at 1 per direction and counts every record, written or dropped.
        Past the payload cap the chunks carry ``"truncated":true`` and no payload (a read
        that crosses the cap is split at it). Bytes are counted even when the write fails
        (they were read from the socket). Raises :class:`TrafficLogError` after
        :meth:`close`, and on a write failure under the ``fail-closed`` policy: then do
        not forward ``data``, cut the flow.
        """
        if direction not in _DATA_DIRS:
            raise ValueError(
                f'data direction must be "app->peer" or "peer->app", got {direction!r}'
            )
        log = self._log
        with self._lock:
            if self._closed:
                raise TrafficLogError(f"flow {self.conn_id} is closed")
            view = memoryview(data).cast("B")
            n = view.nbytes
            if direction == "peer->app":
                self.bytes_in += n
            else:
                self.bytes_out += n
            if not log.writes_records or n == 0:
                return
            include = log.mode == "payload"
            full, rest = view, view[n:]
            left = self._cap_left[direction]
            if include and left is not None:
                full, rest = view[:left], view[left:]
                self._cap_left[direction] = max(0, left - n)
                if rest.nbytes:
                    self.truncated = True
            for part, payload in ((full, include), (rest, False)):
                for chunk in chunks(part, log.chunk_size):
                    self._seq[direction] += 1
                    line = data_record(
                        conn_id=self.conn_id,
                        direction=direction,
                        seq=self._seq[direction],
                        data=chunk,
                        t=time.time_ns(),
                        include_payload=payload,
                        truncated=include and not payload,
                    )
                    log.write_record("data", line)
            if log._journal is not None:  # the counts a restart would report, once a second
                now = time.monotonic_ns()
                if now >= self._journal_due_ns:
                    self._journal_due_ns = now + _JOURNAL_INTERVAL_NS
                    log._journal_counts(self)

    def close(
        self,
        error: str | None = None,
        *,
        bytes_in: int | None = None,
        bytes_out: int | None = None,
        cut: bool = False,
    ) -> None:
        """Write the ``close`` record exactly once (later calls do nothing).

        ``bytes_in``/``bytes_out``: the bytes actually *delivered* (written to the app /
        the peer); by default the bytes read (:attr:`bytes_in`/:attr:`bytes_out`). A
        delivered count cannot exceed the read count (:class:`ValueError`, nothing
        written). ``cut=True``: the daemon ended the flow because it is shutting down;
        ``error`` defaults to :data:`~tsnet2.traffic.records.CUT_ERROR`. ``duration_ms``
        is whole milliseconds since the flow was opened (monotonic clock). Raises
        :class:`TrafficLogError` when the write fails under ``fail-closed`` (the flow is
        closed all the same).
        """
        with self._lock:
            if self._closed:
                return
            total_in = self.bytes_in if bytes_in is None else bytes_in
            total_out = self.bytes_out if bytes_out is None else bytes_out
            for name, value, read in (
                ("bytes_in", total_in, self.bytes_in),
                ("bytes_out", total_out, self.bytes_out),
            ):
                if not 0 <= value <= read:
                    raise ValueError(
                        f"flow {self.conn_id}: delivered {name}={value} must be between 0 "
                        f"and the {read} bytes read"
                    )
            if cut and not error:
                error = CUT_ERROR
            self._closed = True
            duration_ms = (time.monotonic_ns() - self._started_ns) // 1_000_000
            line = None
            if self._log.writes_records:
                line = close_record(
                    conn_id=self.conn_id,
                    bytes_in=total_in,
                    bytes_out=total_out,
                    duration_ms=duration_ms,
                    error=error,
                    t=time.time_ns(),
                )
            self._log._write_close(self, line)
