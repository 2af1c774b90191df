"""Typed errors of the sans-IO protocol core.

Every failure caused by bytes received from a peer is a :class:`RemoteProtocolError`;
every misuse of this API by our own code is a :class:`LocalProtocolError`. Both derive
from :class:`ProtocolError`, so I/O layers can catch one type and close the connection.
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "LineTooLong",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ProtocolError(Exception):
    """Base class of every error raised by :mod:`tsnet2.proto`."""


class LocalProtocolError(ProtocolError):
    """We used the API wrongly (for example, encoding a value the peer would reject)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: bad JSON, wrong types, unknown channel byte, EOF mid-line."""


class LineTooLong(RemoteProtocolError):
    """The peer sent a line longer than the limit for this channel."""


class AddressError(LocalProtocolError, ValueError):
    """A network or address string cannot be used (bad network, host, or port).

    It is a :class:`ValueError` too, so callers validating user input can catch either.
    """
