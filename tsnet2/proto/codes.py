"""Error codes: one short word per failure a client can act on (an additive wire field).

The prototype's errors are free text (``{"id":1,"error":"daemon: ..."}``, ``{"ok":false,
"err":"..."}``). tsnet2d adds a ``"code"`` key next to the text, so a client can raise a
typed exception without parsing messages; clients that do not know the key (the
prototype's Go shim) ignore it and keep the text. The set is closed: a client treats a code
it does not know as :data:`ErrorCode.OTHER`.

The same key on a line the daemon writes *before closing* a channel it refuses (a control
frame with id 0, a dial reply, an accept header slot) says why it refuses: see
docs/protocol.md.
"""

from __future__ import annotations

import enum

__all__ = ["ErrorCode", "parse_code"]


class ErrorCode(enum.StrEnum):
    """Why the daemon refused a call, a channel or a flow."""

    OTHER = "other"
    """No more specific code; the message says it all."""
    BAD_REQUEST = "bad_request"
    """Malformed frame or parameters (a bug in the client)."""
    PERMISSION_DENIED = "permission_denied"
    """The peer's uid is not allowed (SO_PEERCRED); the daemon closes the channel."""
    NOT_STARTED = "not_started"
    """The node was never started on this daemon: call ``start()``/``up()`` first."""
    NODE_DOWN = "node_down"
    """The node was running and went away (or is restarting); retry after ``up()``."""
    HOSTNAME_CONFLICT = "hostname_conflict"
    """The daemon already runs a node with another hostname."""
    AUTH_FAILED = "auth_failed"
    """The control server refused the auth key (or token, or node credential)."""
    CONTROL_UNAVAILABLE = "control_unavailable"
    """The control server cannot be reached or answered with an error."""
    ADDRESS_IN_USE = "address_in_use"
    """A listener's fixed port is taken on the node's address (EADDRINUSE)."""
    LIMIT = "limit"
    """A per-client or per-daemon bound was reached (listeners, clients, in-flight calls)."""
    NO_SUCH_PEER = "no_such_peer"
    """The dial target is no tailnet node."""
    PEER_OFFLINE = "peer_offline"
    """The dial target is a known node that is offline."""
    DIAL_FAILED = "dial_failed"
    """The peer refused or did not answer the connection."""
    LOG_UNAVAILABLE = "log_unavailable"
    """The traffic log cannot be written and new flows are refused (fail-closed)."""
    SHUTDOWN = "shutdown"
    """The daemon is shutting down."""
    TLS_FAILED = "tls_failed"
    """The daemon's TLS handshake with the peer failed, or the peer's certificate did not
    verify against the tailnet CA for the expected name (``dial`` with ``tls``)."""
    NO_CERTIFICATE = "no_certificate"
    """The node has no TLS certificate (yet): the control server issues none, or issuing it
    failed; the message says why."""
    DATAGRAM_TOO_LARGE = "datagram_too_large"
    """A UDP datagram is larger than the tunnel carries without fragmenting; it was not
    sent (split it, or send less)."""


def parse_code(value: object) -> ErrorCode | None:
    """The code a peer sent: None when absent, :data:`ErrorCode.OTHER` when unknown."""
    if value is None or value == "":
        return None
    try:
        return ErrorCode(value) if isinstance(value, str) else ErrorCode.OTHER
    except ValueError:
        return ErrorCode.OTHER
