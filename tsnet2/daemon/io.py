"""Small socket helpers shared by the daemon's channels (the only I/O around the proto core)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from typing import Any

from tsnet2.proto import LineReader, RemoteProtocolError

log = logging.getLogger("tsnet2d")

# The daemon's own sockets carry this mark so the nftables guard can tell them apart from
# sockets an app opens in the same network namespace ("ts" in ASCII).
DAEMON_MARK = 0x7473
SO_MARK = getattr(socket, "SO_MARK", 36)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
RECV_CHUNK = 4096


# Socket calls for the daemon's channels: the syscall first, and only when it would block, a
# wait on the loop's reader/writer. The loop's own sock_* methods cost more per call here
# (asyncio's when a wait is needed; uvloop's always: 4-5x for a recv with bytes ready, and
# its sock_connect resolves the numeric address again), and the daemon runs on either loop.


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _wait(sock: socket.socket, *, writable: bool) -> None:
    """Wait until ``sock`` is readable (or writable), or has an error or EOF to report."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fd = sock.fileno()
    add, remove = ((loop.add_writer, loop.remove_writer) if writable
                   else (loop.add_reader, loop.remove_reader))
    add(fd, _wake, fut)
    try:
        await fut
    finally:
        remove(fd)


async def recv(sock: socket.socket, size: int) -> bytes:
    """Receive up to ``size`` bytes from a non-blocking socket (b"" at EOF)."""
    while True:
        try:
            return sock.recv(size)
        except (BlockingIOError, InterruptedError):
            await _wait(sock, writable=False)


async def sendall(sock: socket.socket, data: bytes) -> None:
    """Send all of ``data`` on a non-blocking socket."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, InterruptedError):
            await _wait(sock, writable=True)
            continue
        view = view[sent:]


async def accept(lsock: socket.socket) -> tuple[socket.socket, Any]:
    """Accept a connection on a non-blocking listening socket; the new socket is
    non-blocking."""
    while True:
        try:
            conn, addr = lsock.accept()
        except (BlockingIOError, InterruptedError):
            await _wait(lsock, writable=False)
            continue
        conn.setblocking(False)
        return conn, addr


ACCEPT_BACKOFF = 0.1  # seconds a listener waits when the process is out of descriptors


async def accept_next(lsock: socket.socket, what: str) -> socket.socket:
    """The next connection on a listening socket, over the errors an accept loop outlives:
    out of descriptors or memory (logged as ``what``, then a short back-off) and a client
    that gave up before it was accepted. Other errors are raised."""
    while True:
        try:
            conn, _ = await accept(lsock)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("%s accept: %s; backing off", what, exc)
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                continue  # the client gave up before we accepted: nothing to do
            raise
        return conn


async def connect(sock: socket.socket, address: tuple[str, int] | str) -> None:
    """Connect a non-blocking socket to a numeric ``address`` (a path for a Unix socket);
    raises OSError as asyncio's ``sock_connect`` does (``Connect call failed ...``)."""
    try:
        sock.connect(address)
        return
    except (BlockingIOError, InterruptedError):
        pass
    await _wait(sock, writable=True)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"Connect call failed {address}")


async def read_line(
    sock: socket.socket, reader: LineReader, timeout: float | None
) -> bytes:
    """Read one bounded line from a non-blocking socket within `timeout` seconds.

    Raises TimeoutError, LineTooLong, or RemoteProtocolError (EOF before a full line).
    """

    def line_now() -> bytes | None:
        # The line from what can be read without waiting; None: wait for more.
        while (line := reader.next_line()) is None:
            if reader.eof:
                raise RemoteProtocolError("connection closed before a full line")
            try:
                data = sock.recv(RECV_CHUNK)
            except (BlockingIOError, InterruptedError):
                return None
            reader.feed(data)
        return line

    # Mostly the line is there already (a client sends it right after connecting): no
    # timer is armed for what needs no wait.
    if (line := line_now()) is not None:
        return line
    async with asyncio.timeout(timeout):  # no extra task per header, unlike wait_for
        while (line := line_now()) is None:
            await _wait(sock, writable=False)
        return line


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process on the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def mark(sock: socket.socket) -> bool:
    """Put the daemon's mark on a socket; False when the process lacks CAP_NET_ADMIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, DAEMON_MARK)
    except PermissionError:
        return False
    return True


TCP_KEEPALIVE_IDLE = 30.0
"""Default seconds a tailnet TCP connection may be idle before keepalive probes start."""
KEEPALIVE_PROBES = 3


def keepalive(sock: socket.socket, idle: float) -> float:
    """Turn TCP keepalive on for a tailnet socket; return how long a dead peer can go
    unnoticed (0 when ``idle`` is 0: keepalive off).

    Probes start after ``idle`` seconds of silence and repeat every ``idle / 3`` (at least
    1 s) :data:`KEEPALIVE_PROBES` times; ``TCP_USER_TIMEOUT`` bounds data left unacknowledged
    for as long. So when a peer vanishes without a FIN or RST (its daemon killed with its
    WireGuard device, its pod deleted, its network cut), the flow ends with an error within
    ``idle + 3 * interval`` seconds (60 s by default), and its ``close`` record is written.
    Set on a listening socket, the options are inherited by the sockets it accepts.
    """
    if idle <= 0:
        return 0.0
    interval = max(1, round(idle / 3))
    whole = max(1, round(idle))
    limit = whole + KEEPALIVE_PROBES * interval
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, whole)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, limit * 1000)
    return float(limit)


def reset(sock: socket.socket) -> None:
    """Close a TCP socket with a RST (SO_LINGER 0), so the peer sees a refusal, not EOF."""
    linger_zero(sock)
    sock.close()


def linger_zero(sock: socket.socket) -> None:
    """SO_LINGER 0: the socket's close (or a transport's abort) sends a RST, not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
