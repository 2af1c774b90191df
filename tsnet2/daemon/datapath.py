"""Flows: outbound dials (channel 0x03), listeners and parked accept slots (channel 0x04).

Inbound flows are real kernel TCP connections accepted on the node's tailnet addresses. Each
listener owns its bound sockets and a bounded FIFO of parked slots; a slot is an app
connection waiting for a flow. The daemon watches every parked slot, so a slot whose app went
away is dropped before it could swallow a flow. Outbound dials resolve the target from the
netmap and connect a kernel TCP socket through the WireGuard device.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal, Protocol

from tsnet2 import proto
from tsnet2.daemon import io, zerocopy
from tsnet2.daemon.backend import Backend, BackendError, whois_summary
from tsnet2.daemon.io import (
    IP_FREEBIND,
    TCP_KEEPALIVE_IDLE,
    keepalive,
    mark,
    read_line,
    reset,
)
from tsnet2.daemon.metrics import Metrics
from tsnet2.daemon.splice import Relay, Splice
from tsnet2.daemon.zerocopy import PipePool, PipeSplice, RelayMode
from tsnet2.node import NodeError
from tsnet2.node.nflog import NflogReader
from tsnet2.proto import ErrorCode
from tsnet2.proto.udp import UDP_NETWORKS
from tsnet2.traffic import Flow, FlowVia, RejectReason, TrafficLog, TrafficLogError

if TYPE_CHECKING:
    import ssl

    from tsnet2.daemon.tls import TLSLayer
    from tsnet2.daemon.udp import UdpDatapath
    from tsnet2.proto.tls import TLSDialOptions, TLSInfo

log = logging.getLogger("tsnet2d.datapath")

DIAL_TIMEOUT = 30.0  # seconds for the kernel TCP connect to a peer
OFFLINE_DIAL_TIMEOUT = 3.0  # the same for a peer the control server reports offline
HEADER_TIMEOUT = 10.0  # seconds for a client to send its header line
SLOT_WAIT = 10.0  # seconds an inbound flow waits for a parked slot before it is dropped
MAX_SLOTS = 64  # parked slots per listener; more are refused (a client parks 2 by default)
BACKLOG = 512
# Port 0 is given a port of the prototype's pool, 10002-19999 (its pickEphemeralPort in
# cmd/tsnet2d/daemon/daemon.go): the kernel's own ephemeral range would show the app other
# numbers than the Go daemon does.
EPHEMERAL_PORTS = range(10002, 20000)
UDP_IDLE_TIMEOUT = 60.0
"""Seconds without a datagram after which a UDP flow is reaped (``--udp-idle-timeout``)."""
EARLY_DATA_MAX = 256 * 1024  # app bytes buffered while a dial connects (then we stop reading)
CERT_WAIT = 10.0  # seconds listen_tls waits for a node's first certificate being requested

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Metric reasons (fine-grained) to the traffic log's reject reasons.
REJECT_REASON: dict[str, RejectReason] = {
    "bad_request": "dial_failed", "not_running": "dial_failed",
    "no_such_peer": "dial_failed", "dial_failed": "dial_failed",
    "dial_timeout": "dial_failed", "app_gone": "app_gone",
    "log_unavailable": "log_unavailable", "no_listener": "no_listener",
    "listener_closed": "no_listener", "no_slot": "no_slot", "shutdown": "shutdown",
    "target_failed": "target_failed", "tls_failed": "tls_failed", "tls_busy": "over_limit",
}

# A flow's TLS session (listen_tls, TLS dials): the layer on its tailnet socket, what was
# negotiated. tsnet2.daemon.tls is imported only when a TLS flow comes (daemon RSS).
TLSSession = tuple["TLSLayer", "TLSInfo"]


class Forwarder(Protocol):
    """A listener whose flows the daemon forwards itself (`tsnet2.daemon.serve.Forward`)
    instead of handing them to parked slots."""

    async def inbound(self, dp: Datapath, lst: ListenerRegistration,
                      conn: socket.socket) -> None:
        """Serve one accepted tailnet connection."""


class ListenError(Exception):
    """A listener could not be registered; the message is for the app, `code` for its
    client library (EADDRINUSE is `address_in_use`)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.OTHER) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(eq=False)
class Slot:
    """A parked accept connection waiting for a flow."""

    sock: socket.socket
    # (tailnet socket, local, remote, seconds waited, TLS session of a listen_tls flow)
    handed: asyncio.Future[tuple[socket.socket, str, str, float, TLSSession | None]]


@dataclasses.dataclass(eq=False)
class ListenerRegistration:
    """A registered listener: its bound sockets, parked slots and owner."""

    id: str
    network: str
    port: int
    addr: str
    owner: object
    ips: list[IPAddress] = dataclasses.field(default_factory=list)
    socks: list[socket.socket] = dataclasses.field(default_factory=list)
    slots: collections.deque[Slot] = dataclasses.field(default_factory=collections.deque)
    slot_added: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    # listen_tls: the daemon terminates TLS with the node's certificate (its context)
    tls: ssl.SSLContext | None = None
    alpn: tuple[str, ...] | None = None
    handshakes: int = 0  # TLS handshakes in progress (at most tls.MAX_HANDSHAKES)
    forward: Forwarder | None = None  # serve: the daemon forwards flows, no slots
    udp: Any = None  # a UDP listener's tsnet2.daemon.udp.UdpListener (no slots)


class Datapath:
    """Owns listeners, parked slots and live flows for one daemon."""

    def __init__(
        self,
        backend: Backend,
        traffic: TrafficLog,
        spawn: Callable[[Any], asyncio.Task[None]],
        metrics: Metrics | None = None,
        keepalive_idle: float = TCP_KEEPALIVE_IDLE,
        relay: RelayMode = "auto",
        udp_idle_timeout: float = UDP_IDLE_TIMEOUT,
    ) -> None:
        """``keepalive_idle``: TCP keepalive of every tailnet socket (see
        :func:`~tsnet2.daemon.io.keepalive`; 0 turns it off). ``relay``: ``"auto"`` relays
        flows with splice(2) (:mod:`~tsnet2.daemon.zerocopy`) when the traffic log records
        no payload and the system has it, else by copying (:mod:`~tsnet2.daemon.splice`);
        ``"copy"`` always copies."""
        if relay not in ("auto", "copy"):
            raise ValueError(f'relay must be "auto" or "copy", got {relay!r}')
        self.backend = backend
        self.keepalive_idle = keepalive_idle
        self.traffic = traffic
        self.metrics = metrics or Metrics()
        self._spawn = spawn
        # One bytes hook per direction, shared by every flow (not a partial per flow).
        self._on_bytes = {d: self.metrics.flow_bytes_counter(d) for d in ("in", "out")}
        self.listeners: dict[str, ListenerRegistration] = {}
        self.splices: set[Relay] = set()
        # Pipes for zero-copy flows; None: every flow copies.
        self.pipes: PipePool | None = (
            PipePool() if relay == "auto" and zerocopy.available()
            and traffic.mode != "payload" else None)
        self.log_stalled = False  # the traffic log's stdout is behind: flows are paused
        self._ephemeral_count = 0  # port-0 ports handed out or skipped (the Go counter)
        self._nflog: NflogReader | None = None
        self.udp_idle_timeout = udp_idle_timeout
        self._udp: UdpDatapath | None = None  # loaded with the first UDP dial or listener

    @property
    def udp(self) -> UdpDatapath:
        """UDP dials and listeners (`tsnet2.daemon.udp`), imported on first use so a daemon
        that never sees UDP does not carry the module."""
        if self._udp is None:
            from tsnet2.daemon.udp import UdpDatapath

            self._udp = UdpDatapath(self, self.udp_idle_timeout)
        return self._udp

    # ---- listeners -------------------------------------------------------------------

    async def register_listener(self, network: str, addr: str, owner: object,
                                forward: Forwarder | None = None, *, tls: bool = False,
                                alpn: tuple[str, ...] | None = None) -> ListenerRegistration:
        """Bind a listener on the node's tailnet addresses; return it (port 0 resolved).
        With ``forward``, the daemon serves its flows itself (`tsnet2.daemon.serve`)."""
        udp = network in UDP_NETWORKS
        try:
            la = (self.udp.check_listen(network, addr) if udp
                  else proto.parse_listen_addr(network, addr))
        except proto.WireAddressError as exc:
            raise ListenError(f"daemon: {exc}", ErrorCode.BAD_REQUEST) from exc
        if udp and (tls or forward is not None):
            raise ListenError("daemon: a UDP listener has one packet channel; TLS (DTLS) and "
                              "forward sockets are for TCP listeners", ErrorCode.BAD_REQUEST)
        if not self.backend.running:
            try:
                await self.backend.wait_running(timeout=10)
            except BackendError as exc:
                raise ListenError(f"daemon: cannot listen: {exc}", exc.code) from exc
            except TimeoutError as exc:
                down = self.backend.down_error()
                raise ListenError(f"daemon: cannot listen, the node is not running: {down}",
                                  down.code) from exc
        # With ``tls`` (listen_tls) the daemon terminates TLS on every flow with the node's
        # certificate, offering ``alpn``; no certificate is code ``no_certificate``.
        tls_ctx = await self._tls_server_context(la.network, forward) if tls else None
        v4, v6 = self.backend.addresses()
        ips: list[IPAddress] = []
        if la.host is not None and not la.host.is_unspecified:
            if la.host not in (v4, v6):
                raise ListenError(f"daemon: {la.host} is not one of this node's addresses",
                                  ErrorCode.BAD_REQUEST)
            ips = [la.host]
        else:
            if la.network in ("tcp", "tcp4", "udp", "udp4") and v4 is not None:
                ips.append(v4)
            if la.network in ("tcp", "tcp6", "udp", "udp6") and v6 is not None:
                ips.append(v6)
        if not ips:
            raise ListenError(f"daemon: node has no address for {la.network}",
                              ErrorCode.BAD_REQUEST)
        for other in self.listeners.values():
            if (other.port == la.port and la.port != 0 and set(other.ips) & set(ips)
                    and (other.udp is None) != udp):
                raise ListenError(
                    f"daemon: listener already registered for {{{other.network} {la.port}}}",
                    ErrorCode.ADDRESS_IN_USE,
                )
        socks = self._bind(ips, la.port, udp=udp)
        port = socks[0].getsockname()[1]
        shown = proto.format_addr(la.host, port) if la.host is not None else f":{port}"
        lst = ListenerRegistration(id=proto.new_id(), network=la.network, port=port,
                                   addr=shown, owner=owner, ips=ips, socks=socks,
                                   forward=forward, tls=tls_ctx, alpn=alpn if tls else None)
        self.listeners[lst.id] = lst
        if udp:
            self.udp.add_listener(lst)
        for s in socks if not udp else ():
            lst.tasks.append(self._spawn(self._accept_loop(lst, s)))
        await self._sync_guard()
        log.info("listener %s: %s %s on %s%s", lst.id, la.network, shown,
                 ", ".join(str(i) for i in ips), " (TLS)" if tls else "")
        return lst

    def _bind(self, ips: list[IPAddress], requested: int, *,
              udp: bool = False) -> list[socket.socket]:
        """Bind `requested` on every address; a fixed port that is taken is an error
        (`address_in_use`), never silently replaced by another one. Port 0 takes the next
        free port of :data:`EPHEMERAL_PORTS` (see :meth:`_ephemeral_ports`); one that
        another socket on these addresses holds is skipped, and a range with no free port
        left is an `address_in_use` error."""
        bind = self.udp.bind if udp else self._bind_port
        if requested:
            try:
                return bind(ips, requested)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ListenError(f"daemon: port {requested} is in use on this node "
                                      f"({', '.join(map(str, ips))}); pick another port",
                                      ErrorCode.ADDRESS_IN_USE) from exc
                raise ListenError(f"daemon: cannot listen: {exc}") from exc
        for port in self._ephemeral_ports():
            try:
                return bind(ips, port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise ListenError(f"daemon: cannot listen: {exc}") from exc
        first, last = EPHEMERAL_PORTS[0], EPHEMERAL_PORTS[-1]
        raise ListenError(f"daemon: no free port for a port-0 listener: every port of "
                          f"{first}-{last} is in use on this node "
                          f"({', '.join(map(str, ips))}); close a listener or pick a port",
                          ErrorCode.ADDRESS_IN_USE)

    def _ephemeral_ports(self) -> Iterator[int]:
        """Candidate ports for a port-0 listener, each port of the range at most once.

        The prototype's order: port ``10002 + n % 9998`` for its counter n = 1, 2, ... (a
        fresh daemon hands out 10003 first, then 10004, ...; after 19999 comes 10002). The
        counter lives as long as the daemon, like the Go daemon's process-wide one. Unlike
        the prototype, a port a listener of this node holds is skipped (the prototype
        answered "already registered"); the caller skips ports a bind finds taken.
        """
        held = {lst.port for lst in self.listeners.values()}
        for _ in EPHEMERAL_PORTS:
            self._ephemeral_count += 1
            port = EPHEMERAL_PORTS[self._ephemeral_count % len(EPHEMERAL_PORTS)]
            if port not in held:
                yield port

    def _bind_port(self, ips: list[IPAddress], port: int) -> list[socket.socket]:
        """Listening sockets on `port` of every address; an OSError closes what was bound."""
        socks: list[socket.socket] = []
        try:
            for ip in ips:
                fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
                s = socket.socket(fam, socket.SOCK_STREAM)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                mark(s)
                keepalive(s, self.keepalive_idle)  # inherited by accepted sockets
                s.bind((str(ip), port))
                s.listen(BACKLOG)
                s.setblocking(False)
        except OSError:
            for s in socks:
                s.close()
            raise
        return socks

    async def unregister_listener(self, listener_id: str) -> bool:
        """Close a listener, its sockets and its parked slots. False if the id is unknown."""
        lst = self.listeners.pop(listener_id, None)
        if lst is None:
            return False
        await self._sync_guard()  # closed to peers before the sockets go
        if lst.udp is not None:
            self.udp.remove_listener(lst)
        for t in lst.tasks:
            t.cancel()
        for t in lst.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for s in lst.socks:
            s.close()
        while lst.slots:
            slot = lst.slots.popleft()
            if not slot.handed.done():
                slot.handed.cancel()
        log.info("listener %s closed", listener_id)
        return True

    async def _sync_guard(self) -> None:
        pairs = {(ip, lst.port) for lst in self.listeners.values() for ip in lst.ips
                 if lst.udp is None}
        udp = {(ip, lst.port) for lst in self.listeners.values() for ip in lst.ips
               if lst.udp is not None}
        try:
            await self.backend.set_listeners(pairs, udp)
        except NodeError as exc:
            log.error("nftables guard: cannot open listeners %s: %s", sorted(map(str, pairs)),
                      exc)

    # ---- refused inbound flows: SYNs the guard answered with a reset (via NFLOG) -----

    def start_refusal_log(self, group: int) -> None:
        """Read the guard's copies of refused SYNs and log each as a `reject`."""
        self.stop_refusal_log()
        reader = NflogReader(group)
        self._nflog = reader
        asyncio.get_running_loop().add_reader(reader.fileno(), self._on_refused)

    def stop_refusal_log(self) -> None:
        """Stop reading refused SYNs."""
        reader, self._nflog = self._nflog, None
        if reader is not None:
            asyncio.get_running_loop().remove_reader(reader.fileno())
            reader.close()

    def _on_refused(self) -> None:
        if self._nflog is None:
            return
        try:
            refused = self._nflog.read_ready()
        except NodeError as exc:
            log.warning("refused-flow log: %s", exc)
            return
        for syn in refused:
            self._refuse("in", "no_listener", remote=proto.format_addr(syn.src, syn.sport),
                         local=proto.format_addr(syn.dst, syn.dport),
                         error=f"no listener on port {syn.dport}; refused with a reset")

    async def release_owner(self, owner: object) -> None:
        """Unregister every listener a (now disconnected) control connection owned."""
        for lst in [x for x in self.listeners.values() if x.owner is owner]:
            await self.unregister_listener(lst.id)

    async def node_down(self, message: str) -> None:
        """The node goes away: every parked slot is told `message` (code node_down) before
        its listener goes, and live flows are cut (and logged)."""
        refusal = proto.encode_accept_refusal(message, ErrorCode.NODE_DOWN)
        for lst in self.listeners.values():
            for slot in lst.slots:
                if not slot.handed.done():
                    with contextlib.suppress(OSError):
                        slot.sock.send(refusal)  # a slot's buffer is empty: never blocks
        if self._udp is not None:
            await self._udp.close_all(notice=(message, ErrorCode.NODE_DOWN))
        await self.close_all()

    def log_pressure(self) -> None:
        """The traffic log's stdout reader fell behind or caught up (fail-closed): every flow
        stops reading until it catches up; new flows are refused by the log meanwhile.
        Follows :attr:`TrafficLog.stalled` now, however many times it is called."""
        stalled = self.traffic.stalled
        if stalled == self.log_stalled:
            return
        self.log_stalled = stalled
        for sp in self.splices:
            sp.pause_for_log(stalled)

    async def close_all(self) -> None:
        """Daemon or node shutdown: listeners go, live flows are cut (and logged)."""
        if self._udp is not None:
            await self._udp.close_all()  # UDP flows are cut before their listeners go
        for lid in list(self.listeners):
            await self.unregister_listener(lid)
        cut = list(self.splices)
        for sp in cut:
            sp.abort()
        if cut:
            # Let the transports report their loss, so each flow writes its close record.
            await asyncio.wait([sp.done for sp in cut], timeout=5)
        if self.pipes is not None:
            self.pipes.clear()

    # ---- inbound ---------------------------------------------------------------------

    async def _accept_loop(self, lst: ListenerRegistration, lsock: socket.socket) -> None:
        while True:
            try:
                conn, _ = await io.accept(lsock)
            except OSError as exc:
                log.warning("listener %s: accept failed: %s", lst.id, exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            self._spawn(self._inbound(lst, conn) if lst.forward is None
                        else lst.forward.inbound(self, lst, conn))

    async def _inbound(self, lst: ListenerRegistration, conn: socket.socket,
                       waited: float = 0.0, tls: TLSSession | None = None) -> None:
        try:
            remote = _sockaddr(conn.getpeername())
            local = _sockaddr(conn.getsockname())
        except OSError:
            _drop(conn, tls)
            return
        loop = asyncio.get_running_loop()
        handed = False
        try:
            if not waited and not self._log_ready("in", remote=remote, local=local,
                                                  listener_id=lst.id):
                return
            if lst.tls is not None and tls is None:
                tls = await self._tls_accept(lst, conn, local, remote)
                if tls is None:
                    return
            start = loop.time() - waited
            deadline = start + SLOT_WAIT
            while True:
                if lst.id not in self.listeners:
                    self._refuse("in", "listener_closed", local=local, remote=remote,
                                 listener_id=lst.id, error="listener closed")
                    return
                slot = self._take_slot(lst)
                if slot is not None:
                    self.metrics.slot_wait(loop.time() - start)
                    slot.handed.set_result((conn, local, remote, loop.time() - start, tls))
                    handed = True
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self.metrics.slot_wait(loop.time() - start)
                    self._refuse("in", "no_slot", local=local, remote=remote,
                                 listener_id=lst.id,
                                 error=f"no accept slot within {SLOT_WAIT:.0f}s")
                    return
                lst.slot_added.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lst.slot_added.wait(), remaining)
        finally:
            if not handed:
                _drop(conn, tls)

    async def _tls_accept(self, lst: ListenerRegistration, conn: socket.socket, local: str,
                          remote: str) -> TLSSession | None:
        """The TLS server handshake of a listen_tls flow (bounded in time, and in number per
        listener); None when it failed and the flow was refused (``tls_failed``, or
        ``over_limit`` past :data:`~tsnet2.daemon.tls.MAX_HANDSHAKES`)."""
        from tsnet2.daemon import tls as dtls
        from tsnet2.daemon.certs import CertUnavailable
        try:
            # The listener's context, unless the certificate expired (renewals failing).
            ctx = self.backend.certs.server_context()
        except CertUnavailable as exc:
            reset(conn)
            self._refuse("in", "tls_failed", local=local, remote=remote, listener_id=lst.id,
                         error=f"TLS: {str(exc).removeprefix('daemon: ')}")
            return None
        if lst.handshakes >= dtls.MAX_HANDSHAKES:
            reset(conn)
            self._refuse("in", "tls_busy", local=local, remote=remote, listener_id=lst.id,
                         error=f"TLS: {dtls.MAX_HANDSHAKES} handshakes already in progress "
                               "on this listener")
            return None
        lst.handshakes += 1
        started = time.monotonic()
        try:
            session = await dtls.server_handshake(conn, ctx, lst.alpn)
        except dtls.TLSHandshakeFailed as exc:
            self.metrics.tls_handshake("in", "error", time.monotonic() - started)
            self._refuse("in", "tls_failed", local=local, remote=remote, listener_id=lst.id,
                         error=f"TLS: {exc}")
            return None
        finally:
            lst.handshakes -= 1
        self.metrics.tls_handshake("in", "ok", time.monotonic() - started)
        return session

    async def _tls_server_context(self, network: str,
                                  forward: Forwarder | None) -> ssl.SSLContext:
        """The node's server context for a listen_tls listener, or a ListenError (code
        ``no_certificate`` when the node has none). A node that just came up and is still
        asking for its first certificate is waited for, up to :data:`CERT_WAIT` seconds,
        so that ``up()`` then ``listen_tls()`` works."""
        from tsnet2.daemon.certs import CertUnavailable
        if forward is not None:
            raise ListenError("daemon: a listener that forwards to a socket cannot also "
                              "terminate TLS; use listen_tls without forward_socket",
                              ErrorCode.BAD_REQUEST)
        if network not in ("tcp", "tcp4", "tcp6"):
            raise ListenError(f"daemon: TLS needs a tcp listener, not {network}",
                              ErrorCode.BAD_REQUEST)
        certs = self.backend.certs
        deadline = time.monotonic() + CERT_WAIT
        while True:
            since = certs.changes
            try:
                return certs.server_context()
            except CertUnavailable as exc:
                left = deadline - time.monotonic()
                if left <= 0 or certs.unsupported or certs.last_error or \
                        certs.tls_dir is None:
                    raise ListenError(f"daemon: cannot listen with TLS: "
                                      f"{str(exc).removeprefix('daemon: ')}",
                                      ErrorCode.NO_CERTIFICATE) from exc
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(certs.wait_changed(since), left)

    @staticmethod
    def _take_slot(lst: ListenerRegistration) -> Slot | None:
        while lst.slots:
            slot = lst.slots.popleft()
            if not slot.handed.done():
                return slot
        return None

    async def park(self, sock: socket.socket, reader: proto.LineReader) -> bool:
        """Serve one accept channel: park it, then splice the flow it is handed.

        Returns True once `sock` belongs to a running splice (the caller must not close
        it; the splice does), False when the caller still owns it.
        """
        m = self.metrics
        line = await read_line(sock, reader, HEADER_TIMEOUT)
        listener_id = proto.decode_accept_request(line)
        lst = self.listeners.get(listener_id)
        if lst is None:
            log.warning("accept slot for unknown listener %s refused", listener_id)
            m.slot_dropped("unknown_listener")
            return False
        if lst.udp is not None:  # a UDP listener's one packet channel
            return await self.udp.attach(lst, sock, reader)
        if lst.forward is not None:
            log.warning("accept slot for forwarding listener %s refused", listener_id)
            m.slot_dropped("unknown_listener")
            return False
        if len(lst.slots) >= MAX_SLOTS:
            log.warning("listener %s has %d parked slots; refusing another", lst.id, MAX_SLOTS)
            m.slot_dropped("over_limit")
            return False
        loop = asyncio.get_running_loop()
        slot = Slot(sock=sock, handed=loop.create_future())
        lst.slots.append(slot)
        lst.slot_added.set()
        m.slot_parked(+1)

        def app_spoke() -> None:
            # The app closed the slot, or wrote to it (which the protocol forbids).
            if not slot.handed.done():
                slot.handed.cancel()

        loop.add_reader(sock, app_spoke)  # a callback, not a task per parked slot
        try:
            try:
                await slot.handed
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # this task is being cancelled (shutdown): not a dropped slot
        finally:
            loop.remove_reader(sock)
            m.slot_parked(-1)
            if not slot.handed.done():
                slot.handed.cancel()
            if slot.handed.cancelled():
                with contextlib.suppress(ValueError):
                    lst.slots.remove(slot)
        if slot.handed.cancelled():
            # The app closed the slot (or wrote to it, which the protocol forbids), or
            # the listener went away.
            m.slot_dropped("listener_closed" if lst.id not in self.listeners
                           else "app_closed")
            return False
        conn, local, remote, waited, tls = slot.handed.result()
        info = None if tls is None else tls[1]
        try:
            await io.sendall(sock, proto.encode_accept_header(lst.id, local, remote,
                                                              tls=info))
        except OSError as exc:
            # The app vanished between the check and the hand-off: give the flow to the
            # next slot instead of losing it.
            log.warning("accept slot for %s died (%s); re-queueing flow", lst.id, exc)
            m.slot_dropped("handoff_failed")
            self._spawn(self._inbound(lst, conn, waited, tls))
            return False
        whois = whois_summary(self._node_at(remote))
        try:
            flow = self.traffic.open_flow(direction="in", local=local, remote=remote,
                                          whois=whois, listener_id=lst.id,
                                          tls=None if info is None else info.to_json())
        except BaseException:
            _drop(conn, tls)
            raise
        return await self._splice("in", flow, sock, conn, b"", relay=_tls_relay(tls))

    def _refuse(self, direction: Literal["in", "out"], reason: str, *, remote: str,
                error: str, local: str = "", listener_id: str | None = None,
                via: FlowVia | None = None, target: str | None = None) -> None:
        """Account for a flow that never opened: a `reject` record, metrics, daemon log."""
        log.warning("%s flow %s %s refused (%s): %s", direction,
                    "from" if direction == "in" else "to", remote, reason, error)
        self.metrics.flow_refused(direction, reason)
        whois = None
        with contextlib.suppress(ValueError):
            whois = whois_summary(self._node_at(remote))
        self.traffic.reject(direction=direction, remote=remote, local=local or None,
                            reason=REJECT_REASON.get(reason, "dial_failed"), error=error,
                            whois=whois, listener_id=listener_id, via=via, target=target)

    def _log_ready(self, direction: Literal["in", "out"], *, remote: str, local: str = "",
                   listener_id: str | None = None, via: FlowVia | None = None,
                   target: str | None = None) -> bool:
        """False (and the flow is refused) while the traffic log cannot take records."""
        try:
            self.traffic.check_writable()
        except TrafficLogError as exc:
            self._refuse(direction, "log_unavailable", remote=remote, local=local,
                         listener_id=listener_id, error=f"traffic log unavailable: {exc}",
                         via=via, target=target)
            return False
        return True

    # ---- outbound --------------------------------------------------------------------

    async def dial(self, sock: socket.socket, reader: proto.LineReader) -> bool:
        """Serve one dial channel: connect to the peer, reply, splice.

        Returns True once `sock` belongs to a running splice (the caller must not close
        it; the splice does), False when the caller still owns it.
        """
        line = await read_line(sock, reader, HEADER_TIMEOUT)
        req = proto.decode_dial_request(line)
        if req.network in UDP_NETWORKS:
            return await self.udp.dial(sock, req, reader)
        if not self._log_ready("out", remote=req.addr):
            with contextlib.suppress(OSError):
                await io.sendall(sock, proto.encode_dial_reply(
                    False, err="daemon: traffic log unavailable; refusing new flows",
                    code=ErrorCode.LOG_UNAVAILABLE))
            return False
        watch = _AppWatch(sock, bytearray(reader.take_rest()))
        try:
            peer, tls = await self._connect_flow(req.network or "tcp", req.addr, req.tls)
        except asyncio.CancelledError:
            watch.stop()
            if not watch.gone(cancelled=True):
                raise  # cancelled from outside (shutdown)
            self._refuse("out", "app_gone", remote=req.addr,
                         error="dial abandoned: the app closed the connection")
            return False
        except (BackendError, OSError, TimeoutError, ValueError) as exc:
            watch.stop()  # before any await: a hang-up now must not cancel the reply
            msg = str(exc) or type(exc).__name__
            code = ErrorCode.DIAL_FAILED
            if isinstance(exc, BackendError):
                reason, code = exc.reason, exc.code
            elif isinstance(exc, TimeoutError):
                msg = f"dial {req.addr}: timed out after {DIAL_TIMEOUT:.0f}s"
                reason = "dial_timeout"
            elif isinstance(exc, ValueError):
                reason, code = "bad_request", ErrorCode.BAD_REQUEST
            else:
                reason = "dial_failed"
            self._refuse("out", reason, remote=req.addr, error=msg)
            with contextlib.suppress(OSError):
                await io.sendall(sock, proto.encode_dial_reply(False, err=msg, code=code))
            return False
        finally:
            watch.stop()  # idempotent; also on an unexpected error
        early = watch.early
        info = None if tls is None else tls[1]
        local = _sockaddr(peer.getsockname())
        remote = _sockaddr(peer.getpeername())
        try:
            await io.sendall(
                sock, proto.encode_dial_reply(True, local=local, remote=remote, tls=info)
            )
        except OSError:
            _drop(peer, tls, rst=False)
            self._refuse("out", "app_gone", remote=remote, local=local,
                         error="the app hung up before the dial reply")
            return False
        whois = whois_summary(self._node_at(remote))
        try:
            flow = self.traffic.open_flow(direction="out", local=local, remote=remote,
                                          whois=whois,
                                          tls=None if info is None else info.to_json())
        except BaseException:
            _drop(peer, tls, rst=False)
            raise
        return await self._splice("out", flow, sock, peer, bytes(early),
                                  relay=_tls_relay(tls))

    async def _connect_flow(self, network: str, addr: str, tls: TLSDialOptions | None
                            ) -> tuple[socket.socket, TLSSession | None]:
        """Connect to the peer (:meth:`_connect`), then, for a TLS dial, do the client
        handshake with the node's client context: the peer's certificate must verify
        against the tailnet CA for ``tls.server_name`` or else the dialled node's FQDN. A
        failed handshake is a BackendError with reason and code ``tls_failed``."""
        peer = await self._connect(network, addr)
        if tls is None:
            return peer, None
        from tsnet2.daemon import tls as dtls
        from tsnet2.daemon.certs import CertUnavailable
        started = time.monotonic()
        try:
            name = tls.server_name or self._tls_peer_name(peer, addr)
            ctx = self.backend.certs.client_context()
        except (BackendError, CertUnavailable, OSError) as exc:
            peer.close()
            raise BackendError(f"daemon: dial {addr}: TLS: "
                               f"{str(exc).removeprefix('daemon: ')}", "tls_failed",
                               ErrorCode.TLS_FAILED) from exc
        except BaseException:
            peer.close()
            raise
        try:
            session = await dtls.client_handshake(peer, ctx, name, tls.alpn)
        except dtls.TLSHandshakeFailed as exc:
            self.metrics.tls_handshake("out", "error", time.monotonic() - started)
            raise BackendError(f"daemon: dial {addr}: TLS: {exc}", "tls_failed",
                               ErrorCode.TLS_FAILED) from exc
        self.metrics.tls_handshake("out", "ok", time.monotonic() - started)
        return peer, session

    def _tls_peer_name(self, peer: socket.socket, addr: str) -> str:
        """The name a TLS dial verifies when the app gave none: the connected node's FQDN
        from the netmap (without the trailing dot)."""
        node = self._node_at(_sockaddr(peer.getpeername()))
        name = str((node or {}).get("fqdn") or "").rstrip(".")
        if not name:
            raise BackendError(f"the netmap has no name for the peer at {addr} to verify "
                               "its certificate for; pass server_name")
        return name

    async def _connect(self, network: str, addr: str) -> socket.socket:
        if network not in ("tcp", "tcp4", "tcp6"):
            raise BackendError(f"unsupported network {network!r}: tsnet2 dials tcp only",
                               "bad_request", ErrorCode.BAD_REQUEST)
        if not self.backend.running:
            down = self.backend.down_error()
            raise BackendError(str(down), "not_running", down.code)
        host, port = proto.split_host_port(addr)
        family = {"tcp4": 4, "tcp6": 6}.get(network)
        ip = self.backend.resolve(host, family)
        node = self.backend.node_by_ip(ip)
        offline = node is not None and node.get("online") is False
        fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mark(s)
            keepalive(s, self.keepalive_idle)
            # A peer the control server calls offline gets a short try (the netmap may lag
            # behind a peer that just came back), then a "peer offline" answer.
            async with asyncio.timeout(OFFLINE_DIAL_TIMEOUT if offline else DIAL_TIMEOUT):
                await io.connect(s, (str(ip), port))
        except (TimeoutError, OSError) as exc:
            s.close()
            if offline and node is not None:
                name = node.get("name") or host
                seen = node.get("last_seen")
                raise BackendError(
                    f"dial {addr}: peer {name!r} is offline (not connected to the control "
                    f"server{f' since {seen}' if seen else ''}): {exc or 'timed out'}",
                    "dial_failed", ErrorCode.PEER_OFFLINE) from exc
            raise
        except BaseException:
            s.close()
            raise
        return s

    def _node_at(self, addr: str) -> dict[str, Any] | None:
        """The tailnet node at ``addr`` (``ip:port`` as `_sockaddr` makes it), if any.
        Raises ValueError (a WireAddressError) for text that is not ``host:port``."""
        host, _port = proto.split_host_port(addr)
        node = self.backend.node_by_addr(host)
        if node is None:  # not a node's address in canonical form: the exact, slower way
            with contextlib.suppress(ValueError):
                node = self.backend.node_by_ip(ipaddress.ip_address(host))
        return node

    # ---- splice ----------------------------------------------------------------------

    async def _splice(self, direction: Literal["in", "out"], flow: Flow,
                      app: socket.socket, peer: socket.socket, pending: bytes,
                      relay: Callable[..., Relay] | None = None) -> bool:
        """Attach both sockets to a Splice and return True: the splice now owns them.

        Nothing waits for the flow's end: the Splice's close callback does the
        bookkeeping, so no task or coroutine frame lives as long as the flow.
        """
        m = self.metrics
        m.flow_opened(direction)
        started = time.monotonic()

        def closed(sp: Relay) -> None:
            if sp in self.splices:  # exactly once, whichever way the flow ended
                self.splices.discard(sp)
                m.flow_closed(direction, sp.result, time.monotonic() - started)

        sp: Relay
        if relay is not None:  # serve's http mode: `relay(flow, on_bytes=, on_close=)`
            sp = relay(flow, on_bytes=self._on_bytes[direction], on_close=closed)
        elif self.pipes is not None:
            sp = PipeSplice(flow, self.pipes, on_bytes=self._on_bytes[direction],
                            on_close=closed)
        else:
            sp = Splice(flow, on_bytes=self._on_bytes[direction], on_close=closed)
        self.splices.add(sp)
        if self.log_stalled:
            sp.pause_for_log(True)
        try:
            with contextlib.suppress(OSError):
                peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await sp.start(app, peer, pending)
        except BaseException:
            sp.abort()
            closed(sp)
            raise
        return True


def _drop(conn: socket.socket, tls: TLSSession | None, *, rst: bool = True) -> None:
    """Close a tailnet socket that never reached a relay (with a reset unless ``rst`` is
    false); a TLS flow's socket belongs to its layer's transport, which is aborted."""
    if tls is not None:
        tls[0].reset(rst=rst)
    elif rst:
        reset(conn)
    else:
        conn.close()


def _tls_relay(tls: TLSSession | None) -> Callable[..., Relay] | None:
    """The relay factory of `Datapath._splice` for a TLS flow (None: the default one)."""
    if tls is None:
        return None
    from tsnet2.daemon.tls import TLSSplice
    layer = tls[0]
    return lambda flow, **kw: TLSSplice(flow, layer, **kw)


class _AppWatch:
    """While a dial connects: read what the app sends meanwhile (bounded, sent on first),
    and notice when it hangs up, then cancel the dialing task, so a dial the app gave up on
    (its timeout) does not linger in the daemon. A reader callback, not a task."""

    def __init__(self, sock: socket.socket, early: bytearray) -> None:
        self.sock = sock
        self.early = early
        self._hung_up = False
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._reading = len(early) < EARLY_DATA_MAX
        if self._reading:
            self._loop.add_reader(sock, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._hung_up = True
            self.stop()
            if self._task is not None:
                self._task.cancel()
            return
        self.early += data
        if len(self.early) >= EARLY_DATA_MAX:
            self.stop()  # enough: the rest waits in the socket until the splice runs

    def gone(self, *, cancelled: bool) -> bool:
        """True when the app hung up (and the cancellation that brought the caller here was
        ours: it is taken back)."""
        if not self._hung_up:
            return False
        # Also cancelled from outside when more than ours remains: that one wins.
        return not (cancelled and self._task is not None and self._task.uncancel() > 0)

    def stop(self) -> None:
        """Stop watching (idempotent)."""
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.sock)


def _sockaddr(addr: Any) -> str:
    """A socket address from the kernel as ``ip:port`` (``[ip]:port`` for IPv6). The
    kernel's text is canonical already (RFC 5952 for IPv6), so it is not parsed again."""
    return proto.format_addr(str(addr[0]), int(addr[1]))
