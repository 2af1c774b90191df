"""The blocking primitives the generated sync face (``tsnet2.client._sync``) runs on.

Same names as :mod:`tsnet2.client._backend_async` (see its docstring), implemented with
``threading`` and ``poll(2)``. Several threads may share one Server, so every primitive
here is thread-safe; :class:`Wakeup` lets one thread interrupt another's wait.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from tsnet2.client._base import TailnetAddr, sockaddr
from tsnet2.proto.tls import TLSInfo

__all__ = [
    "Background",
    "Condition",
    "Event",
    "Lock",
    "TailnetSocket",
    "Wakeup",
    "make_conn",
    "sleep",
    "wait_readable",
    "wait_writable",
]

Lock = threading.Lock
Condition = threading.Condition
Event = threading.Event


class Wakeup:
    """Interrupts a :func:`wait_readable` in progress (or the next one), from any thread."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def set(self) -> None:
        """Wake the waiter; if nobody waits, the next wait returns at once."""
        with contextlib.suppress(OSError):
            self._w.send(b"x")

    def _drain(self) -> bool:
        got = False
        with contextlib.suppress(OSError):
            while self._r.recv(64):
                got = True
        return got

    def close(self) -> None:
        """Close the wakeup's socket pair."""
        self._r.close()
        self._w.close()


def sleep(seconds: float) -> None:
    """Sleep for ``seconds``."""
    time.sleep(seconds)


def _poll(socks: list[socket.socket], events: int, timeout: float | None,
          extra: socket.socket | None = None) -> list[socket.socket]:
    poller = select.poll()
    by_fd: dict[int, socket.socket] = {}
    for sock in [*socks, *([extra] if extra is not None else [])]:
        fd = sock.fileno()
        if fd < 0:  # closed under us: the caller's read or write reports it
            return [sock]
        poller.register(fd, events)
        by_fd[fd] = sock
    ms = None if timeout is None else math.ceil(max(0.0, timeout) * 1000)
    return [by_fd[fd] for fd, _ in poller.poll(ms) if fd in by_fd]


def wait_readable(
    socks: list[socket.socket], timeout: float | None, wakeup: Wakeup | None = None
) -> list[socket.socket]:
    """Wait until some of ``socks`` are readable (data, EOF or an error), ``timeout``
    seconds pass (None: no bound) or ``wakeup`` is set; return the readable ones."""
    extra = wakeup._r if wakeup is not None else None
    ready = _poll(socks, select.POLLIN, timeout, extra)
    if wakeup is not None and wakeup._drain():
        return [s for s in ready if s is not extra]
    return ready


def wait_writable(sock: socket.socket, timeout: float | None) -> bool:
    """Wait until ``sock`` is writable (or failed); False if ``timeout`` seconds passed."""
    return bool(_poll([sock], select.POLLOUT, timeout))


class TailnetSocket(socket.socket):
    """A connected stream socket to a tailnet peer, carried through the daemon.

    It is a real :class:`socket.socket` (an ``AF_UNIX`` stream to tsnet2d, which
    splices it to the peer), so ``ssl.SSLContext.wrap_socket``, ``http.client``,
    ``selectors`` and ``asyncio`` (``sock=``) all accept it. ``shutdown(SHUT_WR)``
    half-closes: the peer reads EOF and can still answer.

    ``getpeername()`` returns the tailnet peer as ``(ip, port)`` (``ip`` a string, as a
    TCP socket's) and ``getsockname()`` this node's tailnet end, so libraries that log
    or check the client address (``http.server``, WSGI servers, urllib3) see tailnet
    addresses, not the daemon's socket path. Both fall back to the Unix socket's values
    when the daemon did not say (an old daemon). ``ssl.SSLContext.wrap_socket`` returns
    an ``ssl.SSLSocket``, another class, whose names are the Unix socket's: take the
    address before wrapping.

    Attributes:
        tailnet_local: our end of the flow as ``(ip_address, port)``, or None if unknown.
        tailnet_remote: the peer's end as ``(ip_address, port)``, or None if unknown.
        tls: for a flow whose TLS the daemon terminated (``listen_tls``) or originated
            (``dial_tls``), the session as a :class:`~tsnet2.TLSInfo` (``version``,
            ``cipher``, ``sni``, ``alpn``, ``peer_name``); None for a plain flow. The
            socket carries plaintext either way: do not wrap it in ``ssl`` again.
    """

    __slots__ = ("tailnet_local", "tailnet_remote", "tls")

    tailnet_local: TailnetAddr | None
    tailnet_remote: TailnetAddr | None
    tls: TLSInfo | None

    def __init__(
        self,
        family: int = -1,
        type: int = -1,
        proto: int = -1,
        fileno: int | None = None,
    ) -> None:
        super().__init__(family, type, proto, fileno)
        self.tailnet_local = None
        self.tailnet_remote = None
        self.tls = None

    @classmethod
    def _adopt(
        cls, sock: socket.socket, local: TailnetAddr | None, remote: TailnetAddr | None,
        tls: TLSInfo | None = None,
    ) -> TailnetSocket:
        """Take over ``sock``'s descriptor (``sock`` is detached) as a blocking TailnetSocket."""
        new = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        new.settimeout(None)
        new.tailnet_local = local
        new.tailnet_remote = remote
        new.tls = tls
        return new

    def getpeername(self) -> Any:
        """The tailnet peer as ``(ip, port)``; the Unix socket's peer if unknown."""
        if self.tailnet_remote is None:
            return super().getpeername()
        return sockaddr(self.tailnet_remote)

    def getsockname(self) -> Any:
        """This node's tailnet end as ``(ip, port)``; the Unix socket's name if unknown."""
        if self.tailnet_local is None:
            return super().getsockname()
        return sockaddr(self.tailnet_local)

    def __repr__(self) -> str:
        base = super().__repr__()[:-1]
        return f"{base}, tailnet_local={self.tailnet_local}, tailnet_remote={self.tailnet_remote}>"


def make_conn(
    sock: socket.socket, local: TailnetAddr | None, remote: TailnetAddr | None,
    tls: TLSInfo | None = None,
) -> TailnetSocket:
    """Hand a channel whose header has been read to the app, as a blocking socket
    (``tls``: the session the daemon negotiated for a TLS flow)."""
    return TailnetSocket._adopt(sock, local, remote, tls)


class Background:
    """Runs ``fn()`` in a daemon thread until it returns; the asyncio face runs it as a
    task."""

    def __init__(self, fn: Callable[[], None], name: str) -> None:
        self._thread = threading.Thread(target=fn, name=name, daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait until ``fn`` returned (the caller made it return)."""
        if self._thread is not threading.current_thread():
            self._thread.join()
