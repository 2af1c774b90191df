"""tsnet2: put this process on a private WireGuard network through the tsnet2d daemon.

The daemon (``tsnet2d``, usually a sidecar) owns the node: WireGuard keys, the
coordination session and the network device, and it writes an audit log of every
byte. This library talks to it over one Unix socket, so the app never holds keys
or raw tailnet access. The API follows Go's ``tsnet.Server``; the sync face hands
back real sockets, the asyncio face hands back streams.

Usage::

    import tsnet2

    with tsnet2.Server(hostname="web") as srv:   # socket: $TSNET2_SOCKET
        status = srv.up(timeout=60)              # wait until the node runs
        print(status.tailscale_ips)
        with srv.listen("tcp", ":8080") as ln:
            conn = ln.accept()                   # a TailnetSocket
            who = srv.local_client().whois(f"{conn.tailnet_remote[0]}")
            conn.sendall(b"hello " + who["UserProfile"]["LoginName"].encode())
            conn.close()

asyncio: ``async with tsnet2.AsyncServer() as srv: conn = await srv.dial("tcp", "db:5432")``.

Auth key precedence: ``Server(auth_key=...)`` when non-empty, else the daemon's
``TS_AUTHKEY``, else the daemon's ``TS_AUTH_KEY`` (the daemon reads them from its own
environment; likewise ``control_url`` falls back to its ``TS_CONTROL_URL``).

Environment: ``TSNET2_SOCKET`` is the default ``socket_path``.

Errors derive from :class:`tsnet2.Error`; see :mod:`tsnet2.client.errors` for the tree.
"""

from tsnet2._version import __version__
from tsnet2.client import (
    AddressError,
    AddressInUseError,
    AsyncConn,
    AsyncListener,
    AsyncLocalClient,
    AsyncPacketConn,
    AsyncPacketListener,
    AsyncServer,
    AsyncSocketListener,
    AuthKeyError,
    CallerIdentity,
    ClosedError,
    DaemonError,
    DaemonUnavailableError,
    DatagramTooLargeError,
    DeadlineExceededError,
    DialError,
    Error,
    HostnameConflictError,
    LimitError,
    Listener,
    LocalAPIError,
    LocalClient,
    NoCertificateError,
    NodeDownError,
    NoSuchPeerError,
    NotSupportedError,
    PacketConn,
    PacketListener,
    PeerOfflineError,
    PermissionDeniedError,
    ProtocolError,
    Server,
    SocketListener,
    Status,
    TailnetSocket,
    TLSError,
    TLSInfo,
    identity_from_asgi_scope,
    identity_from_headers,
    identity_from_wsgi_environ,
)

__all__ = [
    "AddressError",
    "AddressInUseError",
    "AsyncConn",
    "AsyncListener",
    "AsyncLocalClient",
    "AsyncPacketConn",
    "AsyncPacketListener",
    "AsyncServer",
    "AsyncSocketListener",
    "AuthKeyError",
    "CallerIdentity",
    "ClosedError",
    "DaemonError",
    "DaemonUnavailableError",
    "DatagramTooLargeError",
    "DeadlineExceededError",
    "DialError",
    "Error",
    "HostnameConflictError",
    "LimitError",
    "Listener",
    "LocalAPIError",
    "LocalClient",
    "NoCertificateError",
    "NoSuchPeerError",
    "NodeDownError",
    "NotSupportedError",
    "PacketConn",
    "PacketListener",
    "PeerOfflineError",
    "PermissionDeniedError",
    "ProtocolError",
    "Server",
    "SocketListener",
    "Status",
    "TLSError",
    "TLSInfo",
    "TailnetSocket",
    "__version__",
    "identity_from_asgi_scope",
    "identity_from_headers",
    "identity_from_wsgi_environ",
]
