"""Splice an app's Unix socket to a tailnet TCP socket, teeing every byte into the log.

A flow is two asyncio protocols joined back to back, no task per flow: bytes read on one side
are recorded (`Flow.data`) *before* they are written to the other side. Flow control uses the
transports' own watermarks: when one side's write buffer fills, the other side stops reading.
EOF is passed on as a half-close (`write_eof`), so a peer that shuts down its write side still
gets the app's reply. The flow ends when both directions are done or either socket fails; the
`close` record is written exactly once with the first real error.

The two sockets are attached one after the other, and the first may already have bytes (a
client sends its request right after connecting). Whatever the first side reads before the
second is attached is *held* (reading paused after one chunk) and forwarded, EOF and errors
included, once both are there. This does not rely on `pause_reading()` from
`connection_made()`, which CPython before 3.11.4 silently ignores (gh-103607; Debian
bookworm ships 3.11.2): the transport starts reading anyway, and a flow whose first bytes
arrived in that window used to die with an `AssertionError`.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Literal, cast

from tsnet2.daemon.io import linger_zero
from tsnet2.traffic import Flow, TrafficLogError

log = logging.getLogger("tsnet2d.splice")

Direction = Literal["app->peer", "peer->app"]

# Large enough that a bulk transfer stays in few syscalls; small enough to bound the memory
# a stalled flow can pin (two buffers of this size at most per flow).
HIGH_WATER = 256 * 1024


def describe_error(exc: BaseException) -> str:
    """An exception as words for a `close` record, never empty.

    ``ECONNRESET: Connection reset by peer`` for an OS error (the errno's name, as in `gap`
    records); ``TypeName: message``, or just ``TypeName`` when the message is empty, otherwise.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        return f"{name}: {exc.strerror or type(exc).__name__}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Side(asyncio.Protocol):
    """One socket of a spliced flow."""

    def __init__(self, splice: Splice, direction: Direction) -> None:
        self.splice = splice
        self.direction = direction  # the direction of bytes READ on this side
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.lost = False
        self.lost_exc: Exception | None = None
        self.held: list[bytes] = []  # read before the other side was attached
        self.writing_paused = False  # our transport's buffer is over the high-water mark
        self.sent = 0  # bytes handed to this side's transport (toward this side's socket)
        self.unsent = 0  # of those, bytes that never reached the kernel (lost on a reset)
        self._pending_hint = 0  # write buffer size after our last write

    @property
    def other(self) -> _Side:
        """The flow's other socket."""
        return self.splice.peer if self is self.splice.app else self.splice.app

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (connect_accepted_socket makes one). No isinstance check:
        # uvloop's transports do not subclass asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        # No pause_reading() here: CPython < 3.11.4 ignores it (see the module docstring).
        # The first side holds what it reads until the second is attached.
        if self.splice.attached:
            self.splice.attached_both()

    def data_received(self, data: bytes) -> None:
        if not self.splice.attached:
            self.held.append(data)
            if self.transport is None:
                raise AssertionError("unreachable: asyncio calls connection_made first")
            self.transport.pause_reading()  # effective here on every version
            return
        self.splice.forward(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.splice.attached:
            self.splice.side_eof(self)
        return True  # keep our write side open: half-close

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.other.transport is not None and not self.splice.log_paused:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        if exc is not None and not self.unsent:
            # A failed write already dropped the buffer; what was queued after our last
            # write is the best bound on what never left.
            self.unsent = self._pending_hint
        self.splice.side_lost(self, exc)

    def write(self, data: bytes) -> None:
        if self.transport is None:
            raise AssertionError("unreachable: bytes are written only to an attached side")
        self.transport.write(data)
        self.sent += len(data)
        self._pending_hint = self.transport.get_write_buffer_size()

    def reset(self) -> None:
        """Abort this side, remembering what was still queued (so it is not counted)."""
        if self.transport is not None and not self.lost:
            self.unsent = self.transport.get_write_buffer_size()
            sock = self.transport.get_extra_info("socket")
            if sock is not None and sock.family != socket.AF_UNIX:
                linger_zero(sock)  # the tailnet peer gets a RST, not a clean FIN
            self.transport.abort()

    @property
    def delivered(self) -> int:
        """Bytes that reached this side's socket."""
        return self.sent - self.unsent


class Relay(abc.ABC):
    """A running flow between an app's socket and a tailnet socket; await `done` for its
    end. The daemon's two relays share this: `Splice` (copying) and
    `tsnet2.daemon.zerocopy.PipeSplice` (splice(2))."""

    def __init__(
        self,
        flow: Flow,
        *,
        on_bytes: Callable[[Direction, int], None] | None = None,
        on_close: Callable[[Relay], None] | None = None,
    ) -> None:
        """``on_bytes(direction, n)`` for every read forwarded; ``on_close(relay)`` once,
        after the ``close`` record."""
        self.flow = flow
        self.on_bytes = on_bytes
        self.on_close = on_close
        self.cut = False
        self.error: str | None = None  # the first error, as the close record names it
        self.log_paused = False  # the traffic log cannot keep up: neither side reads
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @abc.abstractmethod
    async def start(
        self, app_sock: socket.socket, peer_sock: socket.socket, pending: bytes = b""
    ) -> None:
        """Attach both sockets (the relay owns them from now on); `pending` holds app bytes
        read along with the header, sent to the peer first."""

    @abc.abstractmethod
    def pause_for_log(self, paused: bool) -> None:
        """Stop (or resume) reading both sockets while the traffic log's stdout reader is
        behind, so no flow outruns the log (fail-closed)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """End the flow now (daemon shutdown): both sockets are reset."""

    def _mark_cut(self) -> None:
        """The daemon ends this flow: `result` is "cut", and the close record says why."""
        self.cut = True
        if self.error is None:
            self.error = "daemon: flow cut by shutdown"

    @property
    def result(self) -> Literal["ok", "error", "cut"]:
        """How the flow ended: "ok", "error" (a socket failed) or "cut" (shutdown)."""
        if self.cut:
            return "cut"
        return "error" if self.error else "ok"


class Splice(Relay):
    """The copying relay: two asyncio protocols back to back (see the module docstring)."""

    def __init__(
        self,
        flow: Flow,
        *,
        on_bytes: Callable[[Direction, int], None] | None = None,
        on_close: Callable[[Relay], None] | None = None,
    ) -> None:
        super().__init__(flow, on_bytes=on_bytes, on_close=on_close)
        self.app = _Side(self, "app->peer")
        self.peer = _Side(self, "peer->app")

    @property
    def attached(self) -> bool:
        """True once both sockets have their transports (bytes can go both ways)."""
        return self.app.transport is not None and self.peer.transport is not None

    async def start(
        self, app_sock: socket.socket, peer_sock: socket.socket, pending: bytes = b""
    ) -> None:
        """Attach both sockets; `pending` holds app bytes read along with the header."""
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: self.peer, peer_sock)
        await self._attach_app(app_sock, pending)

    async def _attach_app(self, app_sock: socket.socket, pending: bytes) -> None:
        """With the peer side attached: forward ``pending`` (app bytes read along with the
        header), then attach the app's socket; a log that refuses ``pending`` ends the flow
        before the app is attached."""
        if pending:
            self.forward(self.app, pending)
            if self.error is not None:  # the log refused the early bytes: never attach
                app_sock.close()
                self.app.lost = True
                self.side_lost(self.app, None)
                return
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self.app, app_sock)

    def pause_for_log(self, paused: bool) -> None:
        """Stop (or resume) reading both sockets while the traffic log's stdout reader is
        behind, so no flow outruns the log (fail-closed). Sides held before attaching, or
        paused by the other side's full buffer, stay paused."""
        self.log_paused = paused
        for side in (self.app, self.peer):
            t = side.transport
            if t is None or side.lost or t.is_closing():
                continue
            if paused:
                t.pause_reading()
            elif self.attached and not side.held and not side.other.writing_paused:
                t.resume_reading()

    def attached_both(self) -> None:
        """The second socket is attached: pass on what the first one held, then run."""
        for side in (self.peer, self.app):
            other, transport = side.other, side.transport
            if transport is None:
                raise AssertionError("unreachable: both sides are attached now")
            held, side.held = side.held, []
            for data in held:
                if self.error is not None:
                    return  # the log refused bytes: both sides are being reset
                self.forward(side, data)
            if side.lost:
                # It ended before the other side was there: end the other side now.
                self._pass_on_loss(side, side.lost_exc)
            elif side.eof:
                self.side_eof(side)
            elif held and not other.writing_paused and not self.log_paused:
                transport.resume_reading()

    def record(self, side: _Side, data: bytes) -> bool:
        """Log ``data`` read from ``side`` and count it; False (and the flow is cut) when
        the traffic log cannot take it: bytes that cannot be recorded are not forwarded."""
        try:
            self.flow.data(side.direction, data)
        except TrafficLogError as exc:
            self.error = f"traffic log: {exc}"
            self.app.reset()
            self.peer.reset()
            return False
        if self.on_bytes is not None:
            self.on_bytes(side.direction, len(data))
        return True

    def forward(self, side: _Side, data: bytes) -> None:
        other = side.other
        if not self.record(side, data):
            return
        if other.transport is None:
            raise AssertionError("unreachable: reading starts only once both are attached")
        if not other.transport.is_closing():
            other.write(data)

    def side_eof(self, side: _Side) -> None:
        other = side.other
        if other.transport is not None and not other.transport.is_closing():
            if other.transport.can_write_eof():
                other.transport.write_eof()
            else:
                other.transport.close()
        if self.app.eof and self.peer.eof:
            self._close_both()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = f"{side.direction.split('->')[0]}: {describe_error(exc)}"
        other = side.other
        if other.transport is None and not other.lost:
            return  # the other side is still to come: attached_both() passes the loss on
        self._pass_on_loss(side, exc)
        if self.app.lost and self.peer.lost:
            # bytes_in went peer->app (delivered to the app side), bytes_out app->peer.
            try:
                self.flow.close(self.error, bytes_in=self.app.delivered,
                                bytes_out=self.peer.delivered, cut=self.cut)
            except TrafficLogError as exc:
                log.error("traffic log: close record of %s lost: %s", self.flow.conn_id, exc)
            if self.on_close is not None:
                self.on_close(self)
            if not self.done.done():
                self.done.set_result(None)

    def _pass_on_loss(self, side: _Side, exc: Exception | None) -> None:
        other = side.other
        if not other.lost and other.transport is not None:
            if exc is not None:
                other.reset()
            elif not (side.eof and other.eof):
                # Closed without a clean half-close from this side: end the other side too.
                other.transport.close()

    def _close_both(self) -> None:
        for s in (self.app, self.peer):
            if s.transport is not None and not s.transport.is_closing():
                s.transport.close()

    def abort(self) -> None:
        """End the flow now (daemon shutdown): both sockets are reset."""
        self._mark_cut()
        for s in (self.app, self.peer):
            s.reset()
