"""Connection limits of the coordination server: a cap, a header timeout, an idle timeout.

aiohttp bounds the size of a request head (``max_line_size``, ``max_field_size``,
``max_headers``) and, with ``handler_cancellation``, cancels a handler whose client went
away. It has no cap on connections, no header timeout apart from its keep-alive timer
(3630 s by default, so idle connections piled up until the process ran out of file
descriptors), and it never closes an idle connection to make room for a new one.

:class:`ConnectionGuard` adds that below aiohttp. Every accepted TCP connection is wrapped
in a small :class:`asyncio.Protocol` (:class:`_Conn`) that hands bytes to aiohttp's protocol
and keeps a deadline:

- a new connection must send its whole first request head within ``header_timeout``
  (the TLS handshake included, which is done here with :meth:`loop.start_tls` so that a
  connection is counted from ``accept()``, not from the end of its handshake);
- between requests, a keep-alive connection may stay idle for ``idle_timeout``; once the
  next request's first byte arrives, its head is due within ``header_timeout``;
- while a request is being handled (head received, the app's middleware running) there is
  no deadline here: the body read has its own (``body_timeout``, in the server) and a netmap
  long-poll ends on its own.

At most ``max_connections`` connections are open. One more is admitted by closing the
connection that has been idle longest (no request in flight: waiting for a head, in a TLS
handshake, or kept alive); only when every connection is busy is the newcomer refused
(``503`` in plain HTTP, closed at once under TLS). Idle connections therefore cannot lock
out real requests. Evictions and refusals are logged at most once per
:data:`PRESSURE_LOG_INTERVAL` seconds.

The guard runs its own accept loop (asyncio's accepts up to ``backlog`` sockets per wake-up
and admits them only a few loop passes later, so a burst of connections could hold several
hundred descriptors beyond any cap). Here a socket counts from ``accept()`` until its
``connection_lost``, and accepting pauses while ``max_connections + ACCEPT_SLACK`` sockets
are held (closed ones included until their descriptor is released); waiting clients stay
in the kernel's listen queue. The server's connection descriptors are therefore never more
than ``max_connections + ACCEPT_SLACK``. ``accept()`` failing for lack of descriptors or
memory (``EMFILE``...) pauses accepting for a second and logs at most once per
:data:`PRESSURE_LOG_INTERVAL`; it never spins.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import resource
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("tsnet2.control")

DEFAULT_MAX_CONNECTIONS = 1024
"""Default cap on open connections."""
DEFAULT_HEADER_TIMEOUT = 10.0
"""Default seconds a client has to send a whole request head (TLS handshake included)."""
DEFAULT_IDLE_TIMEOUT = 30.0
"""Default seconds a keep-alive connection may wait for its next request."""
DEFAULT_BODY_TIMEOUT = 10.0
"""Default seconds a client has to send a request body once its head is in."""
BACKLOG = 128
"""``listen()`` backlog: connections the kernel queues while the server is not accepting."""
ACCEPT_SLACK = 64
"""Sockets held beyond ``max_connections`` (accepted, or closed but not yet released)."""
ACCEPT_BATCH = 64
"""Most ``accept()`` calls per wake-up of a listening socket (fairness to other work)."""
ACCEPT_RETRY_DELAY = 1.0
"""Seconds accepting pauses after ``accept()`` failed with EMFILE, ENFILE, ENOBUFS, ENOMEM."""
FD_RESERVE = ACCEPT_SLACK + 128
"""Descriptors :func:`fd_room` keeps free beyond the cap: the slack, the store, logs..."""
PRESSURE_LOG_INTERVAL = 10.0
"""At most one "connection limit reached" warning per this many seconds."""
TLS_SHUTDOWN_TIMEOUT = 2.0
"""Seconds a TLS close waits for the peer's close_notify."""
MAX_EARLY_BYTES = 256 * 1024
"""TLS bytes buffered between the end of the handshake and the HTTP protocol taking over."""


@dataclass(frozen=True)
class ServerLimits:
    """Connection limits of :class:`~tsnet2.control.server.ControlServer` (see module doc)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT

    def __post_init__(self) -> None:
        """Refuse values that would switch a limit off."""
        if isinstance(self.max_connections, bool) or not (
            isinstance(self.max_connections, int) and self.max_connections >= 1
        ):
            raise ValueError(f"max_connections must be an integer >= 1: {self.max_connections!r}")
        for name in ("header_timeout", "idle_timeout", "body_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number of seconds > 0: {value!r}")


@dataclass
class GuardStats:
    """Counters since start (for tests, logs and metrics)."""

    accepted: int = 0
    """Connections admitted."""
    accept_errors: int = 0
    """``accept()`` failures for lack of descriptors or memory (each pauses accepting)."""
    accept_pauses: int = 0
    """Times accepting paused because ``max_connections + ACCEPT_SLACK`` sockets were held."""
    evicted: int = 0
    """Idle connections closed to admit a new one at the cap."""
    refused: int = 0
    """Connections refused at the cap (every open one busy)."""
    header_timeouts: int = 0
    """Connections closed because a request head (or TLS handshake) took too long."""
    idle_timeouts: int = 0
    """Keep-alive connections closed after ``idle_timeout`` without a request."""
    peak: int = 0
    """Most connections open at once."""


def fd_room(max_connections: int) -> int:
    """How many connections fit under RLIMIT_NOFILE; raise the soft limit if that helps.

    Needs the descriptors open now, ``max_connections`` and :data:`FD_RESERVE`. The soft
    limit is raised (never past the hard one) when short; the result is
    ``max_connections`` or what the hard limit leaves room for (at least 1).
    """
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    need = in_use + max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if new > soft:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - in_use - FD_RESERVE))


class _BadRequestLogThrottle(logging.Filter):
    """aiohttp logs each malformed request (too long a line, bad header...) at ERROR with a
    traceback. Turn those into one WARNING line per :data:`PRESSURE_LOG_INTERVAL` with a
    count, naming only the error class (its message quotes the request's bytes, which may
    hold a credential). Other records pass untouched."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._last = -math.inf
        self._count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        self._count += 1
        now = self._clock()
        if now - self._last < PRESSURE_LOG_INTERVAL:
            return False
        self._last = now
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = (
            "control: %d malformed HTTP requests answered 400 since the last such report "
            "(latest from %s: %s); next report in %g s at the earliest"
        )
        record.args = (self._count, remote, type(exc).__name__, PRESSURE_LOG_INTERVAL)
        record.exc_info = None
        record.exc_text = None
        record.levelno = logging.WARNING
        record.levelname = logging.getLevelName(logging.WARNING)
        self._count = 0
        return True


http_log = logging.getLogger("tsnet2.control.http")
"""The logger given to aiohttp's request handlers (malformed requests: rate-limited)."""
http_log.addFilter(_BadRequestLogThrottle())


def _http_error(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _Conn(asyncio.Protocol):
    """One accepted connection: counts it, keeps its deadline, feeds aiohttp's protocol."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self.raw: asyncio.Transport | None = None
        """The TCP transport (for TLS, under the SSL layer)."""
        self.inner: asyncio.Protocol | None = None
        """aiohttp's protocol, once the connection is open (after the TLS handshake)."""
        self.busy = 0
        """Requests in flight (between the app's outermost middleware entry and exit)."""
        self.head_started = False
        """Bytes of a request head arrived since the connection became idle."""
        self.served = 0
        """Requests handled on this connection."""
        self.lost = False
        self.deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._early: list[bytes] = []
        self._early_size = 0
        self._early_eof = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit (or refuse) the connection; start TLS or hand it to aiohttp."""
        raw = self.raw = cast(asyncio.Transport, transport)
        self._guard._admit(self, raw)

    def data_received(self, data: bytes) -> None:
        """Pass bytes on; the first byte of a head starts the header deadline."""
        inner = self.inner
        if inner is None:
            self._early.append(data)
            self._early_size += len(data)
            if self._early_size > MAX_EARLY_BYTES:
                self.abort()
            return
        if not self.busy and not self.head_started:
            self.head_started = True
            if self.served:  # a kept-alive connection's next head (the first one is due
                # header_timeout after accept(), bytes or not)
                self.arm(self._guard.loop.time() + self._guard.limits.header_timeout)
        inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Pass the half-close on (aiohttp then closes)."""
        if self.inner is None:
            self._early_eof = True
            return True
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; tell aiohttp."""
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._guard._lost(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        """Flow control, for aiohttp."""
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        """Flow control, for aiohttp."""
        if self.inner is not None:
            self.inner.resume_writing()

    # -- ours ----------------------------------------------------------------------------

    def open(self, transport: asyncio.Transport) -> None:
        """Attach aiohttp's protocol to ``transport`` (the TCP or the TLS one)."""
        inner = self._guard._factory()
        self.inner = inner
        self._guard._by_inner[inner] = self
        inner.connection_made(transport)
        early, self._early = self._early, []
        for chunk in early:
            self.data_received(chunk)
        if self._early_eof and not self.lost and not inner.eof_received():
            transport.close()

    async def start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        """Do the TLS handshake over ``raw`` (bounded by ``header_timeout``), then
        :meth:`open`."""
        loop = self._guard.loop
        try:
            transport = await loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self._guard.limits.header_timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as e:
            # start_tls closed the connection; connection_lost follows.
            log.debug("control: TLS handshake failed: %s", e)
            return
        if transport is None or self.lost:
            return
        self.open(transport)

    def arm(self, deadline: float) -> None:
        """Close the connection at ``deadline`` unless it is busy then."""
        self.deadline = deadline
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._guard.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self.lost or self.busy or self not in self._guard._open:
            return
        if self._guard.loop.time() < self.deadline:
            self.arm(self.deadline)
            return
        self._guard._expired(self)

    def abort(self) -> None:
        """Drop the connection now (the descriptor is closed on the next loop pass)."""
        if self.raw is not None and not self.lost:
            self.raw.abort()

    def close_with(self, reply: bytes | None) -> None:
        """Send ``reply`` (plain HTTP only) and close; abort if it cannot be flushed now."""
        raw = self.raw
        if raw is None or self.lost or raw.is_closing():
            self.abort()
            return
        if reply is not None and self._guard.ssl_context is None:
            raw.write(reply)
        if raw.get_write_buffer_size():
            raw.abort()
        else:
            raw.close()


class ConnectionGuard:
    """The open connections of one server: the cap, idle eviction and deadlines."""

    def __init__(
        self,
        limits: ServerLimits,
        factory: Callable[[], asyncio.Protocol],
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int | None = None,
    ) -> None:
        """``factory`` makes aiohttp's protocol (the runner's ``server``).

        ``max_connections`` overrides ``limits.max_connections`` (e.g. lowered by
        :func:`fd_room`).
        """
        self.limits = limits
        self.max_connections = max_connections or limits.max_connections
        self.ssl_context = ssl_context
        self.loop = asyncio.get_running_loop()
        self.stats = GuardStats()
        self._factory = factory
        self._open: dict[_Conn, None] = {}
        self._idle: dict[_Conn, None] = {}  # no request in flight; longest idle first
        self._by_inner: dict[asyncio.BaseProtocol, _Conn] = {}
        self._alive: set[_Conn] = set()  # connection_lost not seen yet: a descriptor each
        self._all_lost = asyncio.Event()
        self._all_lost.set()
        self._tasks: set[asyncio.Task[Any]] = set()  # connection set-ups, TLS handshakes
        self._closing = False
        self._listeners: list[socket.socket] = []
        self._reading = False
        self._full = False  # max_connections + ACCEPT_SLACK sockets held
        self._resume_at: asyncio.TimerHandle | None = None  # after an EMFILE...
        self._pressure_logged = -math.inf
        self._pressure = [0, 0]  # evicted, refused since the last warning
        self._accept_error_logged = -math.inf

    @property
    def open_connections(self) -> int:
        """Connections counted against the cap."""
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        """Open connections with no request in flight."""
        return len(self._idle)

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets."""
        return list(self._listeners)

    # -- listening -------------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> None:
        """Bind ``host:port`` (every address it resolves to) and start accepting."""
        infos = await self.loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[int, Any]] = set()
        try:
            for family, kind, proto, _, address in infos:
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                sock = socket.socket(family, kind, proto)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as e:
                    raise OSError(
                        e.errno,
                        f"error while attempting to bind on address {address!r}: {e.strerror}",
                    ) from None
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except BaseException:
            self.stop_listening()
            raise
        if not self._listeners:
            raise OSError(f"{host}:{port} resolves to no address to listen on")
        self._set_reading(True)

    def stop_listening(self) -> None:
        """Stop accepting and close the listening sockets (open connections stay)."""
        self._set_reading(False)
        if self._resume_at is not None:
            self._resume_at.cancel()
            self._resume_at = None
        listeners, self._listeners = self._listeners, []
        for sock in listeners:
            sock.close()

    def _set_reading(self, on: bool) -> None:
        on = on and bool(self._listeners) and not self._closing
        if on == self._reading:
            return
        self._reading = on
        for sock in self._listeners:
            if on:
                self.loop.add_reader(sock.fileno(), self._accept, sock)
            else:
                self.loop.remove_reader(sock.fileno())

    def _update_reading(self) -> None:
        full = len(self._alive) >= self.max_connections + ACCEPT_SLACK
        if full and not self._full:
            self.stats.accept_pauses += 1
        self._full = full
        self._set_reading(not full and self._resume_at is None)

    def _resume(self) -> None:
        self._resume_at = None
        self._update_reading()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._full or not self._reading:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._accept_failed(e)
                    return
                continue  # ECONNABORTED and the like: that one connection is gone
            self._connect(sock)

    def _accept_failed(self, error: OSError) -> None:
        self.stats.accept_errors += 1
        self._set_reading(False)
        if self._resume_at is None:
            self._resume_at = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
        now = self.loop.time()
        if now - self._accept_error_logged >= PRESSURE_LOG_INTERVAL:
            self._accept_error_logged = now
            log.warning(
                "control: accept() failed (%s) with %d connections open; not accepting for "
                "%g s (%d such failures so far; next report in %g s at the earliest)",
                error.strerror,
                len(self._open),
                ACCEPT_RETRY_DELAY,
                self.stats.accept_errors,
                PRESSURE_LOG_INTERVAL,
            )

    def _connect(self, sock: socket.socket) -> None:
        conn = _Conn(self)
        self._alive.add(conn)
        self._all_lost.clear()
        self._update_reading()
        try:
            sock.setblocking(False)
            task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: conn, sock))
        except BaseException:
            sock.close()
            self._alive.discard(conn)
            raise

        def done(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            if conn.raw is None:  # no transport was made: the socket is still ours
                sock.close()
                self._lost(conn)
            if not task.cancelled():
                task.exception()  # retrieved: logged below if it matters

        self._tasks.add(task)
        task.add_done_callback(done)

    # -- called by the app's middleware --------------------------------------------------

    def request_started(self, inner: asyncio.BaseProtocol) -> None:
        """A request head arrived on the connection of aiohttp protocol ``inner``."""
        conn = self._by_inner.get(inner)
        if conn is None or conn.lost:
            return
        conn.busy += 1
        self._idle.pop(conn, None)

    def request_finished(self, inner: asyncio.BaseProtocol) -> None:
        """The app is done with a request on ``inner``'s connection (its reply is queued)."""
        conn = self._by_inner.get(inner)
        if conn is None or conn.lost or conn.busy == 0:
            return
        conn.busy -= 1
        conn.served += 1
        if conn.busy == 0 and conn in self._open:
            conn.head_started = False
            self._idle[conn] = None
            conn.arm(self.loop.time() + self.limits.idle_timeout)

    # -- lifecycle -----------------------------------------------------------------------

    async def close(self, timeout: float = 2.0) -> None:
        """Abort every connection still open; wait (up to ``timeout``) until all are gone."""
        self._closing = True
        self.stop_listening()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self._alive):
            conn.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_lost.wait(), timeout)

    # -- called by _Conn -----------------------------------------------------------------

    def _admit(self, conn: _Conn, raw: asyncio.Transport) -> None:
        if self._closing:
            conn.abort()
            return
        if len(self._open) >= self.max_connections:
            if self._idle:
                victim = next(iter(self._idle))
                self._drop(victim)
                victim.abort()
                self.stats.evicted += 1
                self._pressure[0] += 1
                self._log_pressure()
            else:
                self.stats.refused += 1
                self._pressure[1] += 1
                self._log_pressure()
                conn.close_with(
                    _http_error(
                        503,
                        "Service Unavailable",
                        f"the control server is at its connection limit "
                        f"({self.max_connections}); retry later",
                    )
                )
                return
        self._open[conn] = None
        self._idle[conn] = None
        self.stats.accepted += 1
        self.stats.peak = max(self.stats.peak, len(self._open))
        conn.arm(self.loop.time() + self.limits.header_timeout)
        if self.ssl_context is None:
            conn.open(raw)
            return
        task = self.loop.create_task(conn.start_tls(raw, self.ssl_context))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _expired(self, conn: _Conn) -> None:
        self._drop(conn)
        if conn.head_started or not conn.served:
            self.stats.header_timeouts += 1
            log.debug("control: closing a connection: no request head in time")
            conn.close_with(
                _http_error(
                    408,
                    "Request Timeout",
                    f"request head not received within {self.limits.header_timeout:g} s",
                )
                if conn.head_started
                else None
            )
        else:
            self.stats.idle_timeouts += 1
            conn.close_with(None)

    def _drop(self, conn: _Conn) -> None:
        self._open.pop(conn, None)
        self._idle.pop(conn, None)

    def _lost(self, conn: _Conn) -> None:
        self._drop(conn)
        if conn.inner is not None:
            self._by_inner.pop(conn.inner, None)
        self._alive.discard(conn)
        if not self._alive:
            self._all_lost.set()
        if self._full:
            self._update_reading()

    def _log_pressure(self) -> None:
        now = self.loop.time()
        if now - self._pressure_logged < PRESSURE_LOG_INTERVAL:
            return
        evicted, refused = self._pressure
        self._pressure = [0, 0]
        self._pressure_logged = now
        log.warning(
            "control: at the connection limit (%d): closed %d idle connections and refused "
            "%d (all busy) since the last such report; next report in %g s at the earliest",
            self.max_connections,
            evicted,
            refused,
            PRESSURE_LOG_INTERVAL,
        )


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard` (TLS included).

    The guard owns the listening sockets, so the runner's ``addresses`` stays empty: use
    :attr:`ConnectionGuard.sockets`.
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard):
        """Listen on ``host:port``; TLS, if any, is the guard's ``ssl_context``."""
        super().__init__(runner, backlog=BACKLOG)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        """The site's URL."""
        scheme = "https" if self._guard.ssl_context is not None else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self._port}"

    async def start(self) -> None:
        """Bind and listen."""
        await super().start()
        await self._guard.listen(self._host, self._port)

    async def stop(self) -> None:
        """Stop listening (the runner then shuts the HTTP handlers down)."""
        self._guard.stop_listening()
        await super().stop()
