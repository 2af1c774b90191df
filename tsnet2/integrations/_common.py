"""What the HTTP integrations share: target addresses and connect-error messages.

Pure functions, no third-party imports: each integration maps the result to its own
library's exception types.
"""

from __future__ import annotations

from tsnet2.client.errors import (
    DaemonUnavailableError,
    DeadlineExceededError,
    DialError,
    Error,
    NodeDownError,
    NoSuchPeerError,
    PeerOfflineError,
)

__all__ = ["DEFAULT_PORTS", "connect_error_message", "dial_target", "missing_extra"]

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
"""The port of a URL that names none, by scheme."""


def dial_target(host: str | bytes, port: int | None, scheme: str = "http") -> str:
    """The ``dial`` address for a URL's host and port: ``"web:8080"``, ``"[fd7a::1]:80"``.

    ``host`` may be a tailnet name, an FQDN or an IP literal (IPv6 with or without
    brackets); a missing port is the scheme's default. A bad host or port raises
    ValueError.
    """
    if isinstance(host, bytes):
        host = host.decode("ascii")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("the URL has no host")
    if port is None:
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"no port in the URL and no default port for {scheme!r}")
        port = DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_error_message(exc: Error, target: str) -> str:
    """The message of an HTTP library's connect error for a failed tsnet2 dial.

    Says what failed, the daemon's reason and what to do about it.
    """
    if isinstance(exc, NoSuchPeerError):
        hint = ("check the name: use a tailnet node's name, FQDN or tailnet IP "
                "(`tsnet2 status` lists them)")
    elif isinstance(exc, PeerOfflineError):
        hint = "the node is known but offline: start it, or retry once it is back"
    elif isinstance(exc, DeadlineExceededError):
        hint = "raise the connect timeout, or check that the peer is up (`tsnet2 ping`)"
    elif isinstance(exc, NodeDownError):
        hint = "this node is not running: check tsnet2d (`tsnet2 status`)"
    elif isinstance(exc, DaemonUnavailableError):
        hint = "check that tsnet2d is running and the Server's socket_path points at it"
    elif isinstance(exc, DialError):
        hint = "check that something listens on that port of the peer (`tsnet2 ping`)"
    else:
        hint = "see the tsnet2 error above"
    return f"cannot connect to {target} on the tailnet: {exc}; {hint}"


def missing_extra(module: str, extra: str, exc: ImportError) -> ImportError:
    """The error to raise when an integration's library is not installed: a
    ModuleNotFoundError (an ImportError) naming the missing module, like Python's own."""
    return ModuleNotFoundError(
        f"{module} needs the {extra!r} extra ({exc}): pip install 'tsnet2[{extra}]'",
        name=exc.name,
    )
