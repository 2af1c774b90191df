"""Where traffic-log records go.

* :class:`FileSink`: a regular file, written in the caller's thread with one ``os.write``
  per record (the page cache keeps it through a crash of the process), rotated by size.
* :class:`StreamSink`: standard output, a pipe or a socket -- how a container runtime and
  a cluster's log pipeline collect a container's log. Records go to a bounded in-memory
  queue that a writer thread drains, so a stalled reader never blocks the data path or
  the event loop: the queue fills instead, and the log's policy decides (``fail-closed``:
  new flows are refused and established flows pause until it drains; ``continue``: records
  that do not fit are counted and reported by a ``gap`` record).

Each sink keeps its own *gap*: the records it could not write since its last successful
write, by kind and ``log_seq`` range, reported by a ``gap`` line written before the next
record that gets through.
"""

from __future__ import annotations

import collections
import contextlib
import errno as _errno
import fcntl
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tsnet2.traffic.files import open_append, rotate
from tsnet2.traffic.records import gap_record

__all__ = ["FileSink", "Result", "Sink", "StreamSink", "errno_reason"]

log = logging.getLogger("tsnet2.traffic")

_ROTATE_RETRY = 10.0  # seconds between rotation attempts after one failed
_BATCH_BYTES = 1 << 20  # at most this much per write of the stream writer
_POLL_MS = 100  # the stream writer looks at close/abandon this often while the reader stalls
_MARK = "\0gap"  # a queue entry: write the pending gap record here


def errno_reason(exc: OSError) -> str:
    """A short, bounded label for a write failure (an errno name such as ``ENOSPC``)."""
    if exc.errno is None:
        return "OSError"
    return _errno.errorcode.get(exc.errno, f"errno{exc.errno}")


@dataclass
class Result:
    """What one write to a sink did (hooks and log lines are handled by the caller)."""

    error: OSError | None = None
    """The record could not be written to this sink (it is counted in the sink's gap)."""
    became_unhealthy: bool = False
    recovered: int = 0
    """A gap record reporting this many lost records was written first."""


class Sink:
    """Gap bookkeeping shared by both sinks; callers hold the sink's lock."""

    def __init__(self, label: str, *, named: bool) -> None:
        self.label = label
        """``file`` or ``stdout`` (what the log calls it in gap records and messages)."""
        self.named = named  # the log has two sinks: gap records name theirs
        self.healthy = True
        self.gap: dict[str, int] = {}
        self.gap_since = 0
        self.gap_error = ""
        self.gap_first: int | None = None
        self.gap_last: int | None = None
        self.last_errno: int | None = None

    def lose(self, kind: str, seq: int | None, error: str, errno: int | None = None) -> None:
        """Count one record that this sink could not write."""
        if not self.gap:
            self.gap_since = time.time_ns()
        self.gap[kind] = self.gap.get(kind, 0) + 1
        if seq is not None:
            self.gap_first = seq if self.gap_first is None else min(self.gap_first, seq)
            self.gap_last = seq if self.gap_last is None else max(self.gap_last, seq)
        self.gap_error = error
        self.last_errno = errno

    def gap_line(self) -> bytes:
        """The pending ``gap`` record (there must be one)."""
        return gap_record(dropped=self.gap, error=self.gap_error, since=self.gap_since,
                          t=time.time_ns(), first_seq=self.gap_first, last_seq=self.gap_last,
                          sink=self.label if self.named else None)

    def gap_written(self) -> int:
        """The pending gap record was written: forget it; return how many it reported."""
        n = sum(self.gap.values())
        self.gap = {}
        self.gap_first = self.gap_last = None
        return n

    def take_gap(self) -> tuple[bytes, _Taken]:
        """The pending gap record's line, and its counts taken out of the sink: losses
        counted while it is being written start a new gap instead of vanishing with it.
        :meth:`put_back` them if the line could not be written."""
        line = self.gap_line()
        taken = _Taken(self.gap, self.gap_since, self.gap_first, self.gap_last)
        self.gap_written()
        return line, taken

    def put_back(self, taken: _Taken) -> None:
        """Merge a gap record that could not be written back into the pending one."""
        self.gap_since = min(self.gap_since, taken.since) if self.gap else taken.since
        for kind, n in taken.kinds.items():
            self.gap[kind] = self.gap.get(kind, 0) + n
        for seq in (taken.first, taken.last):
            if seq is not None:
                self.gap_first = seq if self.gap_first is None else min(self.gap_first, seq)
                self.gap_last = seq if self.gap_last is None else max(self.gap_last, seq)


@dataclass
class _Taken:
    """A gap taken out of a sink while its record is written (:meth:`Sink.take_gap`)."""

    kinds: dict[str, int]
    since: int
    first: int | None
    last: int | None


class FileSink(Sink):
    """A file (or a non-pipe stdout) written in the caller's thread; see the module doc.

    A record is written whole or not at all: a short write followed by an error is
    truncated away (regular files) or ended by a newline before the next record.
    """

    def __init__(self, path: str | None, *, fd: int | None = None, max_bytes: int | None = None,
                 keep: int = 5, label: str = "file", named: bool = False) -> None:
        super().__init__(label, named=named)
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.rotations = 0
        self._fd = fd
        self._owns_fd = fd is None
        self._regular = False
        self._size = 0
        self._torn = False
        self._rotate_after = 0.0

    def open(self) -> None:
        """Open (create, 0600) the file for appending. Raises :class:`OSError`."""
        if self._fd is None:
            if self.path is None:
                raise ValueError(f"traffic log sink {self.label}: neither a path nor a "
                                 "descriptor to write to")
            self._fd = open_append(self.path)
            try:
                st = os.fstat(self._fd)
            except OSError:
                os.close(self._fd)
                self._fd = None
                raise
            self._regular = stat.S_ISREG(st.st_mode)
            self._size = st.st_size

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self._owns_fd:
            os.close(fd)

    def write(self, kind: str, seq: int | None, line: bytes) -> Result:
        """Write (the pending gap record, then) ``line``; the log's lock is held."""
        out = Result()
        try:
            if self.gap:
                self._append(self.gap_line())
                out.recovered = self.gap_written()
            self._append(line)
        except OSError as exc:
            self.lose(kind, seq, f"{errno_reason(exc)}: {exc.strerror or exc}", exc.errno)
            out.error = exc
            out.became_unhealthy = self.healthy
            self.healthy = False
            return out
        self.healthy = True
        return out

    def probe(self) -> Result | None:
        """Write the pending gap record, if any; None when there was nothing to do."""
        if self._fd is None or not self.gap:
            return None
        out = Result()
        try:
            self._append(self.gap_line())
        except OSError as exc:
            self.gap_error = f"{errno_reason(exc)}: {exc.strerror or exc}"
            self.last_errno = exc.errno
            out.error = exc
            return out
        out.recovered = self.gap_written()
        self.healthy = True
        return out

    def _append(self, line: bytes) -> None:
        """Write all of ``line`` or nothing."""
        if self._torn:
            line = b"\n" + line  # end the fragment a failed truncate left behind
        fd = self._fd
        if fd is None:
            raise OSError(_errno.EBADF, "the traffic log is closed")
        if self.max_bytes is not None and self.path is not None and self._regular and (
                self._owns_fd):
            fd = self._maybe_rotate(fd, self.path, self.max_bytes, len(line))
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
        if self._regular:
            try:
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                return
            except OSError as exc:
                log.error("traffic log %s: cannot remove a partial record: %s", self.path, exc)
        self._torn = True

    def _maybe_rotate(self, fd: int, path: str, max_bytes: int, nbytes: int) -> int:
        """Rotate ``path`` (open as ``fd``) if ``nbytes`` more would pass ``max_bytes``;
        return the descriptor to write to."""
        if self._size == 0 or self._size + nbytes <= max_bytes:
            return fd
        self._size = os.fstat(fd).st_size  # resync if someone truncated the file
        if self._size == 0 or self._size + nbytes <= max_bytes:
            return fd
        if time.monotonic() < self._rotate_after:
            return fd
        try:
            new_fd = rotate(path, self.keep)
        except OSError as exc:
            self._rotate_after = time.monotonic() + _ROTATE_RETRY
            log.error("traffic log %s: rotation failed (%s); still writing to the current "
                      "file, next try in %.0fs", path, exc, _ROTATE_RETRY)
            return fd
        self._fd = new_fd
        os.close(fd)
        self._size = 0
        self.rotations += 1
        return new_fd


class StreamSink(Sink):
    """Standard output, a pipe or a socket, drained by a writer thread; see the module doc.

    ``limit``: bytes the queue may hold. Under ``fail-closed`` the sink is *stalled* from
    half of it until it drains to a quarter (flows pause, new flows are refused), and a
    ``data`` or ``open`` record that would pass ``limit`` is refused (:meth:`admits`);
    ``close`` and ``checkpoint`` records are always queued (there is one close per flow).
    Under ``continue`` a record that does not fit is lost and counted.

    Callbacks, called by the writer thread without the sink's lock: ``on_pressure(False)``
    when a stall ends, ``on_lost(kind, reason, n)`` for records a failed write lost,
    ``on_health(healthy, error, recovered)``. (:meth:`offer` returns its news instead.)
    """

    def __init__(self, fd: int, *, limit: int, fail_closed: bool, label: str = "stdout",
                 named: bool = False) -> None:
        super().__init__(label, named=named)
        if limit < 1:
            raise ValueError(f"the stream buffer must be >= 1 byte, got {limit}")
        self.fd = fd
        self.limit = limit
        self.fail_closed = fail_closed
        self.high = max(1, limit // 2)
        self.low = limit // 4
        self.on_pressure: Callable[[bool], None] | None = None
        self.on_lost: Callable[[str, str, int], None] | None = None
        self.on_health: Callable[[bool, str, int], None] | None = None
        self.queued = 0
        """Bytes waiting in the queue."""
        self.stalled = False
        """Fail-closed: the queue passed half of ``limit`` and has not drained to a quarter."""
        self._q: collections.deque[tuple[str, int | None, bytes]] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abandon = False
        self._torn = False
        self._restore_flags: int | None = None
        self._thread: threading.Thread | None = None
        self._poll = False
        self._retry = False
        self._marked = False  # a gap marker waits in the queue

    def start(self) -> None:
        """Start the writer thread (sets O_NONBLOCK on a pipe or socket; restored at close)."""
        st = os.fstat(self.fd)
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
                self._restore_flags = flags
            self._poll = True
        self._thread = threading.Thread(target=self._run, name=f"traffic-log {self.label}",
                                        daemon=True)
        self._thread.start()

    # ---- the caller's side (the log's lock is held) ----------------------------------

    def admits(self, nbytes: int) -> bool:
        """Fail-closed: True when a ``data``/``open`` record of ``nbytes`` may be queued."""
        with self._cond:
            return self.healthy and not self._closing and self.queued + nbytes <= self.limit

    def offer(self, kind: str, seq: int | None, line: bytes, *,
              always: bool = False) -> tuple[str, bool]:
        """Queue ``line``. Returns ``(lost, stalled_now)``: ``lost`` is "" when queued, else
        why it was lost (``queue_full``, ``not_open``; counted in the gap); ``stalled_now``
        when this record started a stall. The caller reports both (no callback here: the
        caller holds its own lock).

        ``always``: queue it even past ``limit`` (close and checkpoint records).
        """
        n = len(line)
        with self._cond:
            if self._closing:
                self.lose(kind, seq, "closed")
                return "not_open", False
            if not always and self.queued + n > self.limit:
                self.lose(kind, seq, f"queue full: {self.queued} bytes wait for the reader of "
                                     f"{self.label}")
                if not self._marked:  # the gap record goes where the first loss would have
                    self._q.append((_MARK, None, b""))
                    self._marked = True
                return "queue_full", False
            was_empty = not self._q
            self._q.append((kind, seq, line))
            self.queued += n
            stalled_now = False
            if self.fail_closed and not self.stalled and self.queued >= self.high:
                self.stalled = stalled_now = True
            if was_empty:
                self._cond.notify()
            return "", stalled_now

    def kick(self) -> None:
        """Ask the writer to write a pending gap record now (recovery after an error)."""
        with self._cond:
            self._retry = True
            self._cond.notify()

    def close(self, timeout: float) -> int:
        """Let the writer drain the queue for up to ``timeout`` seconds, then stop it.

        Returns how many queued records never reached the stream (0 when it drained).
        """
        with self._cond:
            self._closing = True
            self._cond.notify()
        t = self._thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                with self._cond:
                    self._abandon = True
                    self._cond.notify()
                t.join(1.0 if self._poll else 0.05)
        with self._cond:
            left = sum(1 for kind, _, _ in self._q if kind != _MARK)
            for kind, seq, _ in self._q:
                if kind != _MARK:
                    self.lose(kind, seq, "closed")
            self._q.clear()
            self.queued = 0
        if self._restore_flags is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self._restore_flags)
            self._restore_flags = None
        return left

    # ---- the writer thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._q and not self._closing and not self._retry
                       and not (self.gap and self.healthy)):
                    self._cond.wait()
                self._retry = False
                if self._abandon or (self._closing and not self._q):
                    return
                batch: list[tuple[str, int | None, bytes]] = []
                size = 0
                gap, taken = b"", None
                if self._q and self._q[0][0] == _MARK:
                    self._q.popleft()
                    self._marked = False
                    if self.gap:
                        gap, taken = self.take_gap()
                elif self.gap and not self._marked:  # losses of a failed write
                    gap, taken = self.take_gap()
                while (self._q and self._q[0][0] != _MARK
                       and (not batch or size + len(self._q[0][2]) <= _BATCH_BYTES)):
                    item = self._q.popleft()
                    batch.append(item)
                    size += len(item[2])
            self._write_batch(batch, gap, taken, size)

    def _write_batch(self, batch: list[tuple[str, int | None, bytes]], gap: bytes,
                     taken: _Taken | None, size: int) -> None:
        prefix = (b"\n" if self._torn else b"") + gap
        data = prefix + b"".join(line for _, _, line in batch)
        written, error = self._write_all(data)
        if error is None:
            self._torn = False
        elif written:
            self._torn = True
        # Which records got through whole.
        done = max(0, written - len(prefix))
        ok = 0
        acc = 0
        for _, _, line in batch:
            if acc + len(line) > done:
                break
            acc += len(line)
            ok += 1
        gap_ok = gap != b"" and written >= len(prefix)
        lost = batch[ok:]
        stalled_over = False
        recovered = 0
        became_unhealthy = became_healthy = False
        with self._cond:
            self.queued -= size
            if taken is not None:
                if gap_ok:
                    recovered = sum(taken.kinds.values())
                else:
                    self.put_back(taken)
            if error is not None:
                why = ("closed" if self._abandon else
                       f"{errno_reason(error)}: {error.strerror or error}")
                for kind, seq, _ in lost:
                    self.lose(kind, seq, why, error.errno)
                became_unhealthy = self.healthy and not self._abandon
                if not self._abandon:
                    self.healthy = False
            elif not self.healthy:
                self.healthy = became_healthy = True
            if self.stalled and self.queued <= self.low:
                self.stalled = False
                stalled_over = True
        if lost and self.on_lost is not None:
            # the same reasons a failed file write reports: an errno name (ENOSPC, EPIPE...)
            reason = "not_open" if self._abandon or error is None else errno_reason(error)
            kinds: dict[str, int] = {}
            for kind, _, _ in lost:
                kinds[kind] = kinds.get(kind, 0) + 1
            for kind, n in kinds.items():
                self.on_lost(kind, reason, n)
        if (became_unhealthy or became_healthy or recovered) and self.on_health is not None:
            self.on_health(self.healthy, self.gap_error, recovered)
        if stalled_over and self.on_pressure is not None:
            self.on_pressure(False)

    def _write_all(self, data: bytes) -> tuple[int, OSError | None]:
        """Write ``data``; return the bytes written and the error that stopped it (EPIPE
        for a reader that is gone; ETIMEDOUT when abandoned at close)."""
        view = memoryview(data)
        written = 0
        while written < len(data):
            try:
                n = os.write(self.fd, view[written:])
            except BlockingIOError:
                n = 0
            except OSError as exc:
                return written, exc
            if n > 0:
                written += n
                continue
            if self._abandon:
                return written, OSError(_errno.ETIMEDOUT,
                                        "the reader did not drain the log at close")
            if not self._poll:
                return written, OSError(_errno.EIO, "write returned 0")
            p = select.poll()
            p.register(self.fd, select.POLLOUT)
            events = p.poll(_POLL_MS)
            if events and events[0][1] & select.POLLERR:
                return written, OSError(_errno.EPIPE, "the reader closed the stream")
        return written, None
