"""tsnet2d's small HTTP port (`--metrics-addr HOST:PORT`): /metrics, /healthz, /readyz.

    server = HealthServer(metrics, healthz=check_health, readyz=check_ready)
    host, port = await server.start("0.0.0.0", 9090)   # port 0: pick a free port
    ...
    await server.close()                                # the port is free again

`healthz` and `readyz` are called on every request and return `(ok, reason)`: 200 "ok" when
ok, else 503 with the reason as text. They must be quick and must not block (they run on
the event loop). GET and HEAD only (405 with `Allow` otherwise), no request bodies (413,
never read), unknown paths 404. One request per connection (`Connection: close`); the
request head is bounded (:data:`MAX_REQUEST_HEAD`, else 431; malformed: 400) and must
arrive within :data:`REQUEST_TIMEOUT` seconds. HTTP/1.1 on asyncio streams and h11 (no
aiohttp in the daemon). `close()` ends every connection and releases the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

import h11

from tsnet2.daemon.metrics import Metrics

log = logging.getLogger("tsnet2d.health")

Check = Callable[[], tuple[bool, str]]

#: The classic text format (tsnet2.daemon.prom writes it), as Prometheus servers send it.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
MAX_REASON = 1024  # characters of a failing check's reason sent back
MAX_REQUEST_HEAD = 8192  # bytes of request line + headers
REQUEST_TIMEOUT = 15.0  # seconds a connection may take to send its request head
SEND_TIMEOUT = 15.0  # seconds a reply may take to drain to a slow reader
ALLOWED_METHODS = ("GET", "HEAD")
_PATHS = ("/metrics", "/healthz", "/readyz")
_READ_SIZE = 16 * 1024


class _Reply:
    """One response: status, text or bytes body, extra headers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, status: int, body: bytes, content_type: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def _text(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _Reply(status, (text + "\n").encode(), TEXT_CONTENT_TYPE, headers)


class HealthServer:
    """Serves /metrics (from `metrics.render()`), /healthz and /readyz over HTTP/1.1."""

    def __init__(self, metrics: Metrics, *, healthz: Check, readyz: Check) -> None:
        """Configure the server; nothing listens until `start`."""
        self.metrics = metrics
        self._checks: dict[str, Check] = {"/healthz": healthz, "/readyz": readyz}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on `host:port` and serve; return the bound (host, port)."""
        if self._server is not None:
            raise RuntimeError("health server already started")
        try:
            server = await asyncio.start_server(self._serve, host, port, limit=_READ_SIZE)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: "
                                     f"{exc.strerror or exc}") from exc
        self._server = server
        bound = server.sockets[0].getsockname()
        log.info("serving /metrics, /healthz and /readyz on %s:%d", bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        """Stop serving, end open connections and release the port. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        conns, self._conns = list(self._conns), set()
        for task in conns:
            task.cancel()
        for task in conns:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        graceful = False
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    request = await _read_request(reader, conn)
            except h11.RemoteProtocolError as exc:
                log.debug("health port: bad request: %s", exc)
                request = None
                reply: _Reply | None = _text(exc.error_status_hint, f"bad request: {exc}")
            else:
                reply = self._handle(request) if request is not None else None
            if reply is not None:
                head = request is not None and request.method == b"HEAD"
                async with asyncio.timeout(SEND_TIMEOUT):
                    await _send(writer, conn, reply, head=head)
            graceful = True
        except (OSError, TimeoutError, h11.LocalProtocolError) as exc:
            log.debug("health port: connection ended: %r", exc)
        except asyncio.CancelledError:
            # close() (or loop shutdown) ends this connection; the task must finish
            # normally: asyncio's stream callback calls task.exception() and would log
            # a cancelled task as an error.
            pass
        finally:
            if task is not None:
                self._conns.discard(task)
            if graceful:
                writer.close()  # flushes the reply, then FIN
            else:
                writer.transport.abort()

    def _handle(self, request: h11.Request) -> _Reply:
        """Path, method and body checks, then the endpoint."""
        method = request.method.decode("ascii", "replace")
        path = unquote(urlsplit(request.target.decode("ascii", "replace")).path)
        if path not in _PATHS:
            return _text(404, f"not found: {path}; try /metrics, /healthz or /readyz")
        if method not in ALLOWED_METHODS:
            return _text(405, f"method {method} not allowed; use GET",
                         (("Allow", ", ".join(ALLOWED_METHODS)),))
        if _has_body(request):
            # Never read: the connection is closed after the reply instead of drained.
            return _text(413, "request bodies are not accepted")
        if path == "/metrics":
            return self._metrics()
        return self._check(path)

    def _metrics(self) -> _Reply:
        try:
            body = self.metrics.render()
        except Exception:
            log.exception("rendering /metrics failed")
            return _text(500, "internal error while rendering metrics")
        return _Reply(200, body, METRICS_CONTENT_TYPE)

    def _check(self, path: str) -> _Reply:
        check = self._checks[path]
        try:
            ok, reason = check()
        except Exception as exc:
            log.exception("%s check failed", path)
            ok, reason = False, f"check failed: {type(exc).__name__}: {exc}"
        if ok:
            return _text(200, "ok")
        return _text(503, (reason or "not ok")[:MAX_REASON])


async def _read_request(reader: asyncio.StreamReader, conn: h11.Connection) -> h11.Request | None:
    """The request head, or None if the client closed first. h11 bounds the head."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(_READ_SIZE))
            continue
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 400)


def _has_body(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length" and value.strip() != b"0":
            return True
    return False


async def _send(
    writer: asyncio.StreamWriter, conn: h11.Connection, reply: _Reply, *, head: bool
) -> None:
    headers = [
        ("Content-Type", reply.content_type),
        ("Content-Length", str(len(reply.body))),
        ("Connection", "close"),
        *reply.headers,
    ]
    try:
        phrase = HTTPStatus(reply.status).phrase
    except ValueError:
        phrase = ""
    out = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=phrase)) or b""
    # A reply to HEAD keeps the Content-Length of the GET reply but sends no body.
    if reply.body and not head:
        out += conn.send(h11.Data(data=reply.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    writer.write(out)
    await writer.drain()


__all__ = ["METRICS_CONTENT_TYPE", "HealthServer"]
