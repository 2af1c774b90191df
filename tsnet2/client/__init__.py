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
    ClosedError,
    DaemonError,
    DaemonUnavailableError,
    DeadlineExceededError,
    DialError,
    Error,
    LocalAPIError,
    NotSupportedError,
    ProtocolError,
)
from tsnet2.client.local import IPNBusWatcher, LocalClient
from tsnet2.client.sync import Listener, Server

__all__ = [
    "AddressError",
    "AsyncConn",
    "AsyncIPNBusWatcher",
    "AsyncListener",
    "AsyncLocalClient",
    "AsyncServer",
    "ClosedError",
    "DaemonError",
    "DaemonUnavailableError",
    "DeadlineExceededError",
    "DialError",
    "Error",
    "FallbackTCPHandler",
    "IPNBusWatcher",
    "Listener",
    "LocalAPIError",
    "LocalClient",
    "NotSupportedError",
    "ProtocolError",
    "Server",
    "Status",
    "TailnetAddr",
    "TailnetSocket",
]
