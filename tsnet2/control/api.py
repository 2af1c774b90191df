"""Pure request validation and reply shapes of the coordination HTTP API.

See docs/architecture.md ("Coordination HTTP API") and docs/control.md.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tsnet2.control.names import sanitize_hostname, validate_tag
from tsnet2.control.store import NodeRecord
from tsnet2.control.tokens import MAX_SECRET_LEN, validate_public_key
from tsnet2.controlclient.boundedjson import BadRequest as BadRequest  # api.BadRequest: HTTP 400
from tsnet2.controlclient.boundedjson import loads_bounded
from tsnet2.traffic.chain import decode_key, encode_key

MAX_BODY = 64 * 1024
"""Largest accepted request body in bytes."""
MAX_ENDPOINTS = 64
"""Most endpoints a node may announce."""
MAX_TAGS = 32
"""Most tags a node may request."""
MAX_BEARER_TOKEN = 16 * 1024
"""Longest bearer token accepted on ``POST /v1/register`` (e.g. a ServiceAccount JWT)."""
MAX_SINCE_DIGITS = 19
"""Longest ``since`` query value: a netmap version is a signed 64-bit integer."""
MAX_TRAFFIC_LOG_KEY = 64
"""Longest ``traffic_log_key`` accepted (a base64 Ed25519 public key has 44 characters)."""


class InvalidTrafficLogKey(BadRequest):
    """``traffic_log_key`` is not the canonical base64 of a 32-byte Ed25519 key (HTTP 400)."""


@dataclass(frozen=True)
class RegisterRequest:
    """A validated ``POST /v1/register`` body."""

    auth_key: str | None
    node_credential: str | None
    public_key: str
    hostname: str
    endpoints: tuple[str, ...]
    ephemeral: bool
    tags: tuple[str, ...]
    traffic_log_key: str | None = None
    """The node's traffic-log public key (canonical base64, 32 bytes), or None."""


class AuthenticationError(Exception):
    """An :class:`Authenticator` refused a registration; ``message`` is sent to the node."""

    def __init__(self, message: str, status: int = 401) -> None:
        """Remember the message and the HTTP status (401, 403 or 409)."""
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Identity:
    """Who a bearer token proved the registering node to be (see :class:`Authenticator`)."""

    login_name: str
    """The user the node is registered to (created if needed)."""
    display_name: str
    tags: tuple[str, ...] = ()
    """Tags this identity may request; a request without tags gets all of them."""
    ephemeral: bool = False
    """Force the node to be ephemeral."""
    exact_name: bool = False
    """Refuse (409) instead of renaming to ``name-1`` when the hostname is taken."""
    subject: str = ""
    """Opaque reference for the authenticator's own use (e.g. ``namespace/pod/uid``)."""


@runtime_checkable
class Authenticator(Protocol):
    """Authenticates ``POST /v1/register`` calls that carry ``Authorization: Bearer <token>``.

    Registrations with an auth key (no bearer header) do not go through it.
    """

    async def authenticate(
        self, token: str, request: RegisterRequest, existing: NodeRecord | None
    ) -> Identity:
        """Verify ``token`` for ``request``; raise :class:`AuthenticationError` to refuse.

        ``existing`` is the node that ``request.node_credential`` belongs to (a
        re-registration), or None for a new node.
        """

    async def registered(self, identity: Identity, node: NodeRecord) -> None:
        """Called after the node was created or re-registered for ``identity``."""


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body (see :func:`loads_bounded`) or raise BadRequest."""
    value = loads_bounded(raw)
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    return value


def _optional_str(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string")
    if len(value) > MAX_SECRET_LEN:
        raise BadRequest(f"{field} is too long")
    return value


def validate_endpoint(value: object) -> str:
    """Return ``value`` if it is ``ip:port`` or ``[ipv6]:port``, else raise BadRequest."""
    if not isinstance(value, str) or len(value) > 64:
        raise BadRequest(f"endpoint {str(value)[:64]!r} must be a string 'ip:port'")
    host, sep, port = value.rpartition(":")
    ok = (
        sep == ":"
        and len(port) <= 5
        and port.isascii()
        and port.isdigit()
        and 0 < int(port) < 65536
    )
    try:
        if host.startswith("[") and host.endswith("]"):
            # No zone ("%eth0"): it means nothing to a peer, and it may hold any byte.
            ipaddress.IPv6Address(host[1:-1])
            ok = ok and "%" not in host
        else:
            ipaddress.IPv4Address(host)
    except ValueError:
        ok = False
    if not ok:
        raise BadRequest(f"endpoint {value!r} must be 'ip:port' (IPv4) or '[ipv6]:port'")
    return value


def validate_endpoints(value: object) -> tuple[str, ...]:
    """Validate a JSON list of endpoints (None means empty)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest("endpoints must be a list of 'ip:port' strings")
    if len(value) > MAX_ENDPOINTS:
        raise BadRequest(f"too many endpoints ({len(value)}); at most {MAX_ENDPOINTS}")
    return tuple(dict.fromkeys(validate_endpoint(v) for v in value))


def validate_traffic_log_key(value: object) -> str | None:
    """A register body's ``traffic_log_key``: None/absent/"" mean "no key"; otherwise it
    must be exactly the canonical standard base64 of a 32-byte Ed25519 public key (what
    ``tsnet2.traffic.signing.SigningKey.public`` is). Raises :class:`InvalidTrafficLogKey`.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidTrafficLogKey(
            "traffic_log_key must be a string: the base64 Ed25519 public key of the node's "
            "traffic log"
        )
    if len(value) > MAX_TRAFFIC_LOG_KEY:
        raise InvalidTrafficLogKey(
            f"traffic_log_key has {len(value)} characters; a base64 Ed25519 public key has 44"
        )
    try:
        raw = decode_key(value)
    except ValueError as e:
        raise InvalidTrafficLogKey(f"traffic_log_key: {e}") from None
    canonical = encode_key(raw)
    if value != canonical:
        # Same 32 bytes, other spelling (prefix, blanks, non-zero padding bits): one key,
        # one string, so a peer comparing keys compares strings.
        raise InvalidTrafficLogKey(
            f"traffic_log_key is not in canonical base64; send {canonical!r}"
        )
    return value


def parse_register(body: dict[str, Any]) -> RegisterRequest:
    """Validate a register body; unknown fields are ignored."""
    public_key = body.get("public_key")
    if not isinstance(public_key, str):
        raise BadRequest("public_key is required: a base64 WireGuard public key")
    try:
        validate_public_key(public_key)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    hostname = body.get("hostname")
    if not isinstance(hostname, str) or not hostname:
        raise BadRequest("hostname is required and must be a non-empty string")
    if len(hostname) > 255:
        raise BadRequest("hostname is longer than 255 characters")
    try:
        name = sanitize_hostname(hostname)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    ephemeral = body.get("ephemeral", False)
    if ephemeral is None:
        ephemeral = False
    if not isinstance(ephemeral, bool):
        raise BadRequest("ephemeral must be true or false")
    tags_value = body.get("tags")
    if tags_value is None:
        tags_value = []
    if not isinstance(tags_value, list) or not all(isinstance(t, str) for t in tags_value):
        raise BadRequest("tags must be a list of strings like 'tag:name'")
    if len(tags_value) > MAX_TAGS:
        raise BadRequest(f"too many tags ({len(tags_value)}); at most {MAX_TAGS}")
    try:
        tags = tuple(sorted({validate_tag(t) for t in tags_value}))
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return RegisterRequest(
        auth_key=_optional_str(body, "auth_key"),
        node_credential=_optional_str(body, "node_credential"),
        public_key=public_key,
        hostname=name,
        endpoints=validate_endpoints(body.get("endpoints")),
        ephemeral=ephemeral,
        tags=tags,
        traffic_log_key=validate_traffic_log_key(body.get("traffic_log_key")),
    )


def parse_endpoints_body(body: dict[str, Any]) -> tuple[str, ...]:
    """Validate a ``POST /v1/endpoints`` body."""
    if "endpoints" not in body:
        raise BadRequest("endpoints is required: a list of 'ip:port' strings")
    return validate_endpoints(body["endpoints"])


def parse_poll_query(
    since: str | None, timeout: str | None, max_timeout: float
) -> tuple[int, float]:
    """Validate the netmap query; ``timeout`` is capped at ``max_timeout`` (default 0)."""
    if since is None or since == "":
        since_v = 0
    elif since.startswith("-") and since[1:].isascii() and since[1:].isdigit():
        raise BadRequest("since must be >= 0")
    elif not (since.isascii() and since.isdigit()) or len(since) > MAX_SINCE_DIGITS:
        raise BadRequest(
            f"since must be an integer netmap version (at most {MAX_SINCE_DIGITS} digits)"
        )
    else:
        since_v = int(since)
    try:
        if timeout is not None and len(timeout) > 32:
            raise ValueError(timeout)
        timeout_v = float(timeout) if timeout not in (None, "") else 0.0
    except ValueError:
        raise BadRequest("timeout must be a number of seconds") from None
    if not timeout_v >= 0 or timeout_v == float("inf"):
        raise BadRequest("timeout must be a finite number of seconds >= 0")
    return since_v, min(timeout_v, max_timeout)


def rfc3339(timestamp: float) -> str:
    """Format a Unix timestamp as RFC 3339 UTC with a ``Z``, second precision."""
    moment = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def node_json(node: NodeRecord, *, domain: str, online: bool) -> dict[str, Any]:
    """The API's ``Node`` object."""
    return {
        "id": node.id,
        "stable_id": node.stable_id,
        "name": node.name,
        "fqdn": f"{node.name}.{domain}.",
        "public_key": node.public_key,
        "addresses": [node.ipv4, node.ipv6],
        "endpoints": list(node.endpoints),
        "user": {
            "id": node.user.id,
            "login_name": node.user.login_name,
            "display_name": node.user.display_name,
        },
        "tags": list(node.tags),
        "ephemeral": node.ephemeral,
        "online": online,
        "created": rfc3339(node.created),
        "last_seen": rfc3339(node.last_seen) if node.last_seen is not None else None,
        "traffic_log_key": node.traffic_log_key,
    }
