"""Control-channel method names and their typed params/results (seed-spec §2.2).

Each params/result type is a frozen dataclass with ``to_json() -> dict`` (keys in the
prototype's Go struct order, ready for :func:`~tsnet2.proto.go_json`) and
``from_json(dict)`` (tolerates missing keys, which take Go's zero value, and ignores
unknown keys so additive extensions never break an old peer; wrong types raise
:class:`~tsnet2.proto.RemoteProtocolError`). Lists are tuples on the Python side;
``None`` stands for Go's nil slice and travels as JSON ``null``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Self

from tsnet2.proto._decode import get_bool, get_str, get_str_list

__all__ = [
    "CertDomainsResult",
    "Method",
    "RegisterListenerParams",
    "RegisterListenerResult",
    "StartParams",
    "TailscaleIPsResult",
    "UnregisterListenerParams",
    "UpResult",
]


class Method(enum.StrEnum):
    """Control method names, exactly as on the wire."""

    START = "start"
    UP = "up"
    CLOSE = "close"
    TAILSCALE_IPS = "tailscale_ips"
    CERT_DOMAINS = "cert_domains"
    REGISTER_LISTENER = "register_listener"
    UNREGISTER_LISTENER = "unregister_listener"
    REGISTER_FALLBACK_TCP = "register_fallback_tcp"
    """Name defined by the prototype; its daemon answers "unknown method"."""
    UNREGISTER_FALLBACK_TCP = "unregister_fallback_tcp"
    """Name defined by the prototype; its daemon answers "unknown method"."""


def _list(value: tuple[str, ...] | None) -> list[str] | None:
    return None if value is None else list(value)


@dataclass(frozen=True, slots=True)
class StartParams:
    """``start`` params: every key is always sent (Go struct without omitempty)."""

    hostname: str = ""
    control_url: str = ""
    auth_key: str = field(default="", repr=False)  # a secret: never in logs or reprs
    ephemeral: bool = False
    advertise_tags: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The params document."""
        return {
            "hostname": self.hostname,
            "control_url": self.control_url,
            "auth_key": self.auth_key,
            "ephemeral": self.ephemeral,
            "advertise_tags": _list(self.advertise_tags),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """Decode a params document."""
        w = "start params"
        return cls(
            hostname=get_str(doc, "hostname", w),
            control_url=get_str(doc, "control_url", w),
            auth_key=get_str(doc, "auth_key", w),
            ephemeral=get_bool(doc, "ephemeral", w),
            advertise_tags=get_str_list(doc, "advertise_tags", w),
        )


@dataclass(frozen=True, slots=True)
class UpResult:
    """``up`` result: IPs (IPv4 first), the node's host name, and cert domains."""

    tailscale_ips: tuple[str, ...] | None = None
    node_name: str = ""
    cert_domains: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The result document."""
        return {
            "tailscale_ips": _list(self.tailscale_ips),
            "node_name": self.node_name,
            "cert_domains": _list(self.cert_domains),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """Decode a result document."""
        w = "up result"
        return cls(
            tailscale_ips=get_str_list(doc, "tailscale_ips", w),
            node_name=get_str(doc, "node_name", w),
            cert_domains=get_str_list(doc, "cert_domains", w),
        )


@dataclass(frozen=True, slots=True)
class TailscaleIPsResult:
    """``tailscale_ips`` result: ``{"v4"?, "v6"?}``, keys omitted when unknown."""

    v4: str | None = None
    v6: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The result document."""
        doc: dict[str, Any] = {}
        if self.v4:
            doc["v4"] = self.v4
        if self.v6:
            doc["v6"] = self.v6
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """Decode a result document."""
        w = "tailscale_ips result"
        return cls(v4=get_str(doc, "v4", w) or None, v6=get_str(doc, "v6", w) or None)


@dataclass(frozen=True, slots=True)
class CertDomainsResult:
    """``cert_domains`` result: ``{"domains": [..] | null}``."""

    domains: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The result document."""
        return {"domains": _list(self.domains)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """Decode a result document."""
        return cls(domains=get_str_list(doc, "domains", "cert_domains result"))


@dataclass(frozen=True, slots=True)
class RegisterListenerParams:
    """``register_listener`` params: ``{"network": "tcp", "addr": ":8080"}``."""

    network: str
    addr: str

    def to_json(self) -> dict[str, Any]:
        """The params document."""
        return {"network": self.network, "addr": self.addr}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """Decode a params document."""
        w = "register_listener params"
        return cls(network=get_str(doc, "network", w), addr=get_str(doc, "addr", w))


@dataclass(frozen=True, slots=True)
class RegisterListenerResult:
    """``register_listener`` result: the new listener id and the bound address."""

    listener_id: str
    addr: str

    def to_json(self) -> dict[str, Any]:
        """The result document."""
        return {"listener_id": self.listener_id, "addr": self.addr}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """Decode a result document."""
        w = "register_listener result"
        return cls(listener_id=get_str(doc, "listener_id", w), addr=get_str(doc, "addr", w))


@dataclass(frozen=True, slots=True)
class UnregisterListenerParams:
    """``unregister_listener`` params: ``{"listener_id": ".."}`` (result ``{}``)."""

    listener_id: str

    def to_json(self) -> dict[str, Any]:
        """The params document."""
        return {"listener_id": self.listener_id}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """Decode a params document."""
        return cls(listener_id=get_str(doc, "listener_id", "unregister_listener params"))
