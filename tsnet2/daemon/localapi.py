"""LocalAPI over HTTP/1.1 on channel 0x02, answering with Tailscale's JSON shapes.

The handler table maps an endpoint name to a handler and says whether it is read-only.
Read-only endpoints are open to the app; endpoints that would change the node or reach the
tailnet around the traffic log (Tailscale's `dial`, `prefs` edits, serve config...) answer
403 with the reason. Like Tailscale's handler, requests with a Referer or Origin header, or
a Host other than `local-tailscaled.sock`, are refused.

Every request gets an answer: HEAD wherever GET is allowed (the GET's headers, no body), 405
with an `Allow` header for another method on a known endpoint, 404 for an unknown path, 400
(431 for oversized headers, 413 for an oversized body) for a request that is not valid HTTP,
500 if a handler fails. After a malformed or oversized request the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11

from tsnet2 import proto
from tsnet2._version import __version__
from tsnet2.daemon import io
from tsnet2.daemon.backend import Backend, NodeState
from tsnet2.proto import tailscale

log = logging.getLogger("tsnet2d.localapi")

PREFIX = "/localapi/v0/"
VALID_HOSTS = {"", "local-tailscaled.sock", "localhost"}
MAX_REQUEST = 64 * 1024  # the headers, and separately the body, of one request
IDLE_TIMEOUT = 60.0  # seconds a keep-alive connection may sit idle

# ipn.NotifyWatchOpt bits we honour (ipn/backend.go).
NOTIFY_INITIAL_STATE = 1 << 1
NOTIFY_INITIAL_NETMAP = 1 << 3

# Endpoints Tailscale's LocalAPI has that we refuse on purpose, with the reason.
REFUSED = {
    "dial": "LocalAPI dial would reach the tailnet without the traffic log; use Server.dial",
    "prefs": "the node's settings belong to tsnet2d, not to the app",
    "serve-config": "serving is not supported through the LocalAPI",
    "start": "the node is started through the control channel",
    "login-interactive": "the node logs in with the daemon's credentials",
    "logout": "the node's identity belongs to tsnet2d",
    "set-expiry-sooner": "the node's identity belongs to tsnet2d",
    "file-put/": "Taildrop is not supported",
}


@dataclasses.dataclass
class Reply:
    """A complete (non-streaming) LocalAPI answer."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # close the connection after this answer


Handler = Callable[["LocalAPIRequest"], Awaitable[Reply | None]]


@dataclasses.dataclass
class LocalAPIRequest:
    """One parsed LocalAPI request plus the means to stream an answer."""

    method: str
    endpoint: str
    query: dict[str, list[str]]
    conn: LocalAPIConnection


def _json(status: int, obj: Any) -> Reply:
    return Reply(status, proto.go_json(obj) + b"\n")


def _error(status: int, message: str, *, close: bool = False,
           headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    reply = _json(status, {"error": message})
    reply.close, reply.headers = close, headers
    return reply


READ_METHODS = ("GET", "HEAD")


class LocalAPI:
    """The endpoint table; one instance per daemon."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.routes: dict[str, tuple[bool, Handler]] = {}
        self.register("status", read_only=True, handler=self.status)
        self.register("whois", read_only=True, handler=self.whois)
        self.register("watch-ipn-bus", read_only=True, handler=self.watch_ipn_bus)
        self.register("cert/", read_only=True, handler=self.cert)
        self.register("tailnet-ca", read_only=True, handler=self.tailnet_ca)

    def register(self, name: str, *, read_only: bool, handler: Handler) -> None:
        """Add an endpoint; a duplicate name is a programming error. A name ending in
        ``/`` (``cert/``) serves every path under it."""
        if name in self.routes:
            raise ValueError(f"duplicate LocalAPI endpoint {name!r}")
        self.routes[name] = (read_only, handler)

    async def dispatch(self, req: LocalAPIRequest) -> Reply | None:
        """Gate (method, permissions) then call the endpoint's handler."""
        for name, reason in REFUSED.items():
            if req.endpoint == name or (name.endswith("/") and req.endpoint.startswith(name)):
                return _error(403, f"{req.endpoint}: {reason}")
        route = self.routes.get(req.endpoint)
        if route is None and "/" in req.endpoint:
            route = self.routes.get(req.endpoint.split("/", 1)[0] + "/")
        if route is None:
            return _error(404, f"{req.endpoint}: no such LocalAPI endpoint")
        read_only, handler = route
        if not read_only:
            return _error(403, f"{req.endpoint}: write access is not granted to the app")
        if req.method not in READ_METHODS:
            return _error(405, f"{req.endpoint}: method {req.method} not allowed; use GET",
                          headers=(("Allow", ", ".join(READ_METHODS)),))
        if self.backend.state == NodeState.NO_STATE:
            return Reply(503, b"", "text/plain", close=True)
        return await handler(req)

    # ---- endpoints -------------------------------------------------------------------

    async def status(self, req: LocalAPIRequest) -> Reply:
        """GET /localapi/v0/status[?peers=false]: ipnstate.Status."""
        b = self.backend
        with_peers = req.query.get("peers", ["true"])[0] != "false"
        return _json(200, tailscale.status(
            b.self_node, b.peers if with_peers else [],
            backend_state=b.state.name.title().replace("_", ""),
            domain=b.domain, version=__version__, peer_stats=b.peer_status_stats(),
            cert_domains=b.cert_domains(),
        ))

    async def whois(self, req: LocalAPIRequest) -> Reply:
        """GET /localapi/v0/whois?addr=IP[:port]: apitype.WhoIsResponse."""
        addr = req.query.get("addr", [""])[0]
        if not addr:
            return _error(400, "missing 'addr' parameter")
        try:
            try:
                ip = ipaddress.ip_address(addr.strip("[]"))
            except ValueError:
                host, _port = proto.split_host_port(addr)
                ip = ipaddress.ip_address(host)
        except ValueError:
            return _error(400, f"invalid 'addr' parameter {addr!r}: want IP or IP:port")
        node = self.backend.node_by_ip(ip)
        if node is None:
            return _error(404, "no match for IP:port")
        return _json(200, tailscale.whois_response(node, self.backend.domain))

    async def cert(self, req: LocalAPIRequest) -> Reply:
        """GET /localapi/v0/cert/<domain>?type=cert: the node's certificate chain (PEM: leaf,
        then the tailnet CA). ``type=key`` and ``type=pair`` (Tailscale's default) are
        refused: the key stays in tsnet2d, which terminates TLS itself (listen_tls)."""
        kind = req.query.get("type", ["pair"])[0]
        if kind in ("key", "pair", ""):
            return _error(403, "the node's private key never leaves tsnet2d; use listen_tls "
                          "(the daemon terminates TLS) or ?type=cert for the certificate")
        if kind != "cert":
            return _error(400, f"invalid 'type' parameter {kind!r}: only type=cert is served")
        domain = unquote(req.endpoint[len("cert/"):]).rstrip(".").lower()
        domains = self.backend.cert_domains()
        if domains is None:
            return _error(503, "the node is not running yet; it gets its certificate when it "
                          "is up")
        if domain not in domains:
            return _error(404, f"{domain or '(none)'} is not a cert domain of this node; it "
                          f"has {', '.join(domains) or 'none'}")
        certs = self.backend.certs
        chain, info = certs.chain_pem(), certs.info()
        if chain is None or info is None or domain not in info.names:
            return _error(503, certs.server_context_error())
        return Reply(200, chain, "application/x-pem-file")

    async def tailnet_ca(self, req: LocalAPIRequest) -> Reply:
        """GET /localapi/v0/tailnet-ca: the tailnet CA certificate (PEM) that every node's
        certificate chains to; what an app verifying tailnet TLS trusts."""
        ca = self.backend.certs.ca_pem()
        if ca is None:
            return _error(503, self.backend.certs.server_context_error())
        return Reply(200, ca, "application/x-pem-file")

    async def watch_ipn_bus(self, req: LocalAPIRequest) -> None:
        """GET /localapi/v0/watch-ipn-bus?mask=N: a stream of ipn.Notify JSON lines."""
        try:
            mask = int(req.query.get("mask", ["0"])[0])
        except ValueError:
            await req.conn.send_reply(_error(400, "invalid 'mask' parameter"))
            return
        b = self.backend
        await req.conn.start_stream()
        if req.method == "HEAD":
            return  # the stream's headers only

        # Like tailscaled (LocalBackend.WatchNotifications): every watch has its own
        # session id, sent once, in the first Notify, when NotifyInitialState is asked for.
        session_id = tailscale.new_session_id() if mask & NOTIFY_INITIAL_STATE else ""

        async def pump() -> None:
            # Like tailscaled: the first Notify carries the state and the session id
            # (NotifyInitialState) and the netmap (NotifyInitialNetMap) when asked; later
            # ones follow every change.
            first = True
            last_state: int | None = None
            async for _seq in b.changes():
                state = int(b.state)
                want_state = (mask & NOTIFY_INITIAL_STATE) if first else state != last_state
                want_netmap = (mask & NOTIFY_INITIAL_NETMAP) if first else True
                note = tailscale.notify(
                    __version__,
                    state=state if want_state else None,
                    self_node=b.self_node if want_netmap and b.running else None,
                    peers=b.peers, domain=b.domain,
                    session_id=session_id if first else "",
                )
                first, last_state = False, state
                if len(note) > 1:
                    await req.conn.stream(proto.go_json(note) + b"\n")

        await req.conn.until_closed(pump())


class LocalAPIConnection:
    """HTTP/1.1 (h11) on one accepted LocalAPI channel socket."""

    def __init__(self, api: LocalAPI, sock: socket.socket, pending: bytes = b"") -> None:
        self.api = api
        self.sock = sock
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        if pending:
            self.h11.receive_data(pending)
        self._loop = asyncio.get_running_loop()
        self._head = False  # the request being answered is a HEAD: headers, never a body

    async def _send(self, *events: Any) -> None:
        data = b"".join(self.h11.send(e) or b"" for e in events)
        if data:
            await io.sendall(self.sock, data)

    async def _next_event(self) -> Any:
        while True:
            ev = self.h11.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            data = await asyncio.wait_for(io.recv(self.sock, 65536), IDLE_TIMEOUT)
            self.h11.receive_data(data)

    async def send_reply(self, reply: Reply) -> None:
        """Send a whole response (to a HEAD request: its headers only)."""
        headers = [("Content-Type", reply.content_type),
                   ("Content-Length", str(len(reply.body))), *reply.headers]
        if reply.close:
            headers.append(("Connection", "close"))
        events: list[Any] = [h11.Response(status_code=reply.status, headers=headers,
                                          reason=HTTPStatus(reply.status).phrase)]
        if reply.body and not self._head:
            events.append(h11.Data(data=reply.body))
        events.append(h11.EndOfMessage())
        await self._send(*events)

    async def start_stream(self) -> None:
        """Begin a chunked streaming response (to a HEAD request: the headers only)."""
        await self._send(h11.Response(status_code=200, reason="OK", headers=[
            ("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]))

    async def stream(self, data: bytes) -> None:
        """Send one chunk of a streaming response."""
        await self._send(h11.Data(data=data))

    async def until_closed(self, work: Awaitable[None]) -> None:
        """Run `work` (a stream) until it ends or the client closes its side."""
        work_task = asyncio.ensure_future(work)
        closed = self._loop.create_task(io.recv(self.sock, 1))
        try:
            await asyncio.wait({work_task, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work_task, closed):
                t.cancel()
            for t in (work_task, closed):
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await t

    async def serve(self) -> None:
        """Serve requests until the client closes, errs, or idles out."""
        try:
            while True:
                request = await self._read_request()
                if request is None:
                    return
                if isinstance(request, Reply):  # not a usable request: answer, then close
                    with contextlib.suppress(OSError):
                        await self.send_reply(request)
                    return
                reply = await self._answer(request)
                if reply is None:  # the handler streamed (or answered) itself: end, close
                    if self.h11.our_state is h11.SEND_BODY:
                        await self._send(h11.EndOfMessage())
                    return
                await self.send_reply(reply)
                if reply.close or self.h11.our_state is not h11.DONE:
                    return
                self.h11.start_next_cycle()
        except (TimeoutError, OSError):
            return
        except h11.LocalProtocolError:
            log.exception("localapi: internal HTTP error; closing the connection")

    async def _read_request(self) -> h11.Request | Reply | None:
        """The next whole request (its body read and dropped), a Reply answering one that
        is malformed or too large, or None when the client closed the connection.

        Reads stay bounded: h11 buffers at most MAX_REQUEST bytes of headers, and a body
        over MAX_REQUEST (declared or sent) is refused with 413 before it is all read.
        """
        self._head = False
        try:
            ev = await self._next_event()
            if isinstance(ev, h11.ConnectionClosed):
                return None
            if not isinstance(ev, h11.Request):  # h11 starts every cycle with a Request
                return _error(400, f"bad request: unexpected {type(ev).__name__}", close=True)
            request = ev
            self._head = request.method == b"HEAD"
            too_large = _error(413, f"request body over {MAX_REQUEST} bytes", close=True)
            for name, value in request.headers:
                if name == b"content-length" and (not value.isdigit() or int(value) > MAX_REQUEST):
                    return too_large
            size = 0
            while True:
                ev = await self._next_event()
                if isinstance(ev, h11.EndOfMessage):
                    return request
                if isinstance(ev, h11.ConnectionClosed):
                    return None
                if isinstance(ev, h11.Data):
                    size += len(ev.data)
                    if size > MAX_REQUEST:
                        return too_large
        except h11.RemoteProtocolError as exc:
            log.warning("localapi: bad request: %s", exc)
            return _error(exc.error_status_hint, f"bad request: {exc}", close=True)

    async def _answer(self, request: h11.Request) -> Reply | None:
        """Dispatch one request; a handler that fails answers 500 (or ends its stream)."""
        try:
            return await self._handle(request)
        except (asyncio.CancelledError, OSError, h11.LocalProtocolError):
            raise
        except Exception:
            log.exception("localapi: %s %r failed", request.method.decode(),
                          request.target.decode("latin-1"))
            if self.h11.our_state is not h11.SEND_RESPONSE:
                return None  # mid-stream: end it and close
            return _error(500, "internal error in tsnet2d; see its log", close=True)

    async def _handle(self, request: h11.Request) -> Reply | None:
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
        if "referer" in headers or "origin" in headers:
            return _error(403, "Referer or Origin header is not allowed on the LocalAPI")
        host = headers.get("host", "").split(":")[0]
        if host not in VALID_HOSTS:
            return _error(403, f"invalid Host header {host!r}")
        target = urlsplit(request.target.decode("latin-1"))
        if not target.path.startswith(PREFIX):
            return _error(404, f"{target.path}: LocalAPI paths start with {PREFIX}")
        req = LocalAPIRequest(
            method=request.method.decode(),
            endpoint=target.path[len(PREFIX):],
            query=parse_qs(target.query),
            conn=self,
        )
        return await self.api.dispatch(req)
