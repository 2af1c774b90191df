"""aiohttp on the tailnet: a connector whose every connection is a tsnet2 ``dial``.

::

    import aiohttp, tsnet2
    from tsnet2.integrations.aiohttp import TailnetConnector

    async with tsnet2.AsyncServer() as srv, \\
            aiohttp.ClientSession(connector=TailnetConnector(srv)) as session:
        async with session.get("http://web:8080/") as resp:
            print(await resp.json())

:class:`TailnetConnector` is an ``aiohttp.BaseConnector``, so aiohttp's pool, limits,
keep-alive and reconnects are its own. The dial runs natively on the event loop
(``await AsyncServer.dial_socket(...)``, no executor, no sync Server), and the flow is
handed to aiohttp with ``loop.create_connection(protocol_factory, sock=..., ssl=...)``.

The hook: ``BaseConnector._create_connection(req, traces, timeout)``, the one method
aiohttp's own connectors (``TCPConnector``, ``UnixConnector``, ``NamedPipeConnector``)
implement to open a connection; it is underscored, so the ``test`` extra pins aiohttp and
the lab tests (tests/integration/test_http_clients.py) exercise it. It returns a protocol
from the connector's ``_factory``, as ``UnixConnector`` does.

- Host names are tailnet names (or FQDNs, or tailnet IPs); no DNS, no resolver.
- ``ClientTimeout(sock_connect=...)`` (else ``connect``) bounds the dial; a timeout is
  aiohttp's ``ConnectionTimeoutError``. A failed dial raises ``ClientConnectorError``
  whose message says what to do; the tsnet2 error is its cause.
- ``https://``: TLS over the flow with ``req.ssl`` (True: the default context; an
  ``ssl.SSLContext``: that one; False: no verification). ``aiohttp.Fingerprint`` is not
  supported (``ClientConnectorError``).
- Proxies do not apply; a request with ``proxy=`` is refused.

Needs the ``aiohttp`` extra: ``pip install 'tsnet2[aiohttp]'``.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
import typing

from tsnet2.integrations._common import connect_error_message, dial_target, missing_extra

try:
    import aiohttp
    from aiohttp.client_proto import ResponseHandler
except ImportError as _exc:  # pragma: no cover - exercised by tests/unit/test_extras.py
    raise missing_extra("tsnet2.integrations.aiohttp", "aiohttp", _exc) from _exc

from tsnet2.client import AsyncServer, Error
from tsnet2.client.errors import DeadlineExceededError

if typing.TYPE_CHECKING:
    from aiohttp.client_reqrep import ClientRequest
    from aiohttp.tracing import Trace

__all__ = ["TailnetConnector", "ssl_context_for"]


def ssl_context_for(ssl_option: typing.Any) -> ssl.SSLContext:
    """The SSLContext for an https request's ``ssl=`` option (True/None: a default,
    verifying context; False: no verification; an SSLContext: itself). ValueError for
    what this connector cannot do (``aiohttp.Fingerprint``)."""
    if isinstance(ssl_option, ssl.SSLContext):
        return ssl_option
    if ssl_option is True or ssl_option is None:
        return ssl.create_default_context()
    if ssl_option is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    raise ValueError(f"tsnet2: ssl={ssl_option!r} is not supported on the tailnet connector "
                     "(pass True, False or an ssl.SSLContext)")


class TailnetConnector(aiohttp.BaseConnector):
    """An aiohttp connector that reaches tailnet peers through ``server`` (a
    :class:`tsnet2.AsyncServer`): ``aiohttp.ClientSession(connector=TailnetConnector(srv))``.

    Keyword arguments are ``BaseConnector``'s (``limit``, ``limit_per_host``,
    ``keepalive_timeout``, ``force_close``...). Closing the connector (or the session)
    closes its connections, not the server.
    """

    def __init__(self, server: AsyncServer, **kwargs: typing.Any) -> None:
        super().__init__(**kwargs)
        self.server = server

    async def _create_connection(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        """Open one connection for ``req``: dial, then TLS for https (see the module)."""
        if req.proxy is not None:
            raise aiohttp.ClientConnectorError(req.connection_key, OSError(
                errno.EINVAL, "tsnet2: proxies do not apply on the tailnet"))
        host = req.url.raw_host or ""
        try:
            target = dial_target(host, req.url.port, req.url.scheme)
            ssl_ctx = ssl_context_for(req.ssl) if req.is_ssl() else None
        except ValueError as exc:
            raise aiohttp.ClientConnectorError(
                req.connection_key, OSError(errno.EINVAL, str(exc))) from exc
        dial_timeout = timeout.sock_connect or timeout.connect
        try:
            sock = await self.server.dial_socket("tcp", target, timeout=dial_timeout)
        except DeadlineExceededError as exc:
            raise aiohttp.ConnectionTimeoutError(connect_error_message(exc, target)) from exc
        except Error as exc:
            raise aiohttp.ClientConnectorError(req.connection_key, OSError(
                errno.EHOSTUNREACH, connect_error_message(exc, target))) from exc
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(
                self._factory, sock=sock, ssl=ssl_ctx,
                server_hostname=host.rstrip(".") if ssl_ctx is not None else None,
                ssl_handshake_timeout=dial_timeout if ssl_ctx is not None else None,
            )
        except BaseException as exc:
            sock.close()
            if isinstance(exc, ssl.SSLError | ssl.CertificateError):
                raise aiohttp.ClientConnectorSSLError(req.connection_key, exc) from exc
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                raise aiohttp.ClientConnectorError(req.connection_key, exc) from exc
            raise
        return proto
