"""The app-side client library: a thin shim over the tsnet2d Unix socket.

:class:`Server` (blocking) and :class:`AsyncServer` (asyncio) share one non-I/O
base (:mod:`tsnet2.client._base`) and the sans-IO protocol core
(:mod:`tsnet2.proto`); the faces only move bytes. Everything public is
re-exported by the top-level :mod:`tsnet2` package.
"""

from tsnet2.client._base import FallbackTCPHandler, Status, TailnetAddr
from tsnet2.client._sockets import TailnetSocket
from tsnet2.client.aio import AsyncConn, AsyncListener, AsyncServer
from tsnet2.client.aio_local import AsyncIPNBusWatcher, AsyncLocalClient
from tsnet2.client.errors import (
    AddressError,
    AddressInUseError,
    AuthKeyError,
    ClosedError,
    DaemonError,
    DaemonUnavailableError,
    DeadlineExceededError,
    DialError,
    Error,
    HostnameConflictError,
    LimitError,
    LocalAPIError,
    NodeDownError,
    NoSuchPeerError,
    NotSupportedError,
    PeerOfflineError,
    PermissionDeniedError,
    ProtocolError,
)
from tsnet2.client.local import IPNBusWatcher, LocalClient
from tsnet2.client.sync import Listener, Server

__all__ = [
    "AddressError",
    "AddressInUseError",
    "AsyncConn",
    "AsyncIPNBusWatcher",
    "AsyncListener",
    "AsyncLocalClient",
    "AsyncServer",
    "AuthKeyError",
    "ClosedError",
    "DaemonError",
    "DaemonUnavailableError",
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
    "NoSuchPeerError",
    "NodeDownError",
    "NotSupportedError",
    "PeerOfflineError",
    "PermissionDeniedError",
    "ProtocolError",
    "Server",
    "Status",
    "TailnetAddr",
    "TailnetSocket",
]
