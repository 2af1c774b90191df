"""Relay a flow with `splice(2)`, the bytes never entering Python, when the log needs no payload.

In traffic-log modes ``metadata`` and ``off`` the daemon needs each read's *length*, not its
bytes. A `PipeSplice` then moves bytes socket → pipe → socket inside the kernel: one
``splice`` from the source socket into a pipe (the read, counted and recorded with
`Flow.count` before anything goes on), then ``splice`` from the pipe to the destination
socket until the pipe is empty. It behaves like the copying `Splice` (``splice.py``) in
every way a client or the log can see: half-closes are passed on, the first socket error
ends the flow and resets the other socket, the ``close`` record counts the bytes delivered,
a traffic log that cannot record a read (fail-closed) cuts the flow before those bytes go
on, and reading stops while the log's stdout is behind.

Event-driven, no task per flow: each socket has at most one reader (its outgoing
direction) and one writer (the other direction, only while the destination is full) on the
event loop. A reader stays registered while its direction flows, so a request/response
flow costs two syscalls per hop, like `recv` + `send`.

Pipes are taken from a `PipePool` only while a direction has bytes in flight and go back
empty, so idle flows hold no pipe: 8,000 open flows need no more descriptors than with the
copying relay. A direction that finds no pipe (the pool's limit, or the process is out of
descriptors) copies that read through a buffer instead, which keeps it correct, only
slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Callable
from typing import Literal

from tsnet2.daemon.io import reset
from tsnet2.daemon.splice import Direction, Relay, describe_error
from tsnet2.traffic import Flow, TrafficLogError

log = logging.getLogger("tsnet2d.zerocopy")

PIPE_SIZE = 256 * 1024  # bytes one splice moves at most (the copying relay's high-water mark)
COPY_SIZE = 64 * 1024  # one read when no pipe is free
POOL_KEEP = 64  # empty pipes kept for reuse
POOL_LIMIT = 1024  # pipes in use at once (2 descriptors each); beyond, reads are copied
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

Pipe = tuple[int, int]  # (read end, write end)
RelayMode = Literal["auto", "copy"]  # tsnet2d --relay


def available() -> bool:
    """True where `os.splice` exists (Linux, Python 3.10+)."""
    return hasattr(os, "splice")


class PipePool:
    """Non-blocking pipes for zero-copy relays, reused while empty.

    `take` returns a pipe, or None when `limit` pipes are in use or the process cannot
    open another (then the caller copies). `give` takes it back; a pipe that may still
    hold bytes goes back with ``dirty=True`` and is closed, never reused.
    """

    def __init__(self, *, keep: int = POOL_KEEP, limit: int = POOL_LIMIT,
                 size: int = PIPE_SIZE) -> None:
        self.keep = keep
        self.limit = limit
        self.size = size
        self.in_use = 0
        self._free: list[Pipe] = []

    def take(self) -> Pipe | None:
        """An empty pipe, or None (limit reached, or no descriptor left)."""
        if self.in_use >= self.limit:
            return None
        if self._free:
            pipe = self._free.pop()
        else:
            try:
                pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:  # EMFILE/ENFILE: copy instead
                log.debug("no pipe for a zero-copy read: %s", exc)
                return None
            with contextlib.suppress(OSError):  # keeps the default size when refused
                fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, self.size)
        self.in_use += 1
        return pipe

    def give(self, pipe: Pipe, *, dirty: bool = False) -> None:
        """Return a pipe taken with `take`; ``dirty``: it may hold bytes (close it)."""
        self.in_use -= 1
        if dirty or len(self._free) >= self.keep:
            _close_pipe(pipe)
        else:
            self._free.append(pipe)

    def clear(self) -> None:
        """Close the pipes kept for reuse (those in use come back later)."""
        while self._free:
            _close_pipe(self._free.pop())

    @property
    def kept(self) -> int:
        """Empty pipes kept for reuse."""
        return len(self._free)


def _close_pipe(pipe: Pipe) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Dir:
    """One direction of a flow: bytes read from `src`, written to `dst`."""

    __slots__ = ("buf", "delivered", "direction", "dst", "dst_name", "eof", "inpipe", "pipe",
                 "reading", "shut", "src", "src_name", "writing")

    def __init__(self, direction: Direction, src: socket.socket, dst: socket.socket) -> None:
        self.direction: Direction = direction
        self.src = src
        self.dst = dst
        self.src_name, _, self.dst_name = direction.partition("->")  # "app" / "peer"
        self.pipe: Pipe | None = None  # holds `inpipe` bytes read but not yet written
        self.inpipe = 0
        self.buf: memoryview | None = None  # copied bytes not yet written (no pipe free)
        self.reading = False  # a reader is registered on src
        self.writing = False  # a writer is registered on dst (dst was full)
        self.eof = False  # src reached EOF
        self.shut = False  # the EOF was passed on (dst shut down for writing)
        self.delivered = 0  # bytes written to dst

    @property
    def in_flight(self) -> bool:
        """Bytes read and not yet written."""
        return self.inpipe > 0 or self.buf is not None


class PipeSplice(Relay):
    """The zero-copy relay: an app's Unix socket and a tailnet TCP socket joined with
    splice(2) through pooled pipes."""

    def __init__(
        self,
        flow: Flow,
        pool: PipePool,
        *,
        on_bytes: Callable[[Direction, int], None] | None = None,
        on_close: Callable[[Relay], None] | None = None,
    ) -> None:
        super().__init__(flow, on_bytes=on_bytes, on_close=on_close)
        self.pool = pool
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self._out: _Dir | None = None  # app->peer
        self._in: _Dir | None = None  # peer->app

    async def start(
        self, app_sock: socket.socket, peer_sock: socket.socket, pending: bytes = b""
    ) -> None:
        """Attach both sockets (the splice owns them from now on); `pending` holds app bytes
        read along with the header, sent to the peer first."""
        app_sock.setblocking(False)
        peer_sock.setblocking(False)
        self._out = out = _Dir("app->peer", app_sock, peer_sock)
        self._in = inn = _Dir("peer->app", peer_sock, app_sock)
        if pending:
            out.buf = memoryview(pending)
            if not self._account(out, len(pending), pending):
                return
            self._flush(out)
        else:
            self._want_read(out)
        if not self.finished:
            self._want_read(inn)

    def pause_for_log(self, paused: bool) -> None:
        """Stop (or resume) reading both sockets while the traffic log's stdout reader is
        behind (fail-closed). Bytes already read and recorded still go on."""
        self.log_paused = paused
        for d in (self._out, self._in):
            if d is not None:
                self._want_read(d)

    def abort(self) -> None:
        """End the flow now (daemon shutdown): both sockets are reset."""
        if self.finished:
            return
        self._mark_cut()
        self._finish(reset_both=True)

    # ---- event handlers ----------------------------------------------------------------

    def _on_readable(self, d: _Dir) -> None:
        try:
            self._read(d)
        except Exception as exc:  # a bug must end this flow, not spin the loop
            log.exception("flow %s: relay failed", self.flow.conn_id)
            self._fail("daemon", exc)

    def _on_writable(self, d: _Dir) -> None:
        try:
            self._flush(d)
        except Exception as exc:
            log.exception("flow %s: relay failed", self.flow.conn_id)
            self._fail("daemon", exc)

    # ---- one direction -----------------------------------------------------------------

    def _read(self, d: _Dir) -> None:
        if self.finished or d.in_flight or d.eof:
            self._want_read(d)
            return
        pipe = self.pool.take()
        if pipe is not None:
            try:
                n = os.splice(d.src.fileno(), pipe[1], self.pool.size, flags=_FLAGS)
            except (BlockingIOError, InterruptedError):
                self.pool.give(pipe)
                return
            except OSError as exc:
                self.pool.give(pipe, dirty=True)
                self._fail(d.src_name, exc)
                return
            if n == 0:
                self.pool.give(pipe)
                self._src_eof(d)
                return
            d.pipe, d.inpipe = pipe, n
            if not self._account(d, n, None):
                return
        else:
            try:
                data = d.src.recv(COPY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(d.src_name, exc)
                return
            if not data:
                self._src_eof(d)
                return
            d.buf = memoryview(data)
            if not self._account(d, len(data), data):
                return
        self._flush(d)

    def _account(self, d: _Dir, n: int, data: bytes | None) -> bool:
        """Record `n` bytes read on `d` before they go on; False when the log refused them
        (fail-closed: the flow is cut and the bytes are dropped)."""
        try:
            if data is None:
                self.flow.count(d.direction, n)
            else:
                self.flow.data(d.direction, data)
        except TrafficLogError as exc:
            self.error = f"traffic log: {exc}"
            self._finish(reset_both=True)
            return False
        if self.on_bytes is not None:
            self.on_bytes(d.direction, n)
        return True

    def _flush(self, d: _Dir) -> None:
        """Write what `d` holds; wait for the destination when it is full."""
        if self.finished:
            return
        dst = d.dst.fileno()
        while d.inpipe and d.pipe is not None:
            try:
                m = os.splice(d.pipe[0], dst, d.inpipe, flags=_FLAGS)
            except (BlockingIOError, InterruptedError):
                m = 0
            except OSError as exc:
                self._fail(d.dst_name, exc)
                return
            if m == 0:
                self._wait_writable(d)
                return
            d.inpipe -= m
            d.delivered += m
        while d.buf is not None:
            try:
                m = d.dst.send(d.buf)
            except (BlockingIOError, InterruptedError):
                m = 0
            except OSError as exc:
                self._fail(d.dst_name, exc)
                return
            if m == 0:
                self._wait_writable(d)
                return
            d.delivered += m
            d.buf = d.buf[m:] if m < d.buf.nbytes else None
        if d.pipe is not None:
            self.pool.give(d.pipe)
            d.pipe = None
        if d.writing:
            self._loop.remove_writer(d.dst)
            d.writing = False
        if d.eof:
            self._pass_eof(d)
        else:
            self._want_read(d)

    def _wait_writable(self, d: _Dir) -> None:
        self._want_read(d)  # stops reading: bytes are in flight
        if not d.writing:
            self._loop.add_writer(d.dst, self._on_writable, d)
            d.writing = True

    def _want_read(self, d: _Dir) -> None:
        """Register or drop `d`'s reader to match its state."""
        want = not (self.finished or self.log_paused or d.eof or d.in_flight)
        if want and not d.reading:
            self._loop.add_reader(d.src, self._on_readable, d)
            d.reading = True
        elif d.reading and not want:
            self._loop.remove_reader(d.src)
            d.reading = False

    def _src_eof(self, d: _Dir) -> None:
        d.eof = True
        self._want_read(d)
        if not d.in_flight:
            self._pass_eof(d)

    def _pass_eof(self, d: _Dir) -> None:
        """`d`'s source ended and everything it sent was written: half-close `d.dst`."""
        if d.shut:
            return
        d.shut = True
        with contextlib.suppress(OSError):  # already gone: the other direction will see it
            d.dst.shutdown(socket.SHUT_WR)
        if self._out is not None and self._in is not None and self._out.shut and self._in.shut:
            self._finish(reset_both=False)

    # ---- the end -----------------------------------------------------------------------

    def _fail(self, side: str, exc: BaseException) -> None:
        if self.error is None:
            self.error = f"{side}: {describe_error(exc)}"
        self._finish(reset_both=True)

    def _finish(self, *, reset_both: bool) -> None:
        """Unregister, close both sockets (with a reset after an error), write the close
        record; exactly once."""
        if self.finished:
            return
        self.finished = True
        dirs = [d for d in (self._out, self._in) if d is not None]
        for d in dirs:
            if d.reading:
                self._loop.remove_reader(d.src)
                d.reading = False
            if d.writing:
                self._loop.remove_writer(d.dst)
                d.writing = False
            if d.pipe is not None:
                self.pool.give(d.pipe, dirty=d.inpipe > 0)
                d.pipe = None
        socks = {id(s): s for d in dirs for s in (d.src, d.dst)}.values()
        for s in socks:
            if reset_both and s.family != socket.AF_UNIX:
                reset(s)  # a RST, so the tailnet peer sees a failure, not a clean end
            else:
                s.close()
        out, inn = self._out, self._in
        try:
            self.flow.close(self.error, bytes_in=inn.delivered if inn else 0,
                            bytes_out=out.delivered if out else 0, cut=self.cut)
        except TrafficLogError as exc:
            log.error("traffic log: close record of %s lost: %s", self.flow.conn_id, exc)
        if self.on_close is not None:
            self.on_close(self)
        if not self.done.done():
            self.done.set_result(None)
