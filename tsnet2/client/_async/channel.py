"""Channels to the daemon socket: connect with backoff, exact writes and header reads.

Sockets are non-blocking; a read or write that would block waits through the backend,
bounded by a deadline on the ``time.monotonic()`` clock (None: no bound).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Callable

from tsnet2 import proto
from tsnet2.client import _backend_async as backend
from tsnet2.client._base import BACKOFF_INITIAL, BACKOFF_MAX
from tsnet2.client.errors import (
    ClosedError,
    DaemonUnavailableError,
    DeadlineExceededError,
    ProtocolError,
)

# Worth retrying while the daemon is starting: no socket yet, or not accepting (backlog full).
_RETRY_ERRNOS = (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative), or None for no deadline."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def close_quietly(sock: socket.socket) -> None:
    """Close a socket, ignoring errors."""
    with contextlib.suppress(OSError):
        sock.close()


CLOSE_WAIT = 5.0
"""How long closing a shared socket waits for its reader to leave before closing it anyway."""


async def close_when_idle(
    sock: socket.socket, cond: backend.Condition, busy: Callable[[], bool]
) -> None:
    """Close a socket another caller may be waiting on, without pulling the descriptor
    from under it: shut it down (the waiter wakes with EOF), wake everyone waiting on
    ``cond``, wait up to :data:`CLOSE_WAIT` seconds until ``busy()`` is false (its owner
    notifies ``cond`` when it stops), then close it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    async with cond:
        cond.notify_all()
        give_up = time.monotonic() + CLOSE_WAIT
        while busy() and time.monotonic() < give_up:
            await cond.wait(give_up - time.monotonic())
    close_quietly(sock)


class HeaderEOF(Exception):
    """The daemon closed the connection before sending any header byte."""


async def connect_channel(
    path: str,
    kind: int,
    op: str,
    deadline: float,
    *,
    payload: bytes = b"",
    max_delay: float = BACKOFF_MAX,
    cancel: backend.Event | None = None,
) -> socket.socket:
    """Connect to the daemon socket and write the channel byte (and ``payload``).

    Retries with backoff (50 ms doubling to ``max_delay``, default 1 s) until
    ``deadline``, then raises DaemonUnavailableError. If ``cancel`` is set while
    waiting, raises ClosedError. The returned socket is non-blocking.
    """
    delay = BACKOFF_INITIAL
    start = time.monotonic()
    while True:
        if cancel is not None and cancel.is_set():
            raise ClosedError(f"{op}: server is closed")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)  # AF_UNIX: done at once, or EAGAIN when the backlog is full
            await send_all(sock, bytes([kind]) + payload, op, deadline)
            return sock
        except DeadlineExceededError as exc:
            close_quietly(sock)
            last: BaseException = exc
        except OSError as exc:
            close_quietly(sock)
            if exc.errno not in _RETRY_ERRNOS:
                raise DaemonUnavailableError(
                    f"{op}: cannot connect to the daemon at {path}: {exc}"
                ) from exc
            last = exc
        except BaseException:
            close_quietly(sock)
            raise
        left = deadline - time.monotonic()
        if left <= 0:
            raise DaemonUnavailableError(
                f"{op}: cannot connect to the daemon at {path} "
                f"(gave up after {time.monotonic() - start:.1f}s): {last}"
            ) from last
        if cancel is not None:
            await cancel.wait(min(delay, left))
        else:
            await backend.sleep(min(delay, left))
        delay = min(delay * 2, max_delay)


async def send_all(sock: socket.socket, data: bytes, op: str, deadline: float | None) -> None:
    """Write all of ``data``; DeadlineExceededError if ``deadline`` passes first.

    OSErrors other than would-block propagate (the caller knows what they mean).
    """
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            if not await backend.wait_writable(sock, remaining(deadline)):
                raise DeadlineExceededError(
                    f"{op}: timed out writing to the daemon"
                ) from None
            continue
        view = view[sent:]


async def recv(
    sock: socket.socket, size: int, op: str, deadline: float | None, flags: int = 0
) -> bytes:
    """One read of up to ``size`` bytes (b"" at EOF), waiting until ``deadline``.

    Raises DeadlineExceededError on timeout and DaemonUnavailableError if the
    connection fails.
    """
    while True:
        try:
            return sock.recv(size, flags)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise DaemonUnavailableError(
                f"{op}: connection to the daemon failed: {exc}"
            ) from exc
        ready = await backend.wait_readable([sock], remaining(deadline))
        if not ready and deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceededError(f"{op}: timed out waiting for the daemon's reply")


def _consume(sock: socket.socket, n: int) -> bytes:
    """Consume ``n`` bytes that a MSG_PEEK has shown to be buffered."""
    parts: list[bytes] = []
    while n > 0:
        chunk = sock.recv(n)
        if not chunk:
            raise ProtocolError("connection closed while consuming a peeked header")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


async def read_header_line(
    sock: socket.socket, op: str, deadline: float | None, max_line: int | None = None
) -> bytes:
    """Read one ``\\n``-terminated line and not one byte more; return it without ``\\n``.

    Peeks to find the newline, then consumes exactly the line, so any bytes the
    peer sent after the header stay in the socket for the application.
    Raises HeaderEOF (EOF before any byte), ProtocolError (too long / truncated),
    DeadlineExceededError (``deadline`` passed) or DaemonUnavailableError.
    """
    limit = proto.MAX_HEADER_LINE if max_line is None else max_line
    buf = bytearray()
    while True:
        data = await recv(sock, limit + 1 - len(buf), op, deadline, socket.MSG_PEEK)
        if not data:
            if buf:
                raise ProtocolError(f"{op}: daemon closed the connection mid-header")
            raise HeaderEOF
        idx = data.find(b"\n")
        try:
            if idx >= 0:
                buf += _consume(sock, idx + 1)
                return bytes(buf[:-1])
            buf += _consume(sock, len(data))
        except OSError as exc:
            raise DaemonUnavailableError(
                f"{op}: connection to the daemon failed: {exc}"
            ) from exc
        if len(buf) > limit:
            raise ProtocolError(f"{op}: header line longer than {limit} bytes")
