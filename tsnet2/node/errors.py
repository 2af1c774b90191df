"""Typed errors of the WireGuard node.

``NodeError`` is the root; every message names what went wrong and what to do about it.
"""

from __future__ import annotations

__all__ = ["KeyFileError", "NodeError", "UAPIError"]


class NodeError(Exception):
    """The WireGuard node could not do what was asked; the message says why and what to do."""


class KeyFileError(NodeError):
    """The private key file is unsafe (permissions) or unreadable (garbage content)."""


class UAPIError(NodeError):
    """wireguard-go answered a UAPI request with a non-zero errno, or spoke garbage.

    ``errno`` is the positive errno value (wireguard-go sends it negated, e.g. ``-22``);
    it is ``None`` when the failure was not an errno from the device (protocol error,
    timeout, oversized reply).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
