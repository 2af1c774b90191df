"""The egress proxy: SOCKS5 and HTTP proxying to tailnet peers for apps without tsnet2.

tsnet2d listens on a loopback TCP address (``--egress-listen``) and/or a Unix socket
(``--egress-socket``). Each connection's first byte picks the protocol: ``0x05`` is SOCKS5
(:mod:`tsnet2.proto.socks5`), anything else an HTTP proxy request
(:mod:`tsnet2.proto.httpproxy`: ``CONNECT`` or an absolute ``http://`` URI). The target is
resolved against the netmap only (:meth:`Backend.resolve`: peer names, FQDNs under the
tailnet domain, tailnet IPs; never DNS), dialled like a library dial
(:meth:`Datapath._connect`: marked socket over the WireGuard device) and relayed by the same
splice (:meth:`Datapath._splice`): an ``open`` record with ``dir: "out"`` and ``via``
(``socks5``, ``http-connect``, ``http-proxy``), data, ``close``. A request that never
becomes a flow gets a ``reject`` record with ``via`` and the reason (``bad_request``,
``not_tailnet``, ``dial_failed``, ``log_unavailable``, ``over_limit``) and an answer in its
own protocol.

Bounds: :data:`MAX_CLIENTS` connections whose request is being read or dialled (beyond it,
a short refusal, at most :data:`MAX_REFUSING` at once, else a plain close; opened flows
leave the count, as library dials they are bounded by descriptors), a head within
:data:`HEADER_TIMEOUT` seconds and :data:`~tsnet2.proto.httpproxy.MAX_HEAD` bytes, every
task owned by the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from tsnet2 import proto
from tsnet2.daemon import io
from tsnet2.daemon.backend import TAILNET_V4, TAILNET_V6, BackendError, whois_summary
from tsnet2.daemon.datapath import DIAL_TIMEOUT, HEADER_TIMEOUT, Datapath, _AppWatch, _sockaddr
from tsnet2.daemon.io import peer_uid
from tsnet2.proto import httpproxy, socks5
from tsnet2.proto.httpproxy import HttpProxyCore, HttpProxyError
from tsnet2.proto.socks5 import Reply, Socks5Error, Socks5ServerCore
from tsnet2.traffic import FlowVia, RejectReason, TrafficLogError

log = logging.getLogger("tsnet2d.egress")

MAX_CLIENTS = 1024  # egress requests being read or dialled at once (opened flows leave it)
MAX_REFUSING = 64  # over-limit connections being told so at once; beyond: closed at once
REFUSAL_TIMEOUT = 1.0
RECV_CHUNK = 4096
BACKLOG = 512

Proto = Literal["socks5", "http-connect", "http-proxy", "unknown"]
Result = Literal["ok", "bad_request", "timeout", "not_tailnet", "dial_failed", "not_running",
                 "log_unavailable", "over_limit", "app_gone"]
PROTOS: tuple[Proto, ...] = ("socks5", "http-connect", "http-proxy", "unknown")
RESULTS: tuple[Result, ...] = ("ok", "bad_request", "timeout", "not_tailnet", "dial_failed",
                               "not_running", "log_unavailable", "over_limit", "app_gone")


class EgressConfigError(ValueError):
    """A bad --egress-listen value; the message is printed as is."""


def parse_loopback_listen(flag: str, text: str) -> tuple[str, int]:
    """``HOST:PORT`` with a loopback IP host (127.0.0.0/8, ``[::1]``) and a port 1-65535
    (0: any free one). Raises :class:`EgressConfigError` naming what to do."""
    try:
        host, port = proto.split_host_port(text)
    except proto.WireAddressError as exc:
        raise EgressConfigError(f"{flag} {text!r}: {exc}") from None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise EgressConfigError(
            f"{flag} {text!r}: want a loopback IP address and port, e.g. 127.0.0.1:1055 "
            "or [::1]:1055 (names are not resolved)") from None
    if not ip.is_loopback:
        raise EgressConfigError(
            f"{flag} {text!r}: {ip} is not a loopback address; this listener is "
            "unauthenticated and must stay inside the pod (every container shares its "
            "loopback): use 127.0.0.1 or [::1]")
    return str(ip), port


@dataclasses.dataclass(frozen=True)
class EgressConfig:
    """Where the egress proxy listens (either may be None, not both)."""

    listen: tuple[str, int] | None = None
    socket_path: Path | None = None


class _Refusal(Exception):
    """A request that does not become a flow: what to log and answer."""

    def __init__(self, result: Result, reason: RejectReason, error: str, *,
                 socks: Reply | None = Reply.GENERAL_FAILURE, http: int = 400,
                 whois: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.result: Result = result
        self.reason: RejectReason = reason
        self.error = error
        self.socks = socks
        self.http = http
        self.whois = whois


class Egress:
    """The egress proxy's listeners and clients; owned by the daemon (tasks via `spawn`)."""

    def __init__(self, config: EgressConfig, datapath: Datapath,
                 spawn: Callable[..., asyncio.Task[Any]], *,
                 bind_unix: Callable[[Path], socket.socket],
                 allow_uids: frozenset[int] | None) -> None:
        self.config = config
        self.datapath = datapath
        self.metrics = datapath.metrics
        self._spawn = spawn
        self._bind_unix = bind_unix
        self._allow_uids = allow_uids
        self._socks: list[socket.socket] = []
        self.clients = 0
        self.refusing = 0
        self.addresses: list[str] = []

    def start(self) -> None:
        """Bind the listeners and start their accept loops (raises OSError, or the
        DaemonFatalError of `bind_unix`)."""
        c = self.config
        where = ""
        try:
            if c.listen is not None:
                where = "--egress-listen " + proto.format_addr(*c.listen)
                host, port = c.listen
                fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                s = socket.socket(fam, socket.SOCK_STREAM)
                self._socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
                s.listen(BACKLOG)
                s.setblocking(False)
                self.addresses.append(_sockaddr(s.getsockname()))
            if c.socket_path is not None:
                where = f"--egress-socket {c.socket_path}"
                u = self._bind_unix(c.socket_path)
                self._socks.append(u)
                u.setblocking(False)
                self.addresses.append(f"unix:{c.socket_path}")
        except OSError as exc:
            self.close()
            raise OSError(exc.errno, f"{where}: {exc.strerror or exc}") from exc
        except BaseException:
            self.close()
            raise
        for s in self._socks:
            self._spawn(self._accept_loop(s), critical=True, name="egress accept loop")
        log.info("egress proxy (SOCKS5, HTTP) on %s", ", ".join(self.addresses))

    def close(self) -> None:
        """Close the listeners (their accept loops are the daemon's tasks: cancelled at
        shutdown); the Unix socket's file is removed."""
        for s in self._socks:
            s.close()
        self._socks.clear()
        if self.config.socket_path is not None:
            with contextlib.suppress(OSError):
                if self.config.socket_path.is_socket():
                    self.config.socket_path.unlink()

    # ---- connections -----------------------------------------------------------------

    async def _accept_loop(self, lsock: socket.socket) -> None:
        unix = lsock.family == socket.AF_UNIX
        while True:
            conn = await io.accept_next(lsock, "egress")
            if unix and self._allow_uids is not None:
                uid = peer_uid(conn)
                if uid not in self._allow_uids:
                    log.warning("egress: refused a connection from uid %d", uid)
                    self.metrics.connection_refused("uid")
                    conn.close()
                    continue
            if self.clients >= MAX_CLIENTS:
                if self.refusing >= MAX_REFUSING:
                    self.metrics.egress_request("unknown", "over_limit")
                    conn.close()
                    continue
                self.refusing += 1
                self._spawn(self._over_limit(conn))
                continue
            self.clients += 1
            self._spawn(self._serve(conn))

    async def _over_limit(self, sock: socket.socket) -> None:
        """Tell an over-limit client so in its protocol (a 503, or SOCKS5 "no acceptable
        method"), log a reject, close."""
        error = (f"egress proxy: {MAX_CLIENTS} clients are being served (requests being read "
                 "or dialled), the most at once; "
                 "try again later")
        via: FlowVia | None = None
        try:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(REFUSAL_TIMEOUT):
                    first = await io.recv(sock, 1)
                    if first:
                        if first[0] == socks5.SOCKS_VERSION:
                            via, data = "socks5", bytes((5, socks5.METHOD_NONE_ACCEPTABLE))
                        else:
                            via, data = "http-proxy", httpproxy.encode_response(503, error)
                        await io.sendall(sock, data)
            self.metrics.egress_request(via or "unknown", "over_limit")
            self.metrics.flow_refused("out", "over_limit")
            log.warning("egress: %s", error)
            self.datapath.traffic.reject(direction="out", remote="", reason="over_limit",
                                         error=error, via=via)
        finally:
            self.refusing -= 1
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        spliced = False
        try:
            spliced = await self._handle(sock)
        except OSError as exc:
            log.info("egress connection ended: %s", exc)
        finally:
            self.clients -= 1
            if not spliced:
                sock.close()

    async def _handle(self, sock: socket.socket) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HEADER_TIMEOUT
        try:
            async with asyncio.timeout_at(deadline):
                first = await io.recv(sock, RECV_CHUNK)
        except TimeoutError:
            self._reject("unknown", "", _Refusal(
                "timeout", "bad_request",
                f"egress proxy: no request within {HEADER_TIMEOUT:.0f}s"))
            return False
        if not first:
            return False  # connected and left: not a request
        if first[0] == socks5.SOCKS_VERSION:
            return await self._socks5(sock, first, deadline)
        return await self._http(sock, first, deadline)

    # ---- SOCKS5 ----------------------------------------------------------------------

    async def _socks5(self, sock: socket.socket, data: bytes, deadline: float) -> bool:
        core = Socks5ServerCore()
        target = ""
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    while (req := core.receive(data)) is None:
                        if out := core.data_to_send():
                            await io.sendall(sock, out)
                        data = await io.recv(sock, RECV_CHUNK)
            except Socks5Error as exc:
                if out := core.data_to_send():
                    with contextlib.suppress(OSError):
                        await io.sendall(sock, out)
                raise _Refusal("bad_request", "bad_request",
                               f"egress proxy: bad SOCKS5 request: {exc}", socks=None) from exc
            except TimeoutError:
                raise _Refusal("timeout", "bad_request",
                               f"egress proxy: SOCKS5 request not received within "
                               f"{HEADER_TIMEOUT:.0f}s",
                               socks=(Reply.GENERAL_FAILURE if core.state == "request"
                                      else None)) from None
            target = proto.format_addr(req.host, req.port)
            if out := core.data_to_send():
                await io.sendall(sock, out)
            peer, early, whois = await self._dial(sock, "socks5", req.host, req.port,
                                                  req.rest)
        except _Refusal as r:
            self._reject("socks5", target, r)  # logged before the client hears of it
            if r.socks is not None:
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(REFUSAL_TIMEOUT):
                        await io.sendall(sock, socks5.encode_reply(r.socks))
            return False
        local = _sockaddr(peer.getsockname())
        host, port = proto.split_host_port(local)
        return await self._open(sock, peer, "socks5", target,
                                socks5.encode_reply(Reply.SUCCEEDED, host, port), early, whois)

    # ---- HTTP ------------------------------------------------------------------------

    async def _http(self, sock: socket.socket, data: bytes, deadline: float) -> bool:
        core = HttpProxyCore()
        kind: Proto = "http-proxy"
        target = ""
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    while (req := core.receive(data)) is None:
                        data = await io.recv(sock, RECV_CHUNK)
            except HttpProxyError as exc:
                raise _Refusal("bad_request", "bad_request",
                               f"egress proxy: bad HTTP proxy request: {exc}",
                               http=exc.status) from exc
            except TimeoutError:
                raise _Refusal("timeout", "bad_request",
                               f"egress proxy: request head not received within "
                               f"{HEADER_TIMEOUT:.0f}s", http=408) from None
            kind = "http-connect" if req.kind == "connect" else "http-proxy"
            target = proto.format_addr(req.host, req.port)
            pending = req.rest if req.kind == "connect" else req.forward_head() + req.rest
            peer, early, whois = await self._dial(sock, kind, req.host, req.port, pending)
        except _Refusal as r:
            self._reject(kind, target, r)  # logged before the client hears of it
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(REFUSAL_TIMEOUT):
                    await io.sendall(sock, httpproxy.encode_response(r.http, r.error))
                    sock.shutdown(socket.SHUT_WR)
                    drained = 0  # closing with unread bytes would reset the answer away
                    while drained < 65536 and (chunk := await io.recv(sock, RECV_CHUNK)):
                        drained += len(chunk)
            return False
        reply = httpproxy.encode_response(200) if kind == "http-connect" else b""
        return await self._open(sock, peer, kind, target, reply, early, whois)

    # ---- dial, open, refuse ----------------------------------------------------------

    async def _dial(self, sock: socket.socket, kind: Proto, host: str, port: int,
                    pending: bytes) -> tuple[socket.socket, bytes, dict[str, str] | None]:
        """Resolve (tailnet only) and connect; returns the peer socket, the bytes to send
        it first and the peer's WhoIs summary. Raises _Refusal."""
        b = self.datapath.backend
        try:
            self.datapath.traffic.check_writable()
        except TrafficLogError as exc:
            raise _Refusal("log_unavailable", "log_unavailable",
                           f"egress proxy: traffic log unavailable, refusing new flows: {exc}",
                           http=503) from None
        if not b.running:
            raise _Refusal("not_running", "dial_failed",
                           f"egress proxy: {b.down_error()}", http=503)
        try:
            ip = b.resolve(host, None)
        except BackendError as exc:
            literal = _ip_or_none(host)
            if literal is not None and not _in_tailnet(literal):
                raise _Refusal(
                    "not_tailnet", "not_tailnet",
                    f"egress proxy: {literal} is not a tailnet address: this proxy reaches "
                    "tailnet peers only (100.64.0.0/10, fd7a:115c:a1e0::/48); send other "
                    "traffic around it (NO_PROXY)", socks=Reply.NOT_ALLOWED, http=403) from None
            raise _Refusal(
                "not_tailnet", "not_tailnet",
                f"egress proxy: {exc}; give a peer's name ({b.domain and 'NAME or NAME.'}"
                f"{b.domain or ''}) or tailnet address, and send other names around this "
                "proxy (NO_PROXY)", socks=Reply.HOST_UNREACHABLE, http=404) from None
        whois = whois_summary(b.node_by_ip(ip))
        watch = _AppWatch(sock, bytearray(pending))
        try:
            peer = await self.datapath._connect("tcp", proto.format_addr(str(ip), port))
        except asyncio.CancelledError:
            watch.stop()
            if not watch.gone(cancelled=True):
                raise
            raise _Refusal("app_gone", "app_gone",
                           "egress proxy: the client closed the connection during the dial",
                           socks=None, whois=whois) from None
        except TimeoutError:
            watch.stop()
            raise _Refusal("dial_failed", "dial_failed",
                           f"egress proxy: dial {host}:{port}: timed out after "
                           f"{DIAL_TIMEOUT:.0f}s", socks=Reply.HOST_UNREACHABLE, http=504,
                           whois=whois) from None
        except (BackendError, OSError, ValueError) as exc:
            watch.stop()
            refused = isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED
            raise _Refusal("dial_failed", "dial_failed",
                           f"egress proxy: dial {host}:{port}: {exc}",
                           socks=Reply.CONNECTION_REFUSED if refused else Reply.HOST_UNREACHABLE,
                           http=502, whois=whois) from None
        finally:
            watch.stop()
        return peer, bytes(watch.early), whois

    async def _open(self, sock: socket.socket, peer: socket.socket, kind: Proto, target: str,
                    reply: bytes, early: bytes, whois: dict[str, str] | None) -> bool:
        local = _sockaddr(peer.getsockname())
        remote = _sockaddr(peer.getpeername())
        if reply:
            try:
                await io.sendall(sock, reply)
            except OSError:
                peer.close()
                self._reject(kind, target, _Refusal(
                    "app_gone", "app_gone", "egress proxy: the client hung up before the "
                    "reply"))
                return False
        via = _via(kind)
        try:
            flow = self.datapath.traffic.open_flow(direction="out", local=local,
                                                   remote=remote, whois=whois, via=via)
        except TrafficLogError as exc:
            peer.close()
            self._reject(kind, target, _Refusal(
                "log_unavailable", "log_unavailable",
                f"egress proxy: traffic log unavailable: {exc}"))
            return False
        except BaseException:
            peer.close()
            raise
        self.metrics.egress_request(kind, "ok")
        return await self.datapath._splice("out", flow, sock, peer, early)

    def _reject(self, kind: Proto, target: str, r: _Refusal) -> None:
        log.warning("egress %s to %s refused (%s): %s", kind, target or "?", r.result, r.error)
        self.metrics.egress_request(kind, r.result)
        self.metrics.flow_refused("out", {"not_tailnet": "no_such_peer",
                                          "not_running": "not_running",
                                          "timeout": "bad_request"}.get(r.result, r.result))
        self.datapath.traffic.reject(direction="out", remote=target, reason=r.reason,
                                     error=r.error, whois=r.whois,
                                     via=_via(kind))


def _via(kind: Proto) -> FlowVia | None:
    if kind == "unknown":
        return None
    return kind


def _ip_or_none(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _in_tailnet(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip in TAILNET_V4 or ip in TAILNET_V6


__all__ = ["Egress", "EgressConfig", "EgressConfigError", "parse_loopback_listen"]
