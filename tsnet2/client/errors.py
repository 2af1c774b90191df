"""Typed exceptions raised by the tsnet2 client library.

Every exception the library raises on purpose derives from :class:`Error`, and
most also derive from the built-in exception a caller would naturally catch::

    Error                                    base of every tsnet2 error
    ├── NotSupportedError (NotImplementedError)
    │                                        not configured (no socket path) or not implemented
    ├── ClosedError                          the Server or Listener was closed
    ├── DaemonUnavailableError (ConnectionError)
    │                                        cannot connect to tsnet2d, or it went away
    ├── DialError (ConnectionError)          the daemon could not reach the dial target
    ├── DaemonError                          the daemon answered an RPC with an error
    ├── LocalAPIError                        a LocalAPI request got a non-2xx status
    ├── ProtocolError                        the daemon broke the wire protocol
    ├── AddressError (ValueError)            a bad network or address argument
    └── DeadlineExceededError (TimeoutError) an operation's timeout expired

Messages start with the operation, like Go's tsnet: ``"tsnet2.dial: no route to host"``.
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "ClosedError",
    "DaemonError",
    "DaemonUnavailableError",
    "DeadlineExceededError",
    "DialError",
    "Error",
    "LocalAPIError",
    "NotSupportedError",
    "ProtocolError",
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


class DialError(Error, ConnectionError):
    """The daemon replied ``{"ok": false}`` to a dial; the message is the daemon's reason."""


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


class DeadlineExceededError(Error, TimeoutError):
    """An operation did not finish within its timeout."""
