"""The coordination HTTP server (aiohttp): register, netmap long-poll, endpoints, deregister.

Online state lives in this process's memory: a node is *online* while it has a netmap
long-poll in flight here, or its last one ended less than ``online_grace`` seconds ago
(default ``min(5, ephemeral_timeout / 2)``). A node that has not polled since this process
started is offline. Every online/offline transition bumps the netmap version. An ephemeral
node that is offline and has shown no activity (register, endpoints, poll) for longer than
``ephemeral_timeout`` seconds is removed by the sweeper task, which also notices version
changes made by other processes sharing the store. The sweeper is started by :meth:`start`
and cancelled and awaited by :meth:`close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tsnet2.control import api, ca
from tsnet2.control.authkeys import DEFAULT_DOMAIN, create_auth_key
from tsnet2.control.limits import ConnectionGuard, GuardedSite, ServerLimits, fd_room, http_log
from tsnet2.control.names import validate_domain
from tsnet2.control.store import (
    AddressPoolExhaustedError,
    AuthKeyRecord,
    AuthKeyUsedError,
    NewNode,
    NodeRecord,
    PublicKeyInUseError,
    Store,
    StoreError,
)
from tsnet2.control.tokens import (
    MAX_SECRET_LEN,
    hash_secret,
    new_node_credential,
    new_stable_id,
)

log = logging.getLogger("tsnet2.control")

MAX_POLL_TIMEOUT = 60.0
"""Longest netmap long-poll the server holds open, in seconds."""
MAX_LINE = 8190
"""Longest request line and header line, in bytes (aiohttp's limit; longer: 400)."""
MAX_HEADERS = 64
"""Most header lines in a request head (more: 400), so a head is at most ~512 KiB."""
LINGER = 2.0
"""Seconds spent reading and dropping an unread request body before closing."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error reply: ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        """Remember status and message."""
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error; never leak a traceback or a secret."""
    try:
        return await handler(request)
    except ApiError as e:
        response = _error(e.status, e.message)
        if e.status == 408:
            response.force_close()
        return response
    except api.BadRequest as e:
        return _error(400, str(e))
    except web.HTTPRequestEntityTooLarge:
        return _error(400, f"request body too large: the limit is {api.MAX_BODY} bytes")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason)
    except Exception:
        log.exception("control: internal error handling %s %s", request.method, request.path)
        return _error(500, "internal server error; see the control server log")


class ControlServer:
    """The tailnet coordination server over a :class:`~tsnet2.control.store.Store`.

    The caller opens and closes the store. Use :meth:`start` / :meth:`close` (or
    :meth:`serve`); :attr:`app` is the aiohttp application.
    """

    def __init__(
        self,
        store: Store,
        domain: str = DEFAULT_DOMAIN,
        ephemeral_timeout: float = 30.0,
        *,
        online_grace: float | None = None,
        max_poll_timeout: float = MAX_POLL_TIMEOUT,
        authenticator: api.Authenticator | None = None,
        limits: ServerLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        cert_lifetime: float = ca.DEFAULT_CERT_LIFETIME,
    ) -> None:
        """Configure the server; nothing runs until :meth:`start`.

        ``authenticator``, if given, lets ``POST /v1/register`` authenticate with
        ``Authorization: Bearer <token>`` (e.g. a Kubernetes ServiceAccount token) besides
        auth keys; without it a bearer header on register is refused (401).
        ``limits``: connection cap and header/idle/body timeouts (see
        :mod:`tsnet2.control.limits`; defaults 1024 connections, 10 s, 30 s, 10 s).
        ``clock``: the monotonic seconds that online grace and ephemeral idleness are measured
        in (a test passes a fake one it advances, then awaits :meth:`next_sweep`; long-poll
        timeouts and the sweep interval stay in real time).
        ``cert_lifetime``: seconds a node certificate issued by ``POST /v1/cert`` is valid
        (default 90 days; at least :data:`tsnet2.control.ca.MIN_CERT_LIFETIME`).
        """
        if not ephemeral_timeout > 0:
            raise ValueError("ephemeral_timeout must be > 0 seconds")
        if not ca.MIN_CERT_LIFETIME <= cert_lifetime < float("inf"):
            raise ValueError(f"cert_lifetime must be at least {ca.MIN_CERT_LIFETIME:g} seconds")
        self.store = store
        self.ready: Callable[[], str | None] | None = None
        """Readiness beyond this server: returns why it is not ready, or None; ``/healthz``
        answers 503 with the reason meanwhile (the operator waits for its webhook)."""
        self.domain = validate_domain(domain)
        self.ephemeral_timeout = float(ephemeral_timeout)
        self.online_grace = (
            float(online_grace) if online_grace is not None else min(5.0, ephemeral_timeout / 2)
        )
        self.max_poll_timeout = max_poll_timeout
        self.authenticator = authenticator
        self.limits = limits if limits is not None else ServerLimits()
        self.guard: ConnectionGuard | None = None
        """The connection guard while started (its ``stats`` count evictions, timeouts)."""
        self._tick = min(0.5, max(0.05, min(self.ephemeral_timeout, self.online_grace) / 10))
        self._clock = clock
        self._version = 0
        self._changed = asyncio.Event()
        self._closing = False
        self._started = clock()
        self._sweeps_started = 0
        self._sweeps_done = 0
        self._swept = asyncio.Event()
        self._inflight: dict[int, int] = {}
        self._poll_end: dict[int, float] = {}
        self._last_active: dict[int, float] = {}
        self._online: dict[int, bool] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.cert_lifetime = float(cert_lifetime)
        self.cert_stats: dict[str, int] = {"issued": 0, "refused": 0}
        """Certificates issued and CSRs refused by this process (``POST /v1/cert``)."""
        self._ca: ca.TailnetCA | None = None
        self._ca_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self.app = web.Application(
            client_max_size=api.MAX_BODY, middlewares=[self._track_requests, _errors]
        )
        self.app.add_routes(
            [
                web.post("/v1/register", self._register),
                web.get("/v1/netmap", self._netmap),
                web.post("/v1/endpoints", self._endpoints),
                web.post("/v1/deregister", self._deregister),
                web.post("/v1/cert", self._cert),
                web.get("/v1/ca", self._ca_pem),
                web.get("/healthz", self._healthz),
            ]
        )

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL once started, e.g. ``http://127.0.0.1:41641``."""
        if self._url is None:
            raise RuntimeError("control server is not started")
        return self._url

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> str:
        """Bind and serve in the background; return the base URL (real port if 0 given)."""
        if self._runner is not None:
            raise RuntimeError("control server already started")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        ssl_ctx: ssl.SSLContext | None = None
        if tls_cert is not None and tls_key is not None:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(tls_cert, tls_key)
        self._version = await self.store.version()
        self._started = self._clock()
        self._closing = False
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=2.0,
            # A backstop only: the guard closes idle connections (header/idle timeouts).
            keepalive_timeout=self.limits.header_timeout + self.limits.idle_timeout,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            lingering_time=LINGER,
            logger=http_log,
        )
        await runner.setup()
        if runner.server is None:
            raise RuntimeError("aiohttp's AppRunner.setup() made no server: an aiohttp this "
                               "control server does not support?")
        max_connections = fd_room(self.limits.max_connections)
        if max_connections < self.limits.max_connections:
            log.warning(
                "control: the open-files limit leaves room for %d connections only, "
                "not %d; raise the hard limit (ulimit -Hn) to allow more",
                max_connections,
                self.limits.max_connections,
            )
        guard = ConnectionGuard(
            self.limits, runner.server, ssl_context=ssl_ctx, max_connections=max_connections
        )
        try:
            site = GuardedSite(runner, host, port, guard)
            await site.start()
        except BaseException:
            await runner.cleanup()
            await guard.close()
            raise
        self._runner = runner
        self.guard = guard
        bound = guard.sockets[0].getsockname()
        bound_host = host if ":" not in host else f"[{host}]"
        scheme = "https" if ssl_ctx is not None else "http"
        self._url = f"{scheme}://{bound_host}:{bound[1]}"
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="tsnet2-control-sweeper")
        log.info("control: serving %s for tailnet %s", self._url, self.domain)
        return self._url

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        """Start, then serve until cancelled; always closes."""
        await self.start(host, port, tls_cert=tls_cert, tls_key=tls_key)
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self) -> None:
        """Wake long-polls, stop the sweeper and the HTTP server. Idempotent."""
        self._closing = True
        self._wake()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        guard, self.guard = self.guard, None
        if guard is not None:
            await guard.close()

    async def create_auth_key(
        self,
        *,
        reusable: bool = False,
        ephemeral: bool = False,
        tags: tuple[str, ...] = (),
        expiry: float | None = None,
        user: str | None = None,
    ) -> str:
        """Create an auth key in this server's store and tailnet domain; return the key."""
        key, _ = await create_auth_key(
            self.store,
            reusable=reusable,
            ephemeral=ephemeral,
            tags=tags,
            expiry=expiry,
            user=user,
            domain=self.domain,
        )
        return key

    async def next_sweep(self) -> None:
        """Wait until the sweeper has finished a sweep that began after this call.

        A hook for tests: after advancing the ``clock`` (or changing the store), the online
        transitions and ephemeral removals that this implies are done when this returns.
        Waits forever unless the server is started (callers bound it with a timeout).
        """
        target = self._sweeps_started + 1
        while self._sweeps_done < target:
            await self._swept.wait()

    def polls_in_flight(self, node_id: int) -> int:
        """How many netmap long-polls of ``node_id`` this server is holding open now.

        A node is online while this is above 0 (see the module docstring); tests wait on it
        to know that a poll they started has reached the server, or that a poll whose client
        went away has ended.
        """
        return self._inflight.get(node_id, 0)

    # -- version and online state --------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _publish(self, version: int) -> None:
        if version > self._version:
            self._version = version
            self._wake()

    def _is_online(self, node_id: int, now: float) -> bool:
        if self._inflight.get(node_id, 0) > 0:
            return True
        ended = self._poll_end.get(node_id)
        return ended is not None and now - ended < self.online_grace

    def _forget(self, node_id: int) -> None:
        for table in (self._poll_end, self._last_active, self._online):
            table.pop(node_id, None)

    async def _set_last_seen(self, node_id: int) -> None:
        result = await self.store.update_node(node_id, last_seen=time.time())
        if result is not None:
            self._publish(result[1])

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            self._sweeps_started += 1
            try:
                await self._sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control: sweep failed; retrying")
            self._sweeps_done = self._sweeps_started
            self._swept.set()
            self._swept = asyncio.Event()

    async def _sweep_once(self) -> None:
        self._publish(await self.store.version())
        now = self._clock()
        nodes = await self.store.list_nodes()
        for node in nodes:
            online = self._is_online(node.id, now)
            if self._online.get(node.id) and not online:
                self._online[node.id] = False
                await self._set_last_seen(node.id)
                log.info("control: node %d (%s) offline", node.id, node.name)
            idle = now - self._last_active.get(node.id, self._started)
            if node.ephemeral and not online and idle > self.ephemeral_timeout:
                version = await self.store.delete_node(node.id)
                self._forget(node.id)
                if version is not None:
                    self._publish(version)
                    log.info(
                        "control: removed ephemeral node %d (%s) after %.1fs offline",
                        node.id,
                        node.name,
                        idle,
                    )
        known = {node.id for node in nodes}
        for node_id in set(self._last_active) | set(self._online):
            if node_id not in known and self._inflight.get(node_id, 0) == 0:
                self._forget(node_id)

    # -- helpers -------------------------------------------------------------------------

    async def _authenticate(self, request: web.Request) -> NodeRecord:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise ApiError(
                401, "missing node credential: send 'Authorization: Bearer <credential>'"
            )
        credential = credential.strip()
        if len(credential) > MAX_SECRET_LEN:
            raise ApiError(401, "invalid node credential")
        node = await self.store.get_node_by_credential(hash_secret(credential))
        if node is None:
            raise ApiError(
                401, "invalid node credential (the node may have been removed); register again"
            )
        return node

    @web.middleware
    async def _track_requests(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Tell the connection guard a request is in flight (its connection is not idle)."""
        guard = self.guard
        if guard is None:
            return await handler(request)
        guard.request_started(request.protocol)
        try:
            return await handler(request)
        finally:
            guard.request_finished(request.protocol)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The JSON object body: at most ``api.MAX_BODY`` bytes within ``body_timeout``."""
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                raw = await request.read()
        except TimeoutError:
            raise ApiError(
                408, f"request body not received within {self.limits.body_timeout:g} s"
            ) from None
        return api.parse_json_object(raw)

    def _node_json(self, node: NodeRecord) -> dict[str, Any]:
        return api.node_json(
            node, domain=self.domain, online=self._is_online(node.id, self._clock())
        )

    # -- handlers ------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        why = self.ready() if self.ready is not None else None
        if why:
            return web.Response(status=503, text=f"not ready: {why}")
        return web.Response(text="ok")

    async def _register(self, request: web.Request) -> web.Response:
        req = api.parse_register(await self._body(request))
        token = self._register_bearer(request)
        if token is not None:
            return await self._register_with_token(token, req)
        if req.node_credential is not None:
            node = await self.store.get_node_by_credential(hash_secret(req.node_credential))
            if node is not None:
                return self._register_reply(await self._reregister(node, req), req.node_credential)
            if req.auth_key is None:
                raise ApiError(
                    401,
                    "invalid node credential (the node may have been removed); "
                    "register with an auth key",
                )
        if req.auth_key is None:
            raise ApiError(401, "an auth key or a node credential is required")
        key = await self._check_auth_key(req.auth_key, req)
        node, credential = await self._create_node(
            req,
            user_id=key.user.id,
            tags=req.tags or key.tags,
            ephemeral=req.ephemeral or key.ephemeral,
            auth_key_id=key.id,
            consume_auth_key=not key.reusable,
        )
        return self._register_reply(node, credential)

    def _register_bearer(self, request: web.Request) -> str | None:
        """The bearer token of a register call, or None when it has no Authorization header."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        if self.authenticator is None:
            raise ApiError(
                401,
                "this control server does not accept bearer tokens for registration; "
                "register with an auth key",
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "malformed Authorization header: use 'Bearer <token>'")
        if len(token) > api.MAX_BEARER_TOKEN:
            raise ApiError(401, f"bearer token longer than {api.MAX_BEARER_TOKEN} bytes")
        return token

    async def _register_with_token(self, token: str, req: api.RegisterRequest) -> web.Response:
        """Register through :attr:`authenticator` (the auth key field is ignored)."""
        authenticator = self.authenticator
        if authenticator is None:  # _register_bearer refused the token already
            raise ApiError(401, "this control server does not accept bearer tokens for "
                           "registration; register with an auth key")
        existing: NodeRecord | None = None
        credential = req.node_credential
        if credential is not None:
            existing = await self.store.get_node_by_credential(hash_secret(credential))
        try:
            identity = await authenticator.authenticate(token, req, existing)
        except api.AuthenticationError as e:
            log.info("control: registration of %r refused: %s", req.hostname, e.message)
            raise ApiError(e.status, e.message) from None
        if existing is not None and credential is not None:  # its credential matched
            node = await self._reregister(existing, req)
        else:
            for tag in req.tags:
                if tag not in identity.tags:
                    raise ApiError(403, f"tag {tag!r} is not permitted for {identity.login_name}")
            user = await self.store.ensure_user(identity.login_name, identity.display_name)
            node, credential = await self._create_node(
                req,
                user_id=user.id,
                tags=req.tags or identity.tags,
                ephemeral=req.ephemeral or identity.ephemeral,
                auth_key_id=None,
                consume_auth_key=False,
            )
            if identity.exact_name and node.name != req.hostname:
                version = await self.store.delete_node(node.id)
                self._forget(node.id)
                if version is not None:
                    self._publish(version)
                raise ApiError(
                    409,
                    f"hostname {req.hostname!r} is already taken by another node; "
                    "remove that node or choose another hostname",
                )
        await authenticator.registered(identity, node)
        return self._register_reply(node, credential)

    async def _create_node(
        self,
        req: api.RegisterRequest,
        *,
        user_id: int,
        tags: tuple[str, ...],
        ephemeral: bool,
        auth_key_id: int | None,
        consume_auth_key: bool,
    ) -> tuple[NodeRecord, str]:
        """Create a node for ``req``; return it with its new node credential."""
        credential = new_node_credential()
        spec = NewNode(
            hostname=req.hostname,
            public_key=req.public_key,
            credential_hash=hash_secret(credential),
            stable_id=new_stable_id(),
            user_id=user_id,
            tags=tags,
            ephemeral=ephemeral,
            endpoints=req.endpoints,
            auth_key_id=auth_key_id,
            consume_auth_key=consume_auth_key,
            traffic_log_key=req.traffic_log_key,
        )
        try:
            node, version = await self.store.create_node(spec)
        except AuthKeyUsedError:
            raise ApiError(401, "auth key already used") from None
        except PublicKeyInUseError:
            raise ApiError(
                409,
                "public key is already registered to another node; re-register with that "
                "node's credential or generate a new key",
            ) from None
        except AddressPoolExhaustedError:
            raise ApiError(503, "the tailnet address pool is exhausted") from None
        self._last_active[node.id] = self._clock()
        self._publish(version)
        log.info(
            "control: registered node %d (%s) %s user=%s ephemeral=%s tags=%s",
            node.id,
            node.name,
            node.ipv4,
            node.user.login_name,
            node.ephemeral,
            ",".join(node.tags) or "-",
        )
        return node, credential

    def _register_reply(self, node: NodeRecord, credential: str) -> web.Response:
        return web.json_response(
            {"node": self._node_json(node), "node_credential": credential, "domain": self.domain}
        )

    async def _check_auth_key(self, auth_key: str, req: api.RegisterRequest) -> AuthKeyRecord:
        """The auth key ``auth_key`` (``req``'s), if it may register ``req``; else ApiError."""
        key = await self.store.get_auth_key(hash_secret(auth_key))
        if key is None:
            raise ApiError(401, "invalid auth key")
        if key.expires is not None and key.expires <= time.time():
            raise ApiError(401, "auth key expired")
        if not key.reusable and key.used_at is not None:
            raise ApiError(401, "auth key already used")
        for tag in req.tags:
            if tag not in key.tags:
                raise ApiError(403, f"tag {tag!r} is not permitted by this auth key")
        return key

    async def _reregister(self, node: NodeRecord, req: api.RegisterRequest) -> NodeRecord:
        """Update ``node``, found by ``req``'s node credential, to what ``req`` says."""
        try:
            # The register call describes the node as it is now: a node that sends no
            # traffic-log key (an older tsnet2d) has none, and a new key replaces the old
            # one (its signing key file was replaced); both are logged.
            result = await self.store.update_node(
                node.id,
                public_key=req.public_key,
                endpoints=req.endpoints,
                traffic_log_key=req.traffic_log_key or "",
            )
        except PublicKeyInUseError:
            raise ApiError(409, "public key is already registered to another node") from None
        if result is None:
            raise ApiError(401, "invalid node credential (the node was removed); register again")
        updated, version = result
        self._last_active[node.id] = self._clock()
        self._publish(version)
        log.info("control: node %d (%s) re-registered", node.id, node.name)
        if updated.traffic_log_key != node.traffic_log_key:
            # A first key is an upgrade; a replaced or dropped one is worth an operator's look
            # (logs signed before verify only with the old key).
            log.log(
                logging.INFO if node.traffic_log_key is None else logging.WARNING,
                "control: node %d (%s) changed its traffic-log key from %s to %s",
                node.id,
                node.name,
                node.traffic_log_key or "none",
                updated.traffic_log_key or "none",
            )
        return updated

    async def _netmap(self, request: web.Request) -> web.Response:
        since, timeout = api.parse_poll_query(
            request.query.get("since"), request.query.get("timeout"), self.max_poll_timeout
        )
        node = await self._authenticate(request)
        node_id = node.id
        self._inflight[node_id] = self._inflight.get(node_id, 0) + 1
        self._last_active[node_id] = self._clock()
        try:
            if not self._online.get(node_id):
                self._online[node_id] = True
                log.info("control: node %d (%s) online", node_id, node.name)
                await self._set_last_seen(node_id)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while self._version == since and not self._closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
            version = self._version
            nodes = await self.store.list_nodes()
        finally:
            self._inflight[node_id] -= 1
            if self._inflight[node_id] == 0:
                del self._inflight[node_id]
            now = self._clock()
            self._poll_end[node_id] = now
            self._last_active[node_id] = now
        me = next((n for n in nodes if n.id == node_id), None)
        if me is None:
            raise ApiError(401, "this node was removed (deregistered or expired); register again")
        return web.json_response(
            {
                "version": version,
                "domain": self.domain,
                "self": self._node_json(me),
                "peers": [self._node_json(n) for n in nodes if n.id != node_id],
            }
        )

    async def _endpoints(self, request: web.Request) -> web.Response:
        node = await self._authenticate(request)
        endpoints = api.parse_endpoints_body(await self._body(request))
        result = await self.store.update_node(node.id, endpoints=endpoints)
        if result is None:
            raise ApiError(401, "this node was removed; register again")
        self._last_active[node.id] = self._clock()
        self._publish(result[1])
        return web.json_response({"version": max(result[1], self._version)})

    async def _deregister(self, request: web.Request) -> web.Response:
        node = await self._authenticate(request)
        version = await self.store.delete_node(node.id)
        self._forget(node.id)
        if version is not None:
            self._publish(version)
            log.info("control: node %d (%s) deregistered", node.id, node.name)
        return web.json_response({})

    # -- certificates --------------------------------------------------------------------

    async def tailnet_ca(self) -> ca.TailnetCA:
        """The tailnet CA, created in the store on first use (every replica agrees on the
        one stored first: :meth:`Store.put_ca_if_absent`)."""
        if self._ca is not None:
            return self._ca
        async with self._ca_lock:
            if self._ca is not None:
                return self._ca
            try:
                record = await self.store.get_ca()
                if record is None:
                    key_pem, cert_pem = await asyncio.to_thread(ca.new_ca, self.domain)
                    record = await self.store.put_ca_if_absent(key_pem.decode(),
                                                               cert_pem.decode())
                    created = record.cert_pem == cert_pem.decode()
                else:
                    created = False
            except StoreError as e:
                log.error("control: cannot load or create the tailnet CA: %s", e)
                raise ApiError(503, "the tailnet CA cannot be loaded or created from the "
                               "store right now; see the control server log") from None
            try:
                loaded = await asyncio.to_thread(ca.load_ca, record.key_pem, record.cert_pem)
            except ValueError as e:
                raise ApiError(500, f"the stored tailnet CA is unusable ({e}); restore it "
                               "from a backup") from None
            log.info("control: tailnet CA %s %s (SHA-256 %s)", ca.ca_name(self.domain),
                     "created" if created else "loaded", loaded.fingerprint)
            self._ca = loaded
            return loaded

    async def _ca_pem(self, request: web.Request) -> web.Response:
        authority = await self.tailnet_ca()
        return web.Response(body=authority.cert_pem, content_type="application/x-pem-file")

    async def _cert(self, request: web.Request) -> web.Response:
        node = await self._authenticate(request)
        body = await self._body(request)
        unknown = sorted(set(body) - {"csr"})
        if unknown:
            raise ApiError(400, f"unknown fields {', '.join(unknown)}: send {{\"csr\": PEM}}")
        authority = await self.tailnet_ca()
        fqdn = f"{node.name}.{self.domain}"
        try:
            issued = await asyncio.to_thread(
                ca.issue_from_csr, authority, body.get("csr"), [fqdn],
                lifetime=self.cert_lifetime)
        except ca.CSRError as e:
            self.cert_stats["refused"] += 1
            log.info("control: certificate for node %d (%s) refused: %s", node.id, node.name, e)
            raise ApiError(e.status, str(e)) from None
        self.cert_stats["issued"] += 1
        not_after = issued.not_after.timestamp()
        log.info("control: issued certificate serial %s for node %d (%s) names=%s "
                 "not_after=%s", issued.serial_hex, node.id, node.name,
                 ",".join(issued.names), api.rfc3339(not_after))
        return web.json_response({
            "cert_chain": issued.chain_pem.decode(),
            "not_after": api.rfc3339(not_after),
            "serial": issued.serial_hex,
        })
