"""The app-side client library: a thin shim over the tsnet2d Unix socket.

:class:`Server` (blocking) and :class:`AsyncServer` (asyncio) are one design with two
faces: the asyncio code in ``tsnet2/client/_async`` is the source, and
``scripts/unasync.py`` generates the blocking face ``tsnet2/client/_sync`` from it (CI
fails if the two drift). Both share the non-I/O half (:mod:`tsnet2.client._base`,
:mod:`tsnet2.client._http`) and the sans-IO protocol core (:mod:`tsnet2.proto`).
Everything public is re-exported by the top-level :mod:`tsnet2` package.
"""

from tsnet2.client._async.local import AsyncIPNBusWatcher, AsyncLocalClient
from tsnet2.client._async.packet import AsyncPacketConn, AsyncPacketListener
from tsnet2.client._async.server import AsyncListener, AsyncServer, AsyncSocketListener
from tsnet2.client._backend_async import AsyncConn
from tsnet2.client._backend_sync import TailnetSocket
from tsnet2.client._base import FallbackTCPHandler, Status, TailnetAddr
from tsnet2.client._sync.local import IPNBusWatcher, LocalClient
from tsnet2.client._sync.packet import PacketConn, PacketListener
from tsnet2.client._sync.server import Listener, Server, SocketListener
from tsnet2.client.errors import (
    AddressError,
    AddressInUseError,
    AuthKeyError,
    ClosedError,
    DaemonError,
    DaemonUnavailableError,
    DatagramTooLargeError,
    DeadlineExceededError,
    DialError,
    Error,
    HostnameConflictError,
    LimitError,
    LocalAPIError,
    NoCertificateError,
    NodeDownError,
    NoSuchPeerError,
    NotSupportedError,
    PeerOfflineError,
    PermissionDeniedError,
    ProtocolError,
    TLSError,
)
from tsnet2.client.identity import (
    CallerIdentity,
    identity_from_asgi_scope,
    identity_from_headers,
    identity_from_wsgi_environ,
)
from tsnet2.proto.tls import TLSInfo

__all__ = [
    "AddressError",
    "AddressInUseError",
    "AsyncConn",
    "AsyncIPNBusWatcher",
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
    "FallbackTCPHandler",
    "HostnameConflictError",
    "IPNBusWatcher",
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
    "TailnetAddr",
    "TailnetSocket",
    "identity_from_asgi_scope",
    "identity_from_headers",
    "identity_from_wsgi_environ",
]
