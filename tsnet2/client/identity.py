"""Who is calling: the caller's tailnet identity from the headers tsnet2d adds.

A tailnet port served in ``http`` mode (``Server.listen_socket(..., identity="http")`` or
``tsnet2d --serve PORT=http:TARGET``) reaches the app with the caller's identity in request
headers the daemon writes (``Tailscale-User-Login``, ``Tailscale-User-Name``,
``Tsnet2-Node-Name``, ``Tsnet2-Node-Id``, ``Tsnet2-Node-Tags``, ``X-Forwarded-For``). These
helpers read them from an ASGI scope or a WSGI environ. Pure functions, no I/O.

They trust the headers only because the daemon removes every header of these names the
caller sent, so whatever arrives was written by the daemon from the WireGuard peer's
identity. That holds for requests that came through the daemon: if the same app also
listens somewhere else (a pod port, a plain TCP socket), a client there can send these
headers itself. Serve the app only on the daemon's socket, or check where a request came
from before trusting them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from tsnet2.proto.httpident import (
    HEADER_NODE_ID,
    HEADER_NODE_NAME,
    HEADER_NODE_TAGS,
    HEADER_USER_LOGIN,
    HEADER_USER_NAME,
    decode_header_value,
)

__all__ = [
    "CallerIdentity",
    "identity_from_asgi_scope",
    "identity_from_headers",
    "identity_from_wsgi_environ",
]


@dataclasses.dataclass(frozen=True)
class CallerIdentity:
    """The caller of a request, as the daemon named it.

    Attributes:
        peer_ip: the caller's tailnet IP address (``X-Forwarded-For``).
        user_login: the user's login name (``alice@example.com``); "" for tagged nodes.
        user_name: the user's display name; "" when unknown.
        node_name: the caller's node FQDN (``laptop.tail-scale.ts.net``); "" when unknown.
        node_id: the caller's stable node id; "" when unknown.
        tags: the caller node's ACL tags (tagged nodes have no user).
    """

    peer_ip: str
    user_login: str = ""
    user_name: str = ""
    node_name: str = ""
    node_id: str = ""
    tags: tuple[str, ...] = ()


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def identity_from_headers(
    headers: Iterable[tuple[str | bytes, str | bytes]],
) -> CallerIdentity | None:
    """The identity in request headers (name, value pairs, any case); None when the
    request carries no ``X-Forwarded-For`` (it did not come through the daemon)."""
    got: dict[str, str] = {}
    for name, value in headers:
        key = _text(name).lower()
        if key not in got:  # the daemon writes each once; take the first
            got[key] = _text(value).strip()
    peer = got.get("x-forwarded-for", "")
    if not peer:
        return None

    def get(header: str) -> str:
        return decode_header_value(got.get(header.lower(), ""))

    tags = get(HEADER_NODE_TAGS)
    return CallerIdentity(
        peer_ip=peer.split(",")[0].strip(),
        user_login=get(HEADER_USER_LOGIN),
        user_name=get(HEADER_USER_NAME),
        node_name=get(HEADER_NODE_NAME),
        node_id=get(HEADER_NODE_ID),
        tags=tuple(t for t in tags.split(",") if t),
    )


def identity_from_asgi_scope(scope: Mapping[str, Any]) -> CallerIdentity | None:
    """The caller's identity from an ASGI ``http`` or ``websocket`` scope (uvicorn,
    hypercorn, Starlette's ``request.scope``); None without the daemon's headers."""
    return identity_from_headers(scope.get("headers") or ())


def identity_from_wsgi_environ(environ: Mapping[str, Any]) -> CallerIdentity | None:
    """The caller's identity from a WSGI environ (gunicorn, Flask's ``request.environ``):
    the ``HTTP_*`` keys of the daemon's headers; None without them."""
    pairs = [(key[5:].replace("_", "-"), str(value)) for key, value in environ.items()
             if isinstance(key, str) and key.startswith("HTTP_")]
    return identity_from_headers(pairs)
