"""Typed errors of the sans-IO protocol core.

Every failure caused by bytes received from a peer is a :class:`RemoteProtocolError`;
every misuse of this API by our own code is a :class:`LocalProtocolError`. Both derive
from :class:`WireError`, so I/O layers can catch one type and close the connection.

The names say their layer: these are wire (protocol-core) errors; the app library's public
errors (``tsnet2.ProtocolError``, ``tsnet2.AddressError``, ...) are its own classes.
"""

from __future__ import annotations

__all__ = [
    "ChannelRefused",
    "FrameError",
    "LineTooLong",
    "LocalProtocolError",
    "RemoteProtocolError",
    "WireAddressError",
    "WireError",
]


class WireError(Exception):
    """Base class of every error raised by :mod:`tsnet2.proto`."""


class LocalProtocolError(WireError):
    """We used the API wrongly (for example, encoding a value the peer would reject)."""


class RemoteProtocolError(WireError):
    """The peer broke the protocol: bad JSON, wrong types, unknown channel byte, EOF mid-line."""


class FrameError(RemoteProtocolError):
    """A control frame the daemon cannot decode; ``id`` is its id when one could be read.

    The daemon answers it with an error reply for that id (a ``bad_request``), so a client
    that sent malformed params gets an answer instead of waiting forever.
    """

    def __init__(self, message: str, id_: int = 0) -> None:
        super().__init__(message)
        self.id = id_


class ChannelRefused(RemoteProtocolError):
    """The daemon said why it closes this channel (an id-0 error frame, a refusal line).

    ``code`` is a :class:`tsnet2.proto.codes.ErrorCode` value (a string), ``""`` if none.
    """

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class LineTooLong(RemoteProtocolError):
    """The peer sent a line longer than the limit for this channel."""


class WireAddressError(LocalProtocolError, ValueError):
    """A network or address string cannot be used (bad network, host, or port).

    It is a :class:`ValueError` too, so callers validating user input can catch either.
    """
