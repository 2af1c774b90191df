"""Typed exceptions raised by the tsnet2 client library.

Every exception the library raises on purpose derives from :class:`Error`, and
most also derive from the built-in exception a caller would naturally catch::

    Error                                    base of every tsnet2 error
    ├── NotSupportedError (NotImplementedError)
    │                                        not configured (no socket path) or not implemented
    ├── ClosedError                          the Server or Listener was closed
    ├── DaemonUnavailableError (ConnectionError)
    │   │                                    cannot connect to tsnet2d, or it went away
    │   ├── PermissionDeniedError (PermissionError)
    │   │                                    tsnet2d refuses this process's uid (SO_PEERCRED)
    │   └── NodeDownError                    the node went away or is not running
    ├── DialError (ConnectionError)          the daemon could not reach the dial target
    │   ├── NoSuchPeerError                  no tailnet node has that name or address
    │   ├── PeerOfflineError                 the node exists but is offline
    │   └── TLSError                         the TLS handshake with the peer failed, or its
    │                                        certificate did not verify (dial_tls)
    ├── DaemonError                          the daemon answered an RPC with an error
    │   ├── AddressInUseError (OSError)      a listener's port is taken (errno EADDRINUSE)
    │   ├── AuthKeyError                     the control server refused the auth key
    │   ├── HostnameConflictError            the daemon's node has another hostname
    │   ├── LimitError                       a per-client or per-daemon bound was reached
    │   └── NoCertificateError               the node has no TLS certificate (listen_tls)
    ├── LocalAPIError                        a LocalAPI request got a non-2xx status
    ├── ProtocolError                        the daemon broke the wire protocol
    ├── AddressError (ValueError)            a bad network or address argument
    ├── DatagramTooLargeError (OSError)      a UDP datagram over the tunnel's limit (EMSGSIZE)
    └── DeadlineExceededError (TimeoutError) an operation's timeout expired

Messages start with the operation, like Go's tsnet: ``"tsnet2.dial: no route to host"``,
and carry the daemon's reason. Which one a daemon error becomes is decided by the error code
the daemon sends with it (see ``tsnet2.proto.ErrorCode``), never by parsing its text.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "AddressError",
    "AddressInUseError",
    "AuthKeyError",
    "ClosedError",
    "DaemonError",
    "DaemonUnavailableError",
    "DatagramTooLargeError",
    "DeadlineExceededError",
    "DialError",
    "Error",
    "HostnameConflictError",
    "LimitError",
    "LocalAPIError",
    "NoCertificateError",
    "NoSuchPeerError",
    "NodeDownError",
    "NotSupportedError",
    "PeerOfflineError",
    "PermissionDeniedError",
    "ProtocolError",
    "TLSError",
]


class Error(Exception):
    """Base class of every error raised by tsnet2."""


class NotSupportedError(Error, NotImplementedError):
    """The operation is not implemented, or the Server is not configured for it.

    A Server without a socket path (neither ``socket_path=`` nor ``$TSNET2_SOCKET``)
    raises this from every method that needs the daemon, like Go tsnet2's
    ``ErrNotImplemented``; ``except NotImplementedError`` catches it.
    """


class ClosedError(Error):
    """The Server or Listener has been closed (Go: ``net.ErrClosed``)."""


class DaemonUnavailableError(Error, ConnectionError):
    """The daemon socket cannot be reached, or the daemon closed the connection."""


class PermissionDeniedError(DaemonUnavailableError, PermissionError):
    """tsnet2d refused this process's uid (its SO_PEERCRED check); the message says which
    uid and how to let it in (run as the daemon's uid, or ``tsnet2d --allow-uid``)."""


class NodeDownError(DaemonUnavailableError):
    """The daemon's node went away (its device died, or its last client stopped it) or is
    not running yet. Listeners are registered again by themselves once it is back (the next
    ``accept()`` waits for that); other calls can be retried after ``up()``."""


class DialError(Error, ConnectionError):
    """The daemon replied ``{"ok": false}`` to a dial; the message is the daemon's reason."""


class NoSuchPeerError(DialError):
    """No tailnet node has the name or address that was dialed."""


class PeerOfflineError(DialError):
    """The dialed node is known but offline (not connected to the control server)."""


class TLSError(DialError):
    """The daemon's TLS handshake with the dialed peer failed, or the peer's certificate did
    not verify against the tailnet CA for the expected name (``dial_tls``). The message says
    which; the daemon's traffic log has a ``reject`` record with reason ``tls_failed``."""


class DaemonError(Error):
    """The daemon answered a control RPC with an error.

    Attributes:
        method: the RPC method name (for example ``"register_listener"``).
        daemon_message: the daemon's error text, verbatim.
    """

    def __init__(self, message: str, *, method: str, daemon_message: str) -> None:
        super().__init__(message)
        self.method = method
        self.daemon_message = daemon_message


class AddressInUseError(DaemonError, OSError):
    """A listener's fixed port is already in use on the node; ``errno`` is EADDRINUSE.

    The daemon never replaces a fixed port with another one: pick another port, or 0.
    """

    def __init__(self, message: str, *, method: str, daemon_message: str) -> None:
        super().__init__(message, method=method, daemon_message=daemon_message)
        self.errno = _errno.EADDRINUSE
        self.strerror = message

    def __str__(self) -> str:
        return str(self.args[0])  # "tsnet2.listen: ...", like every tsnet2 error (no "[Errno 98]")


class AuthKeyError(DaemonError):
    """The control server refused the node's auth key (or token, or saved credential)."""


class HostnameConflictError(DaemonError):
    """The daemon already runs a node with another hostname (one tsnet2d, one node)."""


class LimitError(DaemonError):
    """A bound was reached: listeners per client, clients per daemon, calls in flight."""


class NoCertificateError(DaemonError):
    """The node has no TLS certificate for ``listen_tls`` (yet): the control server issues
    none, or issuing it failed. The message says why; ``tsnet2 cert`` shows the state."""


class LocalAPIError(Error):
    """A LocalAPI request returned a non-2xx HTTP status.

    Attributes:
        status: the HTTP status code (for example 404 or 503).
        body: the response body, decoded as UTF-8 (invalid bytes replaced).
    """

    def __init__(self, message: str, *, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class ProtocolError(Error):
    """The daemon sent something that violates the tsnet2 wire protocol."""


class AddressError(Error, ValueError):
    """A network or address argument is malformed or unsupported."""


class DatagramTooLargeError(Error, OSError):
    """A UDP datagram is larger than the tunnel carries without fragmenting
    (``max_datagram`` of the connection); it was not sent. ``errno`` is EMSGSIZE."""

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.errno = _errno.EMSGSIZE
        self.strerror = message
        self.limit = limit

    def __str__(self) -> str:
        return str(self.args[0])


class DeadlineExceededError(Error, TimeoutError):
    """An operation did not finish within its timeout."""
