"""UDP through the daemon: :class:`AsyncPacketConn` (a dialled, connected UDP flow) and
:class:`AsyncPacketListener` (a UDP listener's packet channel).

Datagrams travel framed (:mod:`tsnet2.proto.udp`) on one Unix stream connection to the
daemon. A datagram larger than ``max_datagram`` (the tunnel MTU minus the IP and UDP
headers) raises :class:`~tsnet2.DatagramTooLargeError` before anything is sent: the daemon
never fragments. The daemon's error notices about earlier datagrams (a ``sendto`` to an
address that is no tailnet node's, an ICMP error from the peer, the node going down) are
raised by the next ``recv``/``recvfrom``, in order with the datagrams (a notice is not
raised by ``send``/``sendto``: a UDP send does not wait for an answer).
"""

from __future__ import annotations

import collections
import ipaddress
import socket
import time
from types import TracebackType
from typing import TYPE_CHECKING

from tsnet2 import proto
from tsnet2.client import _backend_async as backend
from tsnet2.client import _base
from tsnet2.client._async.channel import (
    HeaderEOF,
    close_quietly,
    connect_channel,
    read_header_line,
    recv,
    send_all,
)
from tsnet2.client._base import BACKOFF_INITIAL, SLOT_CONNECT_TIMEOUT, TailnetAddr
from tsnet2.client.errors import (
    AddressError,
    ClosedError,
    DaemonUnavailableError,
    DatagramTooLargeError,
    Error,
    ProtocolError,
)
from tsnet2.proto.udp import (
    MAX_FRAME,
    Datagram,
    FrameDecoder,
    Notice,
    Oversized,
    encode_datagram,
)

if TYPE_CHECKING:
    from tsnet2.client._async.server import AsyncServer

__all__ = ["AsyncPacketConn", "AsyncPacketListener"]

READ_CHUNK = 65536 + 4
LOST_TRIES = 4  # packet channels lost in a row (no datagram between) before giving up


class _Frames:
    """A packet channel's reading half: frames decoded into a queue of events (what one
    read of at most READ_CHUNK bytes held: the queue is drained before the next read)."""

    def __init__(self, sock: socket.socket, addressed: bool) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(MAX_FRAME, notices=True, addressed=addressed)
        self.events: collections.deque[Datagram | Notice] = collections.deque()
        self.eof = False

    def _feed(self, data: bytes) -> None:
        try:
            events = self.decoder.feed(data)
        except proto.WireError as exc:
            raise ProtocolError(f"tsnet2: bad UDP frame from the daemon: {exc}") from None
        for ev in events:
            if isinstance(ev, Oversized):  # cannot happen: MAX_FRAME is the wire's maximum
                continue
            self.events.append(ev)

    def pop(self) -> Datagram | Notice | None:
        return self.events.popleft() if self.events else None

    async def next(self, op: str, deadline: float | None) -> Datagram | Notice | None:
        """The next event, waiting until ``deadline``; None at EOF."""
        while True:
            ev = self.pop()
            if ev is not None:
                return ev
            if self.eof:
                return None
            data = await recv(self.sock, READ_CHUNK, op, deadline)
            if not data:
                self.eof = True
                return None
            self._feed(data)


def _notice_error(op: str, n: Notice, limit: int) -> Error:
    msg = f"{op}: {n.err}"
    if n.code == proto.ErrorCode.DATAGRAM_TOO_LARGE:
        return DatagramTooLargeError(msg, limit=limit)
    return _base.refused_error(msg, n.code) or _base.dial_error(
        op, proto.DialReply(False, err=n.err, code=n.code))


def _too_large(op: str, size: int, limit: int) -> DatagramTooLargeError:
    return DatagramTooLargeError(
        f"{op}: datagram of {size} bytes is larger than max_datagram {limit} (the tailnet "
        "MTU less the IP and UDP headers; tsnet2 never fragments): send smaller datagrams",
        limit=limit)


class AsyncPacketConn:
    """A UDP flow to one tailnet peer (from ``Server.dial("udp", "peer:port")``).

    Example (sync face; the asyncio face awaits ``send``/``recv``)::

        with srv.dial("udp", "dns-server:53") as pc:
            pc.settimeout(2)
            pc.send(query)
            answer = pc.recv()

    Datagrams keep their boundaries. ``send`` raises DatagramTooLargeError (before
    anything is sent) for a datagram over ``max_datagram``; ``recv`` returns one datagram
    (cut to ``bufsize``, as a UDP socket does). The daemon closes a flow no datagram crossed
    for its ``--udp-idle-timeout`` (default 60 s): the next call then raises ClosedError.

    Attributes:
        local_addr: this node's end, ``(ip_address, port)``.
        remote_addr: the peer's end, ``(ip_address, port)``.
        max_datagram: the largest payload ``send`` accepts.
    """

    def __init__(self, sock: socket.socket, local: TailnetAddr | None,
                 remote: TailnetAddr | None, max_datagram: int) -> None:
        self._sock = sock
        self._frames = _Frames(sock, addressed=False)
        self.local_addr = local
        self.remote_addr = remote
        self.max_datagram = max_datagram
        self._timeout: float | None = None
        self._rlock = backend.Lock()
        self._wlock = backend.Lock()
        self._closed = False

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (f"<{type(self).__name__} udp {self.local_addr} -> {self.remote_addr} "
                f"max_datagram={self.max_datagram}{state}>")

    def settimeout(self, timeout: float | None) -> None:
        """Default timeout (seconds) of ``send``/``recv``; None blocks."""
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        """The default timeout set by :meth:`settimeout`."""
        return self._timeout

    def _deadline(self, timeout: float | None) -> float | None:
        t = self._timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    def _check(self, op: str) -> None:
        if self._closed:
            raise ClosedError(f"{op}: UDP connection is closed")

    async def send(self, data: bytes, timeout: float | None = None) -> int:
        """Send one datagram to the peer; return its length.

        Raises DatagramTooLargeError (nothing sent) over ``max_datagram``, ClosedError when
        the daemon ended the flow.
        """
        op = "tsnet2.PacketConn.send"
        self._check(op)
        if len(data) > self.max_datagram:
            raise _too_large(op, len(data), self.max_datagram)
        async with self._wlock:
            try:
                await send_all(self._sock, encode_datagram(data), op, self._deadline(timeout))
            except OSError as exc:
                raise ClosedError(f"{op}: the daemon closed this UDP flow ({exc}); it "
                                  "closes flows idle longer than its --udp-idle-timeout, and "
                                  "all of them when the node goes down: dial again") from None
        return len(data)

    async def recv(self, bufsize: int = 65535, timeout: float | None = None) -> bytes:
        """Wait for the next datagram from the peer (cut to ``bufsize`` bytes).

        ``timeout`` (default: :meth:`settimeout`'s) raises DeadlineExceededError (a
        TimeoutError). A notice from the daemon is raised as its error.
        """
        op = "tsnet2.PacketConn.recv"
        self._check(op)
        async with self._rlock:
            ev = await self._frames.next(op, self._deadline(timeout))
        if ev is None:
            raise ClosedError(f"{op}: the daemon closed this UDP flow (idle longer than its "
                              "--udp-idle-timeout, or the node went down): dial again")
        if isinstance(ev, Notice):
            raise _notice_error(op, ev, self.max_datagram)
        return ev.payload[:bufsize]

    def fileno(self) -> int:
        """The channel's descriptor (readable when a datagram or notice may be waiting)."""
        return self._sock.fileno()

    async def aclose(self) -> None:
        """Close the flow (the daemon writes its close record); idempotent."""
        if not self._closed:
            self._closed = True
            close_quietly(self._sock)

    # unasync: async-only
    async def close(self) -> None:
        """Alias of aclose()."""
        await self.aclose()
    # unasync: end

    async def __aenter__(self) -> AsyncPacketConn:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def dial_packet(server: AsyncServer, op: str, network: str, addr: str,
                      timeout: float | None) -> AsyncPacketConn:
    """Dial a UDP flow through the daemon (``Server.dial`` with a udp network)."""
    sock, reply, local, remote = await server._dial_flow(op, network, addr, timeout, None,
                                                         udp=True)
    return AsyncPacketConn(sock, local, remote, reply.max_datagram)


class AsyncPacketListener(_base.ListenerBase):
    """A UDP listener on the tailnet (from ``Server.listen("udp", ":53")`` or
    ``Server.listen_packet``): datagrams from any peer, answers to any tailnet node.

    Example (sync face; the asyncio face awaits ``recvfrom``/``sendto``)::

        with srv.listen_packet("udp", ":5353") as pl:
            while True:
                data, peer = pl.recvfrom()
                pl.sendto(data, peer)  # echo

    ``recvfrom`` returns ``(bytes, (ip, port))`` with ``ip`` a string, as a UDP socket's
    does; ``sendto(data, (ip, port))`` sends to a tailnet node's address (an IP: names are
    not resolved here; ``Server.dial("udp", name)`` resolves them). A datagram over
    ``max_datagram`` raises DatagramTooLargeError before anything is sent. One packet
    channel per listener carries everything. If the daemon restarts, the next
    ``recvfrom``/``sendto`` waits for the server to reconnect, registers the listener again
    on the same port and goes on (DaemonUnavailableError when that fails).

    Attributes:
        addr: the bound address, like ``":5353"``; network, port, listener_id as for a
            Listener.
        max_datagram: the largest payload ``sendto`` accepts.
    """

    def __init__(self, server: AsyncServer, binding: _base.ListenerBinding,
                 max_datagram: int) -> None:
        self._binding = binding
        self._server = server
        self.max_datagram = max_datagram
        self._frames: _Frames | None = None
        self._slots: list[socket.socket] = []
        self._wakeup = backend.Wakeup()  # set by a re-registration (unused otherwise)
        self._rlock = backend.Lock()
        self._wlock = backend.Lock()
        self._attach_lock = backend.Lock()  # recvfrom and sendto both may (re)attach
        self._closed = False
        self._timeout: float | None = None

    def settimeout(self, timeout: float | None) -> None:
        """Default timeout (seconds) of ``recvfrom``/``sendto``; None blocks."""
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        """The default timeout set by :meth:`settimeout`."""
        return self._timeout

    def _deadline(self, timeout: float | None) -> float | None:
        t = self._timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    async def _attach(self, op: str) -> None:
        """Open the packet channel for the current registration."""
        b = self._binding
        sock = await connect_channel(
            self._server.socket_path, int(proto.ChannelKind.ACCEPT), op,
            time.monotonic() + SLOT_CONNECT_TIMEOUT,
            payload=proto.encode_accept_request(b.listener_id))
        try:
            try:
                line = await read_header_line(sock, op, time.monotonic() + SLOT_CONNECT_TIMEOUT)
            except HeaderEOF:
                raise DaemonUnavailableError(
                    f"{op}: the daemon refused the packet channel of {self.addr}") from None
            try:
                header = proto.decode_accept_header(line)
            except proto.ChannelRefused as exc:
                raise (_base.refused_error(f"{op}: {exc}", exc.code)
                       or DaemonUnavailableError(f"{op}: {exc}")) from None
            except proto.WireError as exc:
                raise ProtocolError(f"{op}: bad accept header: {exc}") from None
        except BaseException:
            close_quietly(sock)
            raise
        if header.max_datagram:
            self.max_datagram = header.max_datagram
        self._slots = [sock]
        self._frames = _Frames(sock, addressed=True)
        b.mark_slots_current()

    async def _channel(self, op: str) -> _Frames:
        if self._closed:
            raise ClosedError(f"{op}: listener {self.addr} is closed")
        b = self._binding
        if b.lost is not None:
            raise DaemonUnavailableError(b.lost)
        if (self._frames is None and self._server.reconnects
                and not await self._server._control_alive()):
            # The daemon restarted, or the node went away (the daemon then hangs up every
            # client): reconnect, which registers this listener again.
            await self._server._revive(op)
            await self._server._ensure_bound(op, self)
        async with self._attach_lock:
            if self._frames is None or b.slots_stale():
                self._drop_channel()
                await self._attach(op)
            frames = self._frames
        if frames is None:  # _attach sets it or raises
            raise DaemonUnavailableError(f"{op}: no packet channel for {self.addr}")
        return frames

    def _drop_channel(self) -> None:
        for s in self._slots:
            close_quietly(s)
        self._slots = []
        self._frames = None

    async def _lost_channel(self, op: str, tries: int) -> None:
        """The packet channel ended (the daemon restarted, the node went away, or the
        daemon dropped the listener): the next :meth:`_channel` reconnects if the control
        channel is gone too, else attaches again. ``tries``: channels lost in a row in
        this call; after a few, give up (the daemon keeps closing it)."""
        self._drop_channel()
        if not self._server.reconnects:
            raise DaemonUnavailableError(
                f"{op}: the daemon went away, so UDP listener {self.addr} is gone and "
                "reconnect_timeout is 0; start a new Server (or set reconnect_timeout > 0)")
        if tries > LOST_TRIES:
            raise DaemonUnavailableError(
                f"{op}: the daemon closed the packet channel of UDP listener {self.addr} "
                f"{tries} times in a row; close the listener and listen again")
        # A daemon taking its node down closes channels first and hangs up clients last:
        # give it a moment, so that the next try sees the control channel gone.
        await backend.sleep(min(BACKOFF_INITIAL * 2 ** tries, 1.0))

    async def recvfrom(self, bufsize: int = 65535,
                       timeout: float | None = None) -> tuple[bytes, tuple[str, int]]:
        """Wait for the next datagram: ``(payload cut to bufsize, (peer ip, port))``.

        ``timeout`` (default: :meth:`settimeout`'s) raises DeadlineExceededError. A notice
        from the daemon about an earlier ``sendto`` is raised as its error.
        """
        op = "tsnet2.PacketListener.recvfrom"
        deadline = self._deadline(timeout)
        lost = 0
        async with self._rlock:
            while True:
                frames = await self._channel(op)  # its errors are the caller's
                try:
                    ev = await frames.next(op, deadline)
                except DaemonUnavailableError:
                    ev = None
                if ev is None:
                    if self._closed:
                        raise ClosedError(f"{op}: listener {self.addr} is closed")
                    lost += 1
                    await self._lost_channel(op, lost)
                    continue
                if isinstance(ev, Notice):
                    raise _notice_error(op, ev, self.max_datagram)
                host, port = proto.split_host_port(ev.addr)
                return ev.payload[:bufsize], (host, port)

    async def sendto(self, data: bytes, addr: tuple[str, int] | str,
                     timeout: float | None = None) -> int:
        """Send one datagram to ``addr`` (``(ip, port)`` or ``"ip:port"``, a tailnet node's
        address); return its length. Raises DatagramTooLargeError over ``max_datagram``
        (nothing sent), AddressError for an address that is not an IP and port."""
        op = "tsnet2.PacketListener.sendto"
        if len(data) > self.max_datagram:
            raise _too_large(op, len(data), self.max_datagram)
        target = _format_peer(op, addr)
        frame = encode_datagram(data, target)
        async with self._wlock:
            for _attempt in (1, 2):
                frames = await self._channel(op)
                try:
                    await send_all(frames.sock, frame, op, self._deadline(timeout))
                    return len(data)
                except OSError:
                    await self._lost_channel(op, _attempt)
        raise DaemonUnavailableError(f"{op}: the packet channel of {self.addr} failed twice")

    async def aclose(self) -> None:
        """Unregister the listener and close its packet channel (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._server._listeners.discard(self)
        await self._server._unregister(self.listener_id)
        self._drop_channel()
        self._wakeup.close()

    # unasync: async-only
    async def close(self) -> None:
        """Alias of aclose()."""
        await self.aclose()
    # unasync: end

    async def __aenter__(self) -> AsyncPacketListener:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _format_peer(op: str, addr: tuple[str, int] | str) -> str:
    try:
        if isinstance(addr, str):
            host, port = proto.split_host_port(addr)
        else:
            host, port = str(addr[0]), int(addr[1])
        ip = ipaddress.ip_address(host.strip("[]"))
    except (ValueError, TypeError, IndexError):
        raise AddressError(f"{op}: {addr!r} is not an (ip, port) of a tailnet node") from None
    if not 0 < port < 65536:
        raise AddressError(f"{op}: bad port in {addr!r}")
    return proto.format_addr(ip, port)

