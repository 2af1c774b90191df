"""Blocking socket helpers for the sync face: connecting, exact header reads, TailnetSocket."""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from tsnet2 import proto
from tsnet2.client._base import BACKOFF_INITIAL, BACKOFF_MAX, TailnetAddr
from tsnet2.client.errors import (
    ClosedError,
    DaemonUnavailableError,
    DeadlineExceededError,
    Error,
    ProtocolError,
)

# Errors worth retrying while the daemon is starting (no socket yet, or not accepting).
_RETRYABLE = (FileNotFoundError, ConnectionRefusedError, BlockingIOError, TimeoutError)


class TailnetSocket(socket.socket):
    """A connected stream socket to a tailnet peer, carried through the daemon.

    It is a real :class:`socket.socket` (an ``AF_UNIX`` stream to tsnet2d, which
    splices it to the peer), so ``ssl.SSLContext.wrap_socket``, ``http.client``,
    ``selectors`` and ``asyncio`` (``sock=``) all accept it. ``shutdown(SHUT_WR)``
    half-closes: the peer reads EOF and can still answer.

    Attributes:
        tailnet_local: our end of the flow as ``(ip_address, port)``, or None if unknown.
        tailnet_remote: the peer's end as ``(ip_address, port)``, or None if unknown.
    """

    __slots__ = ("tailnet_local", "tailnet_remote")

    tailnet_local: TailnetAddr | None
    tailnet_remote: TailnetAddr | None

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

    @classmethod
    def _adopt(
        cls, sock: socket.socket, local: TailnetAddr | None, remote: TailnetAddr | None
    ) -> TailnetSocket:
        """Take over ``sock``'s descriptor (``sock`` is detached) as a blocking TailnetSocket."""
        new = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        new.settimeout(None)
        new.tailnet_local = local
        new.tailnet_remote = remote
        return new

    def __repr__(self) -> str:
        base = super().__repr__()[:-1]
        return f"{base}, tailnet_local={self.tailnet_local}, tailnet_remote={self.tailnet_remote}>"


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def connect_channel(
    path: str,
    kind: int,
    op: str,
    deadline: float,
    *,
    payload: bytes = b"",
    max_delay: float = BACKOFF_MAX,
    cancel: threading.Event | None = None,
) -> socket.socket:
    """Connect to the daemon socket, write the channel byte (and ``payload``).

    Retries with backoff (50 ms doubling to ``max_delay``, default 1 s) until
    ``deadline`` (monotonic), then raises DaemonUnavailableError. If ``cancel`` is
    set while waiting, raises ClosedError. The returned socket is blocking.
    """
    delay = BACKOFF_INITIAL
    start = time.monotonic()
    while True:
        if cancel is not None and cancel.is_set():
            raise ClosedError(f"{op}: server is closed")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(path)
            sock.sendall(bytes([kind]) + payload)
            sock.settimeout(None)
            return sock
        except _RETRYABLE as exc:
            sock.close()
            last: OSError = exc
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EAGAIN, errno.ECONNREFUSED, errno.ENOENT):
                last = exc
            else:
                raise DaemonUnavailableError(
                    f"{op}: cannot connect to the daemon at {path}: {exc}"
                ) from exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DaemonUnavailableError(
                f"{op}: cannot connect to the daemon at {path} "
                f"(gave up after {time.monotonic() - start:.1f}s): {last}"
            ) from last
        if cancel is not None:
            cancel.wait(min(delay, remaining))
        else:
            time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay)


class HeaderEOF(Exception):
    """The daemon closed the connection before sending any header byte."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Consume exactly ``n`` bytes that a MSG_PEEK has shown to be buffered."""
    parts: list[bytes] = []
    while n > 0:
        chunk = sock.recv(n)
        if not chunk:
            raise ProtocolError("connection closed while consuming a peeked header")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def read_header_line(
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
    try:
        while True:
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            data = sock.recv(limit + 1 - len(buf), socket.MSG_PEEK)
            if not data:
                if buf:
                    raise ProtocolError(f"{op}: daemon closed the connection mid-header")
                raise HeaderEOF
            idx = data.find(b"\n")
            if idx >= 0:
                buf += _recv_exact(sock, idx + 1)
                sock.settimeout(None)
                return bytes(buf[:-1])
            buf += _recv_exact(sock, len(data))
            if len(buf) > limit:
                raise ProtocolError(f"{op}: header line longer than {limit} bytes")
    except Error:
        raise
    except TimeoutError:
        raise DeadlineExceededError(f"{op}: timed out waiting for the daemon's reply") from None
    except OSError as exc:
        raise DaemonUnavailableError(f"{op}: connection to the daemon failed: {exc}") from exc


def peek_eof(sock: socket.socket) -> bool:
    """True if ``sock`` has reached EOF (or failed); never blocks, consumes nothing."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError, TimeoutError):
        return False
    except (OSError, ValueError):
        return True
    return data == b""


def close_quietly(sock: Any) -> None:
    """Close a socket, ignoring errors."""
    with contextlib.suppress(OSError):
        sock.close()


@contextlib.contextmanager
def map_io_errors(op: str) -> Iterator[None]:
    """Turn socket timeouts into DeadlineExceededError and other OSErrors into
    DaemonUnavailableError; tsnet2 errors pass through unchanged."""
    try:
        yield
    except Error:
        raise
    except TimeoutError:
        raise DeadlineExceededError(f"{op}: timed out") from None
    except OSError as exc:
        raise DaemonUnavailableError(f"{op}: connection to the daemon failed: {exc}") from exc
