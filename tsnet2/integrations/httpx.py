"""httpx on the tailnet: transports whose every connection is a tsnet2 ``dial``.

::

    import tsnet2

    with tsnet2.Server() as srv:
        client = srv.http_client()                 # an httpx.Client on TailnetTransport
        print(client.get("http://web:8080/").json())

    async with tsnet2.AsyncServer() as srv:
        async with srv.http_client() as client:    # an httpx.AsyncClient
            r = await client.get("http://web:8080/")

or, by hand, ``httpx.Client(transport=TailnetTransport(srv))``.

Built on httpcore's public interface only: a network backend
(:class:`TailnetNetworkBackend`, ``httpcore.NetworkBackend``; its ``connect_tcp``
dials through the Server) under ``httpcore.ConnectionPool(network_backend=...)``,
wrapped as an ``httpx.BaseTransport`` that maps ``httpx.Request`` to
``httpcore.Request`` and httpcore's exceptions to httpx's, as httpx's own
``HTTPTransport`` does. So the pool, keep-alive, connection reuse and timeouts are
httpcore's; a pooled connection the server closed is noticed (its socket reads EOF)
and replaced by a new dial.

- Host names are tailnet names (or FQDNs, or tailnet IPs), resolved by tsnet2d, never by
  DNS. A dial that fails raises ``httpx.ConnectError`` (``httpx.ConnectTimeout`` for a
  timeout) whose message says what to do; ``__cause__`` is the tsnet2 error
  (``tsnet2.NoSuchPeerError``...).
- Timeouts: httpx's ``connect`` timeout bounds the dial, ``read``/``write`` each socket
  operation, ``pool`` the wait for a pooled connection.
- ``https://``: TLS over the dialed flow (``start_tls``), verified with the transport's
  ``verify``/``cert`` as in httpx (certifi by default), SNI from the URL's host. HTTP/2
  with ``http2=True`` (needs ``h2``).
- Proxies and ``uds=`` do not apply (the daemon is the way out); the clients from
  ``Server.http_client()`` ignore proxy variables in the environment for that reason.

Needs the ``httpx`` extra: ``pip install 'tsnet2[httpx]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
import typing
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from types import TracebackType

from tsnet2.integrations._common import connect_error_message, dial_target, missing_extra

try:
    import httpcore
    import httpx
except ImportError as _exc:  # pragma: no cover - exercised by tests/unit/test_extras.py
    raise missing_extra("tsnet2.integrations.httpx", "httpx", _exc) from _exc

from tsnet2.client import AsyncConn, AsyncServer, Error, Server, TailnetSocket
from tsnet2.client.errors import DeadlineExceededError

__all__ = [
    "AsyncTailnetNetworkBackend",
    "AsyncTailnetNetworkStream",
    "AsyncTailnetTransport",
    "TailnetNetworkBackend",
    "TailnetNetworkStream",
    "TailnetTransport",
    "map_httpcore_exceptions",
]

DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)
"""httpx's default pool limits."""

TRANSPORT_OPTIONS = ("verify", "cert", "trust_env", "http1", "http2", "limits", "retries")
"""Keyword arguments ``Server.http_client()`` hands to the transport, not the client."""

_HTTPCORE_TO_HTTPX: list[tuple[type[Exception], type[httpx.HTTPError]]] = [
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
]


def httpx_exception_for(exc: Exception) -> type[httpx.HTTPError] | None:
    """The most specific httpx exception class for an httpcore exception (None: not one)."""
    found: type[httpx.HTTPError] | None = None
    for source, target in _HTTPCORE_TO_HTTPX:
        if isinstance(exc, source) and (found is None or issubclass(target, found)):
            found = target
    return found


@contextlib.contextmanager
def map_httpcore_exceptions() -> Iterator[None]:
    """Re-raise httpcore's exceptions as httpx's (the cause is kept), like httpx does."""
    try:
        yield
    except Exception as exc:
        mapped = httpx_exception_for(exc)
        if mapped is None:
            raise
        raise mapped(str(exc)) from exc


def httpcore_connect_error(exc: Error, target: str) -> httpcore.ConnectError | \
        httpcore.ConnectTimeout:
    """The httpcore exception for a failed dial: ConnectTimeout for a timeout, else
    ConnectError; the message says what to do (``_common.connect_error_message``)."""
    message = connect_error_message(exc, target)
    if isinstance(exc, DeadlineExceededError):
        return httpcore.ConnectTimeout(message)
    return httpcore.ConnectError(message)


def _is_readable(sock: socket.socket) -> bool:
    """Whether a read would not block: data, EOF or an error waits (a closed socket too)."""
    fd = sock.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _connect_target(host: str, port: int) -> str:
    try:
        return dial_target(host, port)
    except ValueError as exc:
        raise httpcore.ConnectError(f"cannot connect to {host!r}: {exc}") from None


# -- sync ---------------------------------------------------------------------------------


class TailnetNetworkStream(httpcore.NetworkStream):
    """One dialed flow as an httpcore ``NetworkStream`` (a :class:`tsnet2.TailnetSocket`,
    or the ``ssl.SSLSocket`` over it after :meth:`start_tls`).

    ``get_extra_info``: ``"client_addr"``/``"server_addr"`` are the tailnet ends,
    ``"socket"`` the socket, ``"ssl_object"`` the TLS socket, ``"is_readable"`` whether
    a read would not block (how httpcore notices a closed keep-alive connection).
    """

    def __init__(self, sock: socket.socket, tailnet: TailnetSocket) -> None:
        self._sock = sock
        self._tailnet = tailnet

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Read up to ``max_bytes`` (b"" at EOF); ReadTimeout after ``timeout`` seconds."""
        try:
            self._sock.settimeout(timeout)
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Write all of ``buffer``; WriteTimeout if one send waits ``timeout`` seconds."""
        view = memoryview(buffer)
        try:
            while view:
                self._sock.settimeout(timeout)
                view = view[self._sock.send(view):]
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        """Close the flow (the daemon logs its close record)."""
        self._sock.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        """TLS over the flow (``ssl_context.wrap_socket``); ConnectError/ConnectTimeout
        if the handshake fails, and the flow is closed."""
        if isinstance(self._sock, ssl.SSLSocket):
            self.close()
            raise httpcore.ConnectError("tsnet2: TLS inside TLS (an HTTPS proxy) is not "
                                        "supported on a tailnet flow")
        try:
            self._sock.settimeout(timeout)
            tls = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname)
        except TimeoutError as exc:
            self.close()
            raise httpcore.ConnectTimeout(f"TLS handshake: {exc or 'timed out'}") from exc
        except OSError as exc:  # ssl.SSLError is an OSError
            self.close()
            raise httpcore.ConnectError(f"TLS handshake: {exc}") from exc
        return TailnetNetworkStream(tls, self._tailnet)

    def get_extra_info(self, info: str) -> typing.Any:
        """See the class docstring."""
        if info == "ssl_object":
            return self._sock if isinstance(self._sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return self._tailnet.getsockname()
        if info == "server_addr":
            return self._tailnet.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return _is_readable(self._sock)
        return None


class TailnetNetworkBackend(httpcore.NetworkBackend):
    """An httpcore network backend whose ``connect_tcp`` is ``server.dial("tcp", ...)``.

    ``local_address`` and ``socket_options`` do not apply to a flow the daemon opens and
    are ignored; ``connect_unix_socket`` raises ConnectError.
    """

    def __init__(self, server: Server) -> None:
        self.server = server

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        """Dial ``host:port`` through tsnet2d within ``timeout`` seconds."""
        target = _connect_target(host, port)
        try:
            sock = self.server.dial("tcp", target, timeout=timeout)
        except Error as exc:
            raise httpcore_connect_error(exc, target) from exc
        return TailnetNetworkStream(sock, sock)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        """Not on the tailnet: raises ConnectError."""
        raise httpcore.ConnectError("tsnet2: Unix sockets are not reachable over the tailnet")


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with map_httpcore_exceptions():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


def _httpcore_request(request: httpx.Request) -> httpcore.Request:
    """The httpcore request for an httpx one (as httpx's HTTPTransport builds it)."""
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=request.url.raw_scheme,
            host=request.url.raw_host,
            port=request.url.port,
            target=request.url.raw_path,
        ),
        headers=request.headers.raw,
        content=request.stream,
        extensions=request.extensions,
    )


def _pool_options(
    verify: ssl.SSLContext | str | bool, cert: typing.Any, trust_env: bool, http1: bool,
    http2: bool, limits: httpx.Limits, retries: int,
) -> dict[str, typing.Any]:
    return {
        "ssl_context": httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env),
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        "http1": http1,
        "http2": http2,
        "retries": retries,
    }


class TailnetTransport(httpx.BaseTransport):
    """An httpx transport that reaches tailnet peers through ``server`` (a
    :class:`tsnet2.Server`): ``httpx.Client(transport=TailnetTransport(srv))``.

    The options are httpx's ``HTTPTransport``'s: ``verify``, ``cert`` and ``trust_env``
    (``SSL_CERT_FILE``...) for https, ``http1``/``http2``, pool ``limits``, and
    ``retries`` (of a failed connect). Closing the transport closes its pooled
    connections, not the server.
    """

    def __init__(
        self,
        server: Server,
        *,
        verify: ssl.SSLContext | str | bool = True,
        cert: typing.Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        retries: int = 0,
    ) -> None:
        self.server = server
        self._pool = httpcore.ConnectionPool(
            network_backend=TailnetNetworkBackend(server),
            **_pool_options(verify, cert, trust_env, http1, http2, limits, retries),
        )

    @property
    def pool(self) -> httpcore.ConnectionPool:
        """The httpcore connection pool (``pool.connections`` lists its connections)."""
        return self._pool

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a pooled (or newly dialed) connection."""
        with map_httpcore_exceptions():
            resp = self._pool.handle_request(_httpcore_request(request))
        return httpx.Response(
            status_code=resp.status,
            headers=resp.headers,
            stream=_ResponseStream(typing.cast(Iterable[bytes], resp.stream)),
            extensions=resp.extensions,
        )

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.close()

    def __enter__(self) -> TailnetTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        self.close()


# -- asyncio ------------------------------------------------------------------------------


class AsyncTailnetNetworkStream(httpcore.AsyncNetworkStream):
    """One dialed flow (a :class:`tsnet2.AsyncConn`) as an httpcore ``AsyncNetworkStream``.

    ``start_tls`` upgrades the connection in place (``AsyncConn.start_tls``, asyncio's
    ``StreamWriter.start_tls``). ``get_extra_info`` as in :class:`TailnetNetworkStream`;
    ``"is_readable"`` is true once the peer's EOF (or an error) reached the stream.
    """

    def __init__(self, conn: AsyncConn) -> None:
        self.conn = conn

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Read up to ``max_bytes`` (b"" at EOF); ReadTimeout after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                return await self.conn.reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout("timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Write all of ``buffer``; WriteTimeout if draining takes ``timeout`` seconds."""
        if not buffer:
            return
        try:
            self.conn.writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self.conn.writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout("timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        """Close the flow and wait until it is closed."""
        self.conn.close()
        await self.conn.wait_closed()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """TLS over the flow; ConnectError/ConnectTimeout if the handshake fails (and the
        flow is closed)."""
        if self.conn.get_extra_info("ssl_object") is not None:
            await self.aclose()
            raise httpcore.ConnectError("tsnet2: TLS inside TLS (an HTTPS proxy) is not "
                                        "supported on a tailnet flow")
        try:
            await self.conn.start_tls(ssl_context, server_hostname=server_hostname,
                                      timeout=timeout)
        except TimeoutError as exc:
            await self.aclose()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from exc
        except OSError as exc:
            await self.aclose()
            raise httpcore.ConnectError(f"TLS handshake: {exc}") from exc
        return self

    def get_extra_info(self, info: str) -> typing.Any:
        """See the class docstring."""
        if info == "ssl_object":
            return self.conn.get_extra_info("ssl_object")
        if info == "client_addr":
            return self.conn.get_extra_info("sockname")
        if info == "server_addr":
            return self.conn.get_extra_info("peername")
        if info == "socket":
            return self.conn.get_extra_info("socket")
        if info == "is_readable":
            reader = self.conn.reader
            return (reader.at_eof() or reader.exception() is not None
                    or self.conn.writer.is_closing())
        return None


class AsyncTailnetNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore async network backend whose ``connect_tcp`` is ``await server.dial(...)``
    on the running event loop (asyncio). ``local_address``/``socket_options`` are ignored;
    ``connect_unix_socket`` raises ConnectError."""

    def __init__(self, server: AsyncServer) -> None:
        self.server = server

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Dial ``host:port`` through tsnet2d within ``timeout`` seconds."""
        target = _connect_target(host, port)
        try:
            conn = await self.server.dial("tcp", target, timeout=timeout)
        except Error as exc:
            raise httpcore_connect_error(exc, target) from exc
        return AsyncTailnetNetworkStream(conn)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Not on the tailnet: raises ConnectError."""
        raise httpcore.ConnectError("tsnet2: Unix sockets are not reachable over the tailnet")

    async def sleep(self, seconds: float) -> None:
        """Sleep (between connect retries)."""
        await asyncio.sleep(seconds)


class _AsyncResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with map_httpcore_exceptions():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


class AsyncTailnetTransport(httpx.AsyncBaseTransport):
    """The asyncio :class:`TailnetTransport`: ``httpx.AsyncClient(transport=
    AsyncTailnetTransport(srv))`` with a :class:`tsnet2.AsyncServer`. Same options."""

    def __init__(
        self,
        server: AsyncServer,
        *,
        verify: ssl.SSLContext | str | bool = True,
        cert: typing.Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        retries: int = 0,
    ) -> None:
        self.server = server
        self._pool = httpcore.AsyncConnectionPool(
            network_backend=AsyncTailnetNetworkBackend(server),
            **_pool_options(verify, cert, trust_env, http1, http2, limits, retries),
        )

    @property
    def pool(self) -> httpcore.AsyncConnectionPool:
        """The httpcore connection pool (``pool.connections`` lists its connections)."""
        return self._pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a pooled (or newly dialed) connection."""
        with map_httpcore_exceptions():
            resp = await self._pool.handle_async_request(_httpcore_request(request))
        return httpx.Response(
            status_code=resp.status,
            headers=resp.headers,
            stream=_AsyncResponseStream(typing.cast(AsyncIterable[bytes], resp.stream)),
            extensions=resp.extensions,
        )

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._pool.aclose()

    async def __aenter__(self) -> AsyncTailnetTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        await self.aclose()


def split_client_options(
    kwargs: dict[str, typing.Any],
) -> tuple[dict[str, typing.Any], dict[str, typing.Any]]:
    """``Server.http_client(**kwargs)``: (the transport's options, the client's).

    The client is built with ``trust_env=False``: proxy variables from the environment
    would route requests around the tailnet (``trust_env`` goes to the transport, for
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``). ``transport=``, ``proxy=`` and ``mounts=`` are
    refused (they would replace the tailnet transport).
    """
    for name in ("transport", "proxy", "mounts", "proxies", "uds"):
        if name in kwargs:
            raise TypeError(f"http_client() does not take {name}= (requests go through the "
                            "tailnet transport); build httpx.Client(transport="
                            "TailnetTransport(server), ...) to combine transports")
    transport = {k: kwargs.pop(k) for k in TRANSPORT_OPTIONS if k in kwargs}
    return transport, {**kwargs, "trust_env": False}
