"""Small socket helpers shared by the daemon's channels (the only I/O around the proto core)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from tsnet2.proto import LineReader, RemoteProtocolError

# The daemon's own sockets carry this mark so the nftables guard can tell them apart from
# sockets an app opens in the same network namespace ("ts" in ASCII).
DAEMON_MARK = 0x7473
SO_MARK = getattr(socket, "SO_MARK", 36)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
RECV_CHUNK = 4096


async def read_line(
    sock: socket.socket, reader: LineReader, timeout: float | None
) -> bytes:
    """Read one bounded line from a non-blocking socket within `timeout` seconds.

    Raises TimeoutError, LineTooLong, or RemoteProtocolError (EOF before a full line).
    """
    loop = asyncio.get_running_loop()

    async def read() -> bytes:
        while True:
            line = reader.next_line()
            if line is not None:
                return line
            if reader.eof:
                raise RemoteProtocolError("connection closed before a full line")
            data = await loop.sock_recv(sock, RECV_CHUNK)
            reader.feed(data)

    async with asyncio.timeout(timeout):  # no extra task per header, unlike wait_for
        return await read()


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


def reset(sock: socket.socket) -> None:
    """Close a TCP socket with a RST (SO_LINGER 0), so the peer sees a refusal, not EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
