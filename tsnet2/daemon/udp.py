"""UDP through the daemon: dialled (connected) channels and listeners' packet channels.

Datagrams travel between the app and the daemon framed by :mod:`tsnet2.proto.udp` on a
dial channel (0x03, network ``udp``/``udp4``/``udp6``) or on a UDP listener's one packet
channel (an accept request on 0x04, answered at once by an accept header). The daemon's
UDP sockets carry its mark (the guard lets only them through the tailnet device), refuse
fragmentation (``IP_PMTUDISC_DO``: a datagram over the tunnel MTU fails instead of being
split), and never set ``SO_REUSEADDR``/``SO_REUSEPORT``.

A *flow* is (dial or listener, peer address): ``open`` (``proto: "udp"``, WhoIs), one
``data`` record per datagram (:meth:`Flow.datagram`), ``close`` with datagram and byte
counts. A datagram is logged before it is sent to the peer or queued for the app: one the
log refuses (fail-closed) is dropped, never relayed unlogged; one the kernel then refuses
to send (a full socket buffer, an ICMP error) stays counted, and counted in
``tsnet2_udp_datagrams_dropped_total{reason="send_failed"}``. A flow no datagram crossed
for ``idle_timeout`` seconds (``--udp-idle-timeout``,
default :data:`UDP_IDLE_TIMEOUT`) is reaped: its close record is written, and a reaped dial
channel is closed. Everything is a callback on the event loop (no task per flow or
channel); one reaper task owned by the daemon wakes a few times per timeout.

Bounds: per channel, at most :data:`APP_BUFFER` bytes of frames wait for an app that does
not read; later datagrams are dropped and counted (UDP semantics). At most
:data:`MAX_FLOWS_PER_LISTENER` peers per listener (a datagram from another peer is
dropped and counted until one is reaped), :data:`MAX_UDP_DIALS_PER_CLIENT` UDP dials per
client process and :data:`MAX_UDP_DIALS` per daemon.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, Literal

from tsnet2 import proto
from tsnet2.daemon import io
from tsnet2.daemon.backend import BackendError, whois_summary
from tsnet2.daemon.datapath import UDP_IDLE_TIMEOUT
from tsnet2.node import MTU
from tsnet2.proto import ErrorCode
from tsnet2.proto.udp import (
    UDP_NETWORKS,
    Datagram,
    FrameDecoder,
    Notice,
    Oversized,
    encode_datagram,
    encode_notice,
    parse_udp_listen_addr,
)
from tsnet2.traffic import Flow, RejectReason, TrafficLogError

if TYPE_CHECKING:
    from tsnet2.daemon.datapath import Datapath, ListenerRegistration

log = logging.getLogger("tsnet2d.udp")

__all__ = [
    "APP_BUFFER",
    "MAX_FLOWS_PER_LISTENER",
    "MAX_UDP_DIALS",
    "MAX_UDP_DIALS_PER_CLIENT",
    "UDP_IDLE_TIMEOUT",
    "UDP_NETWORKS",
    "UdpDatapath",
    "max_datagram",
]

APP_BUFFER = 256 * 1024
"""Bytes of frames a channel holds for an app that does not read; more are dropped."""
MAX_FLOWS_PER_LISTENER = 1024
"""Peers (flows) one UDP listener tracks at once; datagrams from more are dropped."""
MAX_UDP_DIALS = 1024
"""UDP dial channels open at once in one daemon."""
MAX_UDP_DIALS_PER_CLIENT = 256
"""UDP dial channels open at once per client process (SO_PEERCRED pid)."""
NOTICE_SLACK = 16 * 1024  # notices may fill the app buffer this far past APP_BUFFER
RECV_BATCH = 64  # datagrams read per readiness callback before yielding to the loop
APP_READ = 65536 + 4

# Linux values (the socket module has no names for them).
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO = 23, 2

Stream = Literal["app->peer", "peer->app"]


def max_datagram(version: int, mtu: int = MTU) -> int:
    """The largest UDP payload one IPv4/IPv6 packet of ``mtu`` bytes carries unfragmented."""
    return mtu - (20 if version == 4 else 40) - 8


def udp_socket(family: socket.AddressFamily) -> socket.socket:
    """A non-blocking UDP socket with the daemon's mark, never fragmenting."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        io.mark(s)
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        s.close()
        raise
    return s


def _sockaddr(addr: Any) -> str:
    return proto.format_addr(str(addr[0]), int(addr[1]))


class _Peer:
    """One UDP flow: its log flow and when a datagram last crossed it."""

    __slots__ = ("direction", "flow", "last", "started")

    def __init__(self, flow: Flow, direction: Literal["in", "out"]) -> None:
        self.flow = flow
        self.direction = direction
        self.started = self.last = time.monotonic()


class _Channel:
    """The app's side of a UDP endpoint: frames in (decoded), frames out (bounded buffer).

    ``on_event(ev)`` gets each decoded frame, ``on_close(error)`` is called once when the
    app hangs up or breaks the framing.
    """

    def __init__(self, sock: socket.socket, decoder: FrameDecoder, metrics: Any,
                 on_event: Any, on_close: Any) -> None:
        self.sock = sock
        self.decoder = decoder
        self.metrics = metrics
        self.on_event = on_event
        self.on_close = on_close
        self.out: collections.deque[memoryview] = collections.deque()
        self.out_bytes = 0
        self.closed = False
        self._writing = False
        self._loop = asyncio.get_running_loop()

    def start(self, early: bytes) -> None:
        self._loop.add_reader(self.sock, self._on_readable)
        if early:
            self._take(early)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(APP_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.on_close(f"app channel failed: {exc}")
            return
        if not data:
            self.on_close(None)
            return
        self._take(data)

    def _take(self, data: bytes) -> None:
        try:
            events = self.decoder.feed(data)
        except proto.WireError as exc:
            log.warning("UDP channel: %s; closing it", exc)
            self.on_close(f"bad frame from the app: {exc}")
            return
        for ev in events:
            if self.closed:
                return
            self.on_event(ev)

    def send(self, frame: bytes, *, force: bool = False) -> bool:
        """Queue one frame for the app; False (nothing queued) when the buffer is full
        (``force``: a notice, which may use :data:`NOTICE_SLACK` bytes more)."""
        if self.closed:
            return False
        if self.out_bytes + len(frame) > APP_BUFFER + (NOTICE_SLACK if force else 0):
            return False
        view = memoryview(frame)
        if not self.out:
            try:
                n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return False  # the reader side will see the hang-up
            view = view[n:]
            if not view:
                return True
        self.out.append(view)
        self.out_bytes += len(view)
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self.sock, self._on_writable)
        return True

    def _on_writable(self) -> None:
        while self.out:
            view = self.out[0]
            try:
                n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._stop_writing()
                self.out.clear()
                self.out_bytes = 0
                return
            self.out_bytes -= n
            if n == len(view):
                self.out.popleft()
            else:
                self.out[0] = view[n:]
                return
        self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self.sock)

    def close(self, notice: bytes | None = None) -> None:
        """Stop reading and writing and close the app's socket (a final notice first,
        if it fits without blocking)."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock)
        self._stop_writing()
        if notice is not None and not self.out:
            with contextlib.suppress(OSError):
                self.sock.send(notice)
        self.out.clear()
        self.sock.close()


class _Endpoint:
    """What a UDP dial and a UDP listener share: flows, metrics, log bookkeeping."""

    def __init__(self, udp: UdpDatapath, listener_id: str | None) -> None:
        self.udp = udp
        self.listener_id = listener_id
        self.flows: dict[str, _Peer] = {}
        self.channel: _Channel | None = None
        self._refused_at = -1.0  # when the log last refused a flow here (quiets repeats)

    def _open(self, direction: Literal["in", "out"], local: str, remote: str) -> _Peer | None:
        """Open a flow (its `open` record); None (and a `reject`) when the log refuses."""
        dp = self.udp.dp
        whois = whois_summary(dp._node_at(remote))
        try:
            flow = dp.traffic.open_flow(direction=direction, local=local, remote=remote,
                                        whois=whois, listener_id=self.listener_id,
                                        proto="udp")
        except TrafficLogError as exc:
            # Every datagram would try again while the log is stalled: one reject record
            # (and log line) per endpoint and second, the rest only counted.
            now = time.monotonic()
            if now - self._refused_at >= 1.0:
                self._refused_at = now
                self.udp.refuse(direction, "log_unavailable", remote=remote, local=local,
                                listener_id=self.listener_id,
                                error=f"traffic log unavailable: {exc}")
            self.udp.metrics.udp_dropped("log_unavailable")
            return None
        peer = _Peer(flow, direction)
        self.flows[remote] = peer
        self.udp.metrics.flow_opened(direction)
        return peer

    def _record(self, peer: _Peer, stream: Stream, data: bytes) -> bool:
        """Log one datagram of a flow; False (flow closed) when the log refuses it."""
        try:
            peer.flow.datagram(stream, data)
        except TrafficLogError as exc:
            self.udp.metrics.udp_dropped("log_unavailable")
            self._close_peer(peer, f"traffic log unavailable: {exc}")
            return False
        peer.last = time.monotonic()
        m = self.udp.metrics
        m.udp_datagram(stream)
        m.flow_bytes(peer.direction, stream, len(data))
        return True

    def _close_peer(self, peer: _Peer, error: str | None = None, *, cut: bool = False) -> None:
        for key, p in list(self.flows.items()):
            if p is peer:
                del self.flows[key]
        result: Literal["ok", "error", "cut"] = "cut" if cut else "error" if error else "ok"
        with contextlib.suppress(TrafficLogError):
            peer.flow.close(error, cut=cut)
        self.udp.metrics.flow_closed(peer.direction, result, time.monotonic() - peer.started)

    def close_flows(self, error: str | None = None, *, cut: bool = False) -> None:
        for peer in list(self.flows.values()):
            self._close_peer(peer, error, cut=cut)

    def notice(self, err: str, code: ErrorCode, addr: str = "") -> None:
        if self.channel is not None:
            self.channel.send(encode_notice(err, code, addr), force=True)

    def too_large(self, ev: Oversized, limit: int) -> None:
        """A frame from the app over ``limit`` (max_datagram): skipped by the decoder,
        counted, and the app told (with the peer's address on a listener's channel)."""
        self.udp.metrics.udp_dropped("too_large")
        to = f" to {ev.addr}" if ev.addr else ""
        self.notice(f"daemon: datagram of {ev.size} bytes{to} dropped: larger than "
                    f"max_datagram {limit} (the tunnel MTU); send smaller ones",
                    ErrorCode.DATAGRAM_TOO_LARGE, ev.addr)

    def reap(self, now: float, idle: float) -> None:
        for peer in list(self.flows.values()):
            if now - peer.last >= idle:
                log.debug("UDP flow %s idle for %gs; closed", peer.flow.conn_id, idle)
                self._close_peer(peer)


class UdpDial(_Endpoint):
    """A dialled UDP channel: one connected socket, one flow."""

    def __init__(self, udp: UdpDatapath, sock: socket.socket, local: str, remote: str,
                 limit: int, client: int) -> None:
        super().__init__(udp, None)
        self.sock = sock
        self.local = local
        self.remote = remote
        self.limit = limit
        self.client = client
        self.closed = False

    def start(self, app: socket.socket, early: bytes) -> bool:
        if self._open("out", self.local, self.remote) is None:
            return False
        self.channel = _Channel(app, FrameDecoder(self.limit, notices=False), self.udp.metrics,
                                self._from_app, self._app_closed)
        asyncio.get_running_loop().add_reader(self.sock, self._from_peer)
        self.channel.start(early)
        return True

    def _peer(self) -> _Peer | None:
        return self.flows.get(self.remote)

    def _from_app(self, ev: Datagram | Notice | Oversized) -> None:
        m = self.udp.metrics
        if isinstance(ev, Oversized):
            self.too_large(ev, self.limit)
            return
        if not isinstance(ev, Datagram):
            return
        peer = self._peer()
        if peer is None:  # reaped while the app still writes: a new flow
            peer = self._open("out", self.local, self.remote)
            if peer is None:
                return
        if not self._record(peer, "app->peer", ev.payload):
            return  # logged before it leaves: a datagram the log refuses is not sent
        try:
            self.sock.send(ev.payload)
        except (BlockingIOError, InterruptedError):
            m.udp_dropped("send_failed")
            return
        except OSError as exc:
            m.udp_dropped("too_large" if exc.errno == errno.EMSGSIZE else "send_failed")
            self.notice(f"daemon: send to {self.remote}: {exc.strerror or exc}",
                        ErrorCode.DATAGRAM_TOO_LARGE if exc.errno == errno.EMSGSIZE
                        else ErrorCode.DIAL_FAILED)

    def _from_peer(self) -> None:
        m = self.udp.metrics
        for _ in range(RECV_BATCH):
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error about an earlier datagram
                self.notice(f"daemon: {self.remote}: {exc.strerror or exc}",
                            ErrorCode.DIAL_FAILED)
                continue
            ch = self.channel
            if ch is None or ch.closed:
                return
            frame = encode_datagram(data)
            if ch.out_bytes + len(frame) > APP_BUFFER:
                m.udp_dropped("app_slow")
                continue
            peer = self._peer() or self._open("out", self.local, self.remote)
            if peer is None or not self._record(peer, "peer->app", data):
                continue
            ch.send(frame)

    def _app_closed(self, error: str | None) -> None:
        self.close(error)

    def reap(self, now: float, idle: float) -> None:
        super().reap(now, idle)
        if not self.flows:
            self.close(None)  # a reaped dial channel ends

    def close(self, error: str | None = None, *, cut: bool = False,
              notice: bytes | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_flows(error, cut=cut)
        asyncio.get_running_loop().remove_reader(self.sock)
        self.sock.close()
        if self.channel is not None:
            self.channel.close(notice)
        self.udp.dials.discard(self)
        n = self.udp.per_client.get(self.client, 0) - 1
        if n > 0:
            self.udp.per_client[self.client] = n
        else:
            self.udp.per_client.pop(self.client, None)


class UdpListener(_Endpoint):
    """A UDP listener: its bound sockets (one per address), flows per peer, and at most
    one packet channel."""

    def __init__(self, udp: UdpDatapath, lst: ListenerRegistration, limit: int) -> None:
        super().__init__(udp, lst.id)
        self.lst = lst
        self.limit = limit
        self.by_family = {s.family: s for s in lst.socks}

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for s in self.lst.socks:
            loop.add_reader(s, self._from_peer, s)

    def attach(self, app: socket.socket, early: bytes) -> None:
        self.channel = _Channel(app, FrameDecoder(self.limit, notices=False, addressed=True),
                                self.udp.metrics, self._from_app, self._app_closed)
        self.channel.start(early)

    def _app_closed(self, error: str | None) -> None:
        self.close_flows(error)
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _from_app(self, ev: Datagram | Notice | Oversized) -> None:
        m = self.udp.metrics
        if isinstance(ev, Oversized):
            self.too_large(ev, self.limit)
            return
        if not isinstance(ev, Datagram):
            return
        host, port = proto.split_host_port(ev.addr)
        ip = ipaddress.ip_address(host)
        node = self.udp.dp.backend.node_by_ip(ip)
        sock = self.by_family.get(socket.AF_INET if ip.version == 4 else socket.AF_INET6)
        if node is None or port == 0 or sock is None:
            m.udp_dropped("not_tailnet")
            why = ("no tailnet node has that address; sendto reaches tailnet nodes only"
                   if node is None else "port 0" if port == 0
                   else f"this listener has no IPv{ip.version} address")
            self.notice(f"daemon: datagram to {ev.addr} not sent: {why}",
                        ErrorCode.NO_SUCH_PEER, ev.addr)
            return
        remote = proto.format_addr(ip, port)
        family_limit = max_datagram(ip.version)
        if len(ev.payload) > family_limit:  # an IPv6 peer of a dual-stack listener
            m.udp_dropped("too_large")
            self.notice(f"daemon: datagram of {len(ev.payload)} bytes to {remote} dropped: "
                        f"larger than {family_limit}, the most an IPv{ip.version} packet "
                        "carries through the tunnel; send smaller ones",
                        ErrorCode.DATAGRAM_TOO_LARGE, ev.addr)
            return
        peer = self.flows.get(remote)
        if peer is None:
            if len(self.flows) >= MAX_FLOWS_PER_LISTENER:
                m.udp_dropped("flow_limit")
                self.notice(f"daemon: datagram to {remote} not sent: this listener has "
                            f"{MAX_FLOWS_PER_LISTENER} flows, its maximum; idle ones are "
                            "reaped", ErrorCode.LIMIT, ev.addr)
                return
            peer = self._open("out", _sockaddr(sock.getsockname()), remote)
            if peer is None:
                return
        if not self._record(peer, "app->peer", ev.payload):
            return  # logged before it leaves: a datagram the log refuses is not sent
        try:
            sock.sendto(ev.payload, (str(ip), port))
        except (BlockingIOError, InterruptedError):
            m.udp_dropped("send_failed")
            return
        except OSError as exc:
            too_large = exc.errno == errno.EMSGSIZE
            m.udp_dropped("too_large" if too_large else "send_failed")
            self.notice(f"daemon: sendto {remote}: {exc.strerror or exc}",
                        ErrorCode.DATAGRAM_TOO_LARGE if too_large else ErrorCode.DIAL_FAILED,
                        ev.addr)

    def _from_peer(self, sock: socket.socket) -> None:
        m = self.udp.metrics
        for _ in range(RECV_BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error about an earlier sendto
            remote = _sockaddr(addr)
            ch = self.channel
            if ch is None or ch.closed:
                m.udp_dropped("no_channel")
                continue
            frame = encode_datagram(data, remote)
            if ch.out_bytes + len(frame) > APP_BUFFER:
                m.udp_dropped("app_slow")
                continue
            peer = self.flows.get(remote)
            if peer is None:
                if len(self.flows) >= MAX_FLOWS_PER_LISTENER:
                    m.udp_dropped("flow_limit")
                    continue
                peer = self._open("in", _sockaddr(sock.getsockname()), remote)
                if peer is None:
                    continue
            if self._record(peer, "peer->app", data):
                ch.send(frame)

    def close(self, *, cut: bool = False, notice: bytes | None = None) -> None:
        """The listener goes: its flows close, its packet channel too (its sockets are
        the registration's: the datapath closes them)."""
        loop = asyncio.get_running_loop()
        for s in self.lst.socks:
            loop.remove_reader(s)
        self.close_flows(cut=cut)
        if self.channel is not None:
            self.channel.close(notice)
            self.channel = None


class UdpDatapath:
    """UDP dials and listeners of one daemon (owned by its :class:`Datapath`)."""

    def __init__(self, dp: Datapath, idle_timeout: float = UDP_IDLE_TIMEOUT) -> None:
        if idle_timeout <= 0:
            raise ValueError(f"UDP idle timeout must be > 0 seconds, got {idle_timeout}")
        self.dp = dp
        self.idle_timeout = idle_timeout
        self.metrics = dp.metrics
        self.dials: set[UdpDial] = set()
        self.listeners: dict[str, UdpListener] = {}
        self.per_client: dict[int, int] = {}
        self._reaper: asyncio.Task[None] | None = None

    # ---- bookkeeping ---------------------------------------------------------------

    def refuse(self, direction: Literal["in", "out"], reason: str, *, remote: str,
               error: str, local: str = "", listener_id: str | None = None) -> None:
        """A UDP flow that never opened: a `reject` record (proto udp) and metrics."""
        from tsnet2.daemon.datapath import REJECT_REASON
        from tsnet2.traffic.records import REJECT_REASONS
        log.warning("UDP %s flow %s %s refused (%s): %s", direction,
                    "from" if direction == "in" else "to", remote, reason, error)
        self.metrics.flow_refused(direction, reason)
        whois = None
        with contextlib.suppress(ValueError):
            whois = whois_summary(self.dp._node_at(remote))
        why: RejectReason = next((r for r in REJECT_REASONS if r == reason),
                                 REJECT_REASON.get(reason, "dial_failed"))
        self.dp.traffic.reject(direction=direction, remote=remote, local=local or None,
                               reason=why, error=error, whois=whois, listener_id=listener_id,
                               proto="udp")

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = self.dp._spawn(self._reap_loop())

    async def _reap_loop(self) -> None:
        tick = min(max(self.idle_timeout / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for d in list(self.dials):
                d.reap(now, self.idle_timeout)
            for ul in list(self.listeners.values()):
                ul.reap(now, self.idle_timeout)

    # ---- dial ------------------------------------------------------------------------

    async def dial(self, sock: socket.socket, req: proto.DialRequest,
                   reader: proto.LineReader) -> bool:
        """Serve a UDP dial channel; True once the channel belongs to a UdpDial."""
        dp = self.dp

        async def fail(reason: str, msg: str, code: ErrorCode) -> bool:
            self.refuse("out", reason, remote=req.addr, error=msg)
            with contextlib.suppress(OSError):
                await io.sendall(sock, proto.encode_dial_reply(False, err=msg, code=code))
            return False

        try:
            dp.traffic.check_writable()
        except TrafficLogError as exc:
            return await fail("log_unavailable", f"daemon: traffic log unavailable: {exc}; "
                              "refusing new flows", ErrorCode.LOG_UNAVAILABLE)
        client = _peer_pid(sock)
        mine = self.per_client.get(client, 0)
        if mine >= MAX_UDP_DIALS_PER_CLIENT or len(self.dials) >= MAX_UDP_DIALS:
            return await fail("over_limit", (
                f"daemon: dial {req.addr}: this client has {mine} UDP dials open "
                f"(at most {MAX_UDP_DIALS_PER_CLIENT} per client, {MAX_UDP_DIALS} per "
                "daemon); close some"), ErrorCode.LIMIT)
        try:
            if not dp.backend.running:
                down = dp.backend.down_error()
                raise BackendError(str(down), "not_running", down.code)
            host, port = proto.split_host_port(req.addr)
            if port == 0:
                raise BackendError(f"dial {req.addr}: port 0", "bad_request",
                                   ErrorCode.BAD_REQUEST)
            family = {"udp4": 4, "udp6": 6}.get(req.network)
            ip = dp.backend.resolve(host, family)
            s = udp_socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6)
            try:
                s.connect((str(ip), port))
            except BaseException:
                s.close()
                raise
        except BackendError as exc:
            return await fail(exc.reason, f"daemon: dial {req.addr}: {exc}", exc.code)
        except ValueError as exc:
            return await fail("bad_request", f"daemon: dial {req.addr}: {exc}",
                              ErrorCode.BAD_REQUEST)
        except OSError as exc:
            return await fail("dial_failed", f"daemon: dial {req.addr}: {exc}",
                              ErrorCode.DIAL_FAILED)
        local, remote = _sockaddr(s.getsockname()), _sockaddr(s.getpeername())
        limit = max_datagram(ip.version)
        try:
            await io.sendall(sock, proto.encode_dial_reply(True, local=local, remote=remote,
                                                           max_datagram=limit))
        except OSError:
            s.close()
            self.refuse("out", "app_gone", remote=remote, local=local,
                        error="the app hung up before the dial reply")
            return False
        d = UdpDial(self, s, local, remote, limit, client)
        self.per_client[client] = mine + 1
        self.dials.add(d)
        if not d.start(sock, reader.take_rest()):
            d.close()  # the log refused the flow (a reject is written): the app sees EOF
            return False  # the caller closes the app's socket
        self._ensure_reaper()
        log.info("UDP dial %s -> %s (max datagram %d)", local, remote, limit)
        return True

    # ---- listeners -------------------------------------------------------------------

    def check_listen(self, network: str, addr: str) -> proto.ListenAddr:
        """Validate a UDP listen request (ValueError)."""
        return parse_udp_listen_addr(network, addr)

    def bind(self, ips: list[Any], port: int) -> list[socket.socket]:
        """Bound UDP sockets on `port` of every address (marked, no reuse, no
        fragmentation); an OSError closes what was bound."""
        socks: list[socket.socket] = []
        try:
            for ip in ips:
                s = udp_socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6)
                socks.append(s)
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_IP, io.IP_FREEBIND, 1)
                s.bind((str(ip), port))
        except OSError:
            for s in socks:
                s.close()
            raise
        return socks

    def add_listener(self, lst: ListenerRegistration) -> int:
        """Start serving a bound UDP listener; returns its max_datagram: the largest of its
        families' (IPv4's on a dual-stack listener; a datagram to an IPv6 peer may be 20
        bytes less, else it is dropped with a notice)."""
        limit = max(max_datagram(ip.version) for ip in lst.ips)
        ul = UdpListener(self, lst, limit)
        self.listeners[lst.id] = ul
        lst.udp = ul
        ul.start()
        self._ensure_reaper()
        return limit

    def remove_listener(self, lst: ListenerRegistration, *, cut: bool = False) -> None:
        ul = self.listeners.pop(lst.id, None)
        if ul is not None:
            ul.close(cut=cut)

    async def attach(self, lst: ListenerRegistration, sock: socket.socket,
                     reader: proto.LineReader) -> bool:
        """An accept request for a UDP listener: the packet channel (one per listener)."""
        ul = self.listeners.get(lst.id)
        if ul is None:
            return False
        if ul.channel is not None and not ul.channel.closed:
            log.warning("listener %s already has its packet channel; refusing another", lst.id)
            self.metrics.slot_dropped("over_limit")
            with contextlib.suppress(OSError):
                await io.sendall(sock, proto.encode_accept_refusal(
                    f"daemon: UDP listener {lst.addr} already has its packet channel (one "
                    "per listener); close the other PacketListener first", ErrorCode.LIMIT))
            return False
        local = proto.format_addr(lst.ips[0], lst.port)
        await io.sendall(sock, proto.encode_accept_header(lst.id, local, "",
                                                          max_datagram=ul.limit))
        if self.listeners.get(lst.id) is not ul:
            return False  # unregistered meanwhile
        ul.attach(sock, reader.take_rest())
        return True

    async def close_all(self, *, notice: tuple[str, ErrorCode] | None = None) -> None:
        """Node down or shutdown: every UDP flow is cut (its close record written)."""
        frame = None if notice is None else encode_notice(*notice)
        for d in list(self.dials):
            d.close(cut=True, notice=frame)
        for ul in list(self.listeners.values()):
            ul.close(cut=True, notice=frame)
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None


def _peer_pid(sock: socket.socket) -> int:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return 0
    return int(struct.unpack("3i", creds)[0])
