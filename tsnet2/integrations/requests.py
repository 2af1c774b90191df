"""requests (and urllib3, and http.client) on the tailnet: every connection is a tsnet2 ``dial``.

::

    import requests, tsnet2
    from tsnet2.integrations.requests import TailnetAdapter

    with tsnet2.Server() as srv, requests.Session() as session:
        session.mount("http://", TailnetAdapter(srv))
        session.mount("https://", TailnetAdapter(srv))
        print(session.get("http://web:8080/").json())

The pattern requests-unixsocket uses, on urllib3's public extension points: the adapter's
pool manager builds connection pools whose ``ConnectionCls`` is
:class:`TailnetHTTPConnection` (or :class:`TailnetHTTPSConnection`), and those dial
through the Server. So urllib3 keeps doing what it does for TCP: keep-alive, a new
connection when the server closed the pooled one (``Connection: close``, or a socket that
reads EOF), ``max_retries``, timeouts (the connect timeout bounds the dial), TLS
verification (``verify=``, ``cert=`` as usual).

The hooks, pinned by the ``test`` extra and its tests:

- :class:`TailnetHTTPConnection` overrides ``connect()`` (http.client's and urllib3's public
  method that opens ``self.sock``). (For the standard library alone, see
  :mod:`tsnet2.integrations.http_client`.)
- :class:`TailnetHTTPSConnection` overrides urllib3's ``_new_conn()``, the one step of
  ``HTTPSConnection.connect()`` that opens the TCP socket, so urllib3's own TLS setup and
  certificate checks run unchanged on the dialed flow.
- :class:`TailnetAdapter` overrides ``HTTPAdapter.init_poolmanager`` (public) and sets the
  pool manager's ``pool_classes_by_scheme`` (a documented attribute of urllib3's
  ``PoolManager``).

A dial that fails raises urllib3's ``NewConnectionError`` (``ConnectTimeoutError`` for a
timeout), which requests raises as ``requests.ConnectionError`` (``ConnectTimeout``) with
a message that says what to do; the tsnet2 error is its cause. Proxies do not apply: the
adapter's ``send()`` ignores them (``proxies=`` and ``HTTP_PROXY`` alike).

Needs the ``requests`` extra: ``pip install 'tsnet2[requests]'``.
"""

from __future__ import annotations

import functools
import socket
import typing
from collections.abc import Mapping

from tsnet2.integrations._common import connect_error_message, dial_target, missing_extra

try:
    import requests
    import requests.adapters
    import urllib3
    import urllib3.connection
    import urllib3.connectionpool
    import urllib3.exceptions
except ImportError as _exc:  # pragma: no cover - exercised by tests/unit/test_extras.py
    raise missing_extra("tsnet2.integrations.requests", "requests", _exc) from _exc

from tsnet2.client import Error, Server
from tsnet2.client.errors import DeadlineExceededError

__all__ = [
    "TailnetAdapter",
    "TailnetHTTPConnection",
    "TailnetHTTPConnectionPool",
    "TailnetHTTPSConnection",
    "TailnetHTTPSConnectionPool",
    "dial_socket",
]


def _timeout(value: typing.Any) -> float | None:
    """A connection's timeout as seconds (urllib3 and http.client use a sentinel object
    for "the socket default", which is None here)."""
    return float(value) if isinstance(value, int | float) else None


def dial_socket(server: Server, host: str, port: int | None, timeout: float | None,
                conn: typing.Any = None) -> socket.socket:
    """Dial ``host:port`` through ``server``; on failure raise urllib3's connect error for
    ``conn`` (``NewConnectionError``, or ``ConnectTimeoutError``) from the tsnet2 error."""
    target = dial_target(host, port)
    try:
        return server.dial("tcp", target, timeout=timeout)
    except DeadlineExceededError as exc:
        raise urllib3.exceptions.ConnectTimeoutError(
            conn, connect_error_message(exc, target)) from exc
    except Error as exc:
        raise urllib3.exceptions.NewConnectionError(
            conn, connect_error_message(exc, target)) from exc


class TailnetHTTPConnection(urllib3.connection.HTTPConnection):
    """An ``http.client.HTTPConnection`` (urllib3's) whose ``connect()`` dials the host
    through ``tsnet2_server``.

    Usable alone, as urllib3's: ``TailnetHTTPConnection("web", 8080,
    tsnet2_server=srv)``; after the server closed the connection, the next request
    dials again instead of resolving "web" with DNS.
    ``getpeername()`` on ``sock`` is the tailnet peer.
    """

    def __init__(self, host: str, port: int | None = None, *, tsnet2_server: Server,
                 **kwargs: typing.Any) -> None:
        super().__init__(host, port, **kwargs)
        self.tsnet2_server = tsnet2_server

    def connect(self) -> None:
        """Open ``self.sock``: a dial through the tsnet2 Server (bounded by ``timeout``)."""
        if self.proxy is not None or self.proxy_is_tunneling:
            msg = "tsnet2: proxies do not apply on the tailnet"
            raise urllib3.exceptions.ProxyError(msg, ValueError(msg))
        self.sock = dial_socket(self.tsnet2_server, self._dns_host, self.port,
                                _timeout(self.timeout), self)


class TailnetHTTPSConnection(urllib3.connection.HTTPSConnection):
    """urllib3's ``HTTPSConnection`` on a dialed flow: ``_new_conn()`` (the step of
    ``connect()`` that opens the TCP socket) dials through ``tsnet2_server``; the TLS
    handshake and certificate checks are urllib3's."""

    def __init__(self, host: str, port: int | None = None, *, tsnet2_server: Server,
                 **kwargs: typing.Any) -> None:
        super().__init__(host, port, **kwargs)
        self.tsnet2_server = tsnet2_server

    def _new_conn(self) -> socket.socket:
        """The TCP step of ``connect()``: a dial through the tsnet2 Server."""
        if self.proxy is not None or self.proxy_is_tunneling:
            msg = "tsnet2: proxies do not apply on the tailnet"
            raise urllib3.exceptions.ProxyError(msg, ValueError(msg))
        return dial_socket(self.tsnet2_server, self._dns_host, self.port,
                           _timeout(self.timeout), self)


class TailnetHTTPConnectionPool(urllib3.connectionpool.HTTPConnectionPool):
    """urllib3's HTTP pool with :class:`TailnetHTTPConnection` connections (pass
    ``tsnet2_server=`` among its keyword arguments; urllib3 hands it to each connection)."""

    ConnectionCls = TailnetHTTPConnection


class TailnetHTTPSConnectionPool(urllib3.connectionpool.HTTPSConnectionPool):
    """urllib3's HTTPS pool with :class:`TailnetHTTPSConnection` connections."""

    ConnectionCls = TailnetHTTPSConnection


class TailnetAdapter(requests.adapters.HTTPAdapter):
    """A requests transport adapter whose connections dial through ``server`` (a
    :class:`tsnet2.Server`): ``session.mount("http://", TailnetAdapter(srv))``.

    Mount it for ``http://`` and ``https://`` (or for a prefix, like
    ``"http://web:8080/"``). The keyword arguments are HTTPAdapter's
    (``pool_connections``, ``pool_maxsize``, ``max_retries``, ``pool_block``).
    Closing the adapter (or the session) closes its pooled connections, not the server.
    """

    def __init__(self, server: Server, **kwargs: typing.Any) -> None:
        self.server = server  # before super().__init__, which builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: typing.Any) -> None:
        """Build the pool manager with tailnet pools for http and https."""
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": functools.partial(TailnetHTTPConnectionPool, tsnet2_server=self.server),
            "https": functools.partial(TailnetHTTPSConnectionPool, tsnet2_server=self.server),
        }

    def close(self) -> None:
        """Close every pooled connection now (urllib3's ``PoolManager.clear()`` leaves that to
        the pools' garbage collection), so each flow's close record is written at once."""
        pools = self.poolmanager.pools
        for key in pools.keys():  # noqa: SIM118 (the container refuses iteration)
            pool = pools.get(key)
            if pool is not None:
                pool.close()
        super().close()

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: typing.Any = None, verify: bool | str = True, cert: typing.Any = None,
             proxies: Mapping[str, str] | None = None) -> requests.Response:
        """HTTPAdapter.send without proxies: a proxy (``proxies=``, or ``HTTP_PROXY`` from
        the environment) would route the request around the tailnet, so it is ignored."""
        return super().send(request, stream=stream, timeout=timeout, verify=verify,
                            cert=cert, proxies=None)
