"""tsnet2d's small HTTP port (`--metrics-addr HOST:PORT`): /metrics, /healthz, /readyz.

    server = HealthServer(metrics, healthz=check_health, readyz=check_ready)
    host, port = await server.start("0.0.0.0", 9090)   # port 0: pick a free port
    ...
    await server.close()                                # the port is free again

`healthz` and `readyz` are called on every request and return `(ok, reason)`: 200 "ok" when
ok, else 503 with the reason as text. They must be quick and must not block (they run on
the event loop). GET and HEAD only (405 with `Allow` otherwise), no request bodies (413),
unknown paths 404. The server owns no task of its own: aiohttp's runner serves connections
and `close()` ends them and releases the port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import exposition

from tsnet2.daemon.metrics import Metrics

log = logging.getLogger("tsnet2d.health")

Check = Callable[[], tuple[bool, str]]

#: The classic text format; what prometheus_client's own server sends by default.
METRICS_CONTENT_TYPE: str = getattr(
    exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST
)
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
MAX_REASON = 1024  # characters of a failing check's reason sent back
KEEPALIVE_TIMEOUT = 15.0  # seconds an idle scrape connection stays open
ALLOWED_METHODS = ("GET", "HEAD")


class HealthServer:
    """Serves /metrics (from `metrics.render()`), /healthz and /readyz over HTTP/1.1."""

    def __init__(self, metrics: Metrics, *, healthz: Check, readyz: Check) -> None:
        """Configure the server; nothing listens until `start`."""
        self.metrics = metrics
        self._checks: dict[str, Check] = {"/healthz": healthz, "/readyz": readyz}
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=1024, middlewares=[_guard])
        self.app.router.add_route("*", "/metrics", self._metrics)
        self.app.router.add_route("*", "/healthz", self._check)
        self.app.router.add_route("*", "/readyz", self._check)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on `host:port` and serve; return the bound (host, port)."""
        if self._runner is not None:
            raise RuntimeError("health server already started")
        # lingering_time=0: a refused body is never drained, the connection just closes.
        runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                               keepalive_timeout=KEEPALIVE_TIMEOUT, lingering_time=0,
                               shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: "
                                     f"{exc.strerror or exc}") from exc
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        log.info("serving /metrics, /healthz and /readyz on %s:%d", bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self.metrics.render()
        except Exception:
            log.exception("rendering /metrics failed")
            return _text(500, "internal error while rendering metrics")
        return web.Response(status=200, body=body,
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _check(self, request: web.Request) -> web.StreamResponse:
        check = self._checks[request.path]
        try:
            ok, reason = check()
        except Exception as exc:
            log.exception("%s check failed", request.path)
            ok, reason = False, f"check failed: {type(exc).__name__}: {exc}"
        if ok:
            return _text(200, "ok")
        reason = (reason or "not ok")[:MAX_REASON]
        return _text(503, reason)


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n",
                        headers={"Content-Type": TEXT_CONTENT_TYPE})


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Path, method and body checks before any handler, answered as plain text."""
    if request.match_info.http_exception is not None:
        return _text(404, f"not found: {request.path}; try /metrics, /healthz or /readyz")
    if request.method not in ALLOWED_METHODS:
        resp = _text(405, f"method {request.method} not allowed; use GET")
        resp.headers["Allow"] = ", ".join(ALLOWED_METHODS)
        resp.force_close()
        return resp
    if request.body_exists:
        # Never read: the connection is closed after the reply instead of drained.
        resp = _text(413, "request bodies are not accepted")
        resp.force_close()
        return resp
    return await handler(request)


__all__ = ["METRICS_CONTENT_TYPE", "HealthServer"]
