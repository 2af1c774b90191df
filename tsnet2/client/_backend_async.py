"""The asyncio primitives the client core (``tsnet2.client._async``) is written against.

The core is one piece of code with two faces: ``tsnet2/client/_async`` is the source, and
``scripts/unasync.py`` generates ``tsnet2/client/_sync`` from it by rewriting ``async``/
``await`` away and this module's name to :mod:`tsnet2.client._backend_sync`, which has the
same names with blocking implementations. Everything face-specific lives in these two small
modules: waiting for a socket, locks, events, conditions, and what a connection is handed
to the app as. Sockets are non-blocking in both faces; the core does the reads and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from tsnet2 import proto
from tsnet2.client._backend_sync import TailnetSocket
from tsnet2.client._base import TailnetAddr
from tsnet2.proto.tls import TLSInfo

__all__ = [
    "AsyncConn",
    "Background",
    "Condition",
    "Event",
    "Lock",
    "Wakeup",
    "make_conn",
    "sleep",
    "wait_readable",
    "wait_writable",
]

Lock = asyncio.Lock
"""A mutual-exclusion lock (``asyncio.Lock`` here, ``threading.Lock`` in the sync face)."""


class Event(asyncio.Event):
    """An event whose ``wait`` takes a timeout and says whether the event is set."""

    async def wait(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        """Wait until set or ``timeout`` seconds pass (None: forever); return is_set()."""
        if timeout is None:
            return await super().wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await super().wait()
        return self.is_set()


class Condition(asyncio.Condition):
    """A condition variable whose ``wait`` takes a timeout (like ``threading.Condition``)."""

    async def wait(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        """Release the lock, wait for a notify or ``timeout`` s, re-acquire; False on timeout."""
        if timeout is None:
            return await super().wait()
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await super().wait()
        except TimeoutError:
            return False
        return True


class Wakeup:
    """Interrupts a :func:`wait_readable` in progress (or the next one), from any task."""

    def __init__(self) -> None:
        self._pending = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        """Wake the waiter; if nobody waits, the next wait returns at once."""
        self._pending = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _take(self) -> bool:
        pending, self._pending = self._pending, False
        return pending

    def close(self) -> None:
        """Release what the wakeup holds (nothing in this face)."""


async def sleep(seconds: float) -> None:
    """Sleep for ``seconds``."""
    await asyncio.sleep(seconds)


async def wait_readable(
    socks: list[socket.socket], timeout: float | None, wakeup: Wakeup | None = None
) -> list[socket.socket]:
    """Wait until some of ``socks`` are readable (data, EOF or an error), ``timeout``
    seconds pass (None: no bound) or ``wakeup`` is set; return the readable ones."""
    if wakeup is not None and wakeup._take():
        return []
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    ready: list[socket.socket] = []

    def on_readable(sock: socket.socket) -> None:
        if sock not in ready:
            ready.append(sock)
        if not fut.done():
            fut.set_result(None)

    fds: list[int] = []
    try:
        for sock in socks:
            fd = sock.fileno()
            if fd < 0:  # closed under us: the caller's read reports it
                return [sock]
            loop.add_reader(fd, on_readable, sock)
            fds.append(fd)
        if wakeup is not None:
            wakeup._waiter = fut
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None if timeout is None else max(0.0, timeout)):
                await fut
    finally:
        for fd in fds:
            loop.remove_reader(fd)
        if wakeup is not None:
            wakeup._waiter = None
            wakeup._take()
    return ready


async def wait_writable(sock: socket.socket, timeout: float | None) -> bool:
    """Wait until ``sock`` is writable (or failed); False if ``timeout`` seconds passed."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    if fd < 0:
        return True

    def on_writable() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, on_writable)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None if timeout is None else max(0.0, timeout)):
                await fut
    finally:
        loop.remove_writer(fd)
    return fut.done()


class AsyncConn:
    """A connection to a tailnet peer as asyncio streams (from ``dial`` or ``accept``).

    Attributes:
        reader: an :class:`asyncio.StreamReader` of the peer's bytes.
        writer: an :class:`asyncio.StreamWriter`; ``writer.write_eof()`` half-closes.
        tailnet_local: our end as ``(ip_address, port)``, or None if unknown.
        tailnet_remote: the peer's end as ``(ip_address, port)``, or None if unknown.
        tls: for a flow whose TLS the daemon terminated (``listen_tls``) or originated
            (``dial_tls``), the session as a :class:`~tsnet2.TLSInfo` (``version``,
            ``cipher``, ``sni``, ``alpn``, ``peer_name``); None for a plain flow. The
            streams carry plaintext either way.

    The transport under the streams sits on a :class:`TailnetSocket`, so
    ``get_extra_info("peername")`` (here or on ``writer``) is the tailnet peer as
    ``(ip, port)`` and ``"sockname"`` this node's end, as on a TCP connection.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tailnet_local: TailnetAddr | None,
        tailnet_remote: TailnetAddr | None,
        tls: TLSInfo | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.tailnet_local = tailnet_local
        self.tailnet_remote = tailnet_remote
        self.tls = tls

    def __repr__(self) -> str:
        return (
            f"<AsyncConn tailnet_local={self.tailnet_local} tailnet_remote={self.tailnet_remote}>"
        )

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's extra info (``writer.get_extra_info``): ``"peername"`` is the
        tailnet peer ``(ip, port)``, ``"sockname"`` our tailnet end, ``"ssl_object"`` is
        set after :meth:`start_tls`."""
        return self.writer.get_extra_info(name, default)

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Upgrade the connection to TLS in place (a client handshake over the flow).

        ``reader`` and ``writer`` carry the decrypted bytes afterwards (asyncio's
        ``StreamWriter.start_tls``). ``timeout`` bounds the handshake (None: asyncio's
        default, 60 s); the handshake's errors are raised as they are (``ssl.SSLError``,
        ``ConnectionError``, ``TimeoutError``). Nothing the peer sent may be pending
        before the handshake (the client speaks first, as in HTTPS).
        """
        await self.writer.start_tls(
            ssl_context, server_hostname=server_hostname, ssl_handshake_timeout=timeout
        )

    def close(self) -> None:
        """Start closing the connection (see wait_closed)."""
        self.writer.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (connection errors are ignored)."""
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> AsyncConn:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


def stream_limit() -> int:
    """StreamReader limit: large enough for one header line, at least asyncio's default."""
    return max(proto.MAX_HEADER_LINE + 1, 1 << 16)


async def make_conn(
    sock: socket.socket, local: TailnetAddr | None, remote: TailnetAddr | None,
    tls: TLSInfo | None = None,
) -> AsyncConn:
    """Hand a channel whose header has been read to the app, as asyncio streams.

    The streams take ``sock``'s descriptor over (``sock`` is detached, as in the sync face),
    as a :class:`TailnetSocket`, so the transport's ``peername``/``sockname`` are the
    tailnet addresses. ``tls``: the session the daemon negotiated for a TLS flow.
    """
    own = TailnetSocket._adopt(sock, local, remote, tls)
    try:
        reader, writer = await asyncio.open_unix_connection(sock=own, limit=stream_limit())
    except BaseException:
        own.close()
        raise
    return AsyncConn(reader, writer, local, remote, tls)


class Background:
    """Runs ``fn()`` (a coroutine function) as a task of the running loop until it returns;
    the sync face runs it in a daemon thread."""

    def __init__(self, fn: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        self._task = asyncio.get_running_loop().create_task(fn(), name=name)

    async def join(self) -> None:
        """Wait until ``fn`` returned (the caller made it return); a cancel is final."""
        if self._task is asyncio.current_task():
            return
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
