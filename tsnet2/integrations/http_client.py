"""http.client on the tailnet, standard library only: connections whose ``connect()`` dials.

::

    import tsnet2
    from tsnet2.integrations.http_client import HTTPConnection

    with tsnet2.Server() as srv:
        conn = HTTPConnection("web", 8080, tsnet2_server=srv, timeout=10)
        conn.request("GET", "/health")
        print(conn.getresponse().read())
        conn.request("GET", "/again")          # works after the server closed the connection
        print(conn.getresponse().read())
        conn.close()

Setting ``conn.sock = srv.dial(...)`` by hand works for one connection only: once the
server closes it (``Connection: close``, an idle timeout), http.client reconnects with
its own ``connect()``, which resolves the tailnet name with DNS and fails
(``socket.gaierror``). These classes override ``connect()`` (http.client's public hook) to
dial through the Server every time. :class:`HTTPSConnection` is http.client's: its
``connect()`` calls ``super().connect()`` for the TCP step, which is the dial here, then
wraps the flow in TLS with the connection's ``context`` (certificate and host name checked).

A failed dial raises the tsnet2 error (``tsnet2.NoSuchPeerError``, ...: ConnectionError
subclasses; ``tsnet2.DeadlineExceededError`` is a TimeoutError). No extra is needed.
"""

from __future__ import annotations

import http.client
import typing

from tsnet2.client import Server
from tsnet2.integrations._common import dial_target

__all__ = ["HTTPConnection", "HTTPSConnection"]


class HTTPConnection(http.client.HTTPConnection):
    """``http.client.HTTPConnection`` whose ``connect()`` is a dial through
    ``tsnet2_server``: ``HTTPConnection("web", 8080, tsnet2_server=srv)``. ``timeout``
    bounds the dial and then each socket operation, as for TCP."""

    tsnet2_server: Server

    def __init__(self, host: str, port: int | None = None, *args: typing.Any,
                 tsnet2_server: Server | None = None, **kwargs: typing.Any) -> None:
        # http.client.HTTPSConnection.__init__ calls this one with positional arguments
        # and no tsnet2_server (HTTPSConnection sets it); otherwise it is required.
        super().__init__(host, port, *args, **kwargs)
        if tsnet2_server is not None:
            self.tsnet2_server = tsnet2_server
        elif not isinstance(self, HTTPSConnection):
            raise TypeError("HTTPConnection() needs tsnet2_server= (a tsnet2.Server)")

    def connect(self) -> None:
        """Dial ``host:port`` through the tsnet2 Server into ``self.sock``."""
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        sock = self.tsnet2_server.dial("tcp", dial_target(self.host, self.port),
                                       timeout=timeout)
        sock.settimeout(timeout)
        self.sock = sock


class HTTPSConnection(http.client.HTTPSConnection, HTTPConnection):
    """``http.client.HTTPSConnection`` over a dial through ``tsnet2_server``:
    ``HTTPSConnection("web", 443, tsnet2_server=srv, context=ssl_context)``.
    (Its ``connect()`` is http.client's; the ``super().connect()`` in it is
    :meth:`HTTPConnection.connect`, the dial.)"""

    def __init__(self, host: str, port: int | None = None, *, tsnet2_server: Server,
                 **kwargs: typing.Any) -> None:
        http.client.HTTPSConnection.__init__(self, host, port, **kwargs)
        self.tsnet2_server = tsnet2_server
