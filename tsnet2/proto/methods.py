"""Control-channel methods: one schema for both ends (seed-spec §2.2).

Each method's params and result are frozen dataclasses with ``to_json() -> dict`` (keys in
the prototype's Go struct order, ready for :func:`~tsnet2.proto.go_json`) and
``from_json(dict)`` (tolerates missing keys, which take Go's zero value, and ignores unknown
keys so additive extensions never break an old peer; wrong types raise
:class:`~tsnet2.proto.RemoteProtocolError`). Lists are tuples on the Python side; ``None``
stands for Go's nil slice and travels as JSON ``null``.

:data:`METHODS` maps every method the daemon answers to its :class:`MethodSpec` (params type,
result type, whether params are sent), and the functions below are the only way either end
turns a method's documents into objects and back:

- the app side: :func:`encode_params` (what to put in a request) and :func:`decode_result`
  (the typed result of a reply);
- the daemon side: :func:`decode_params` (the typed params of a request; an unknown method
  is an :class:`UnknownMethodError`) and :func:`encode_result` (what to put in the reply).

A params decoding error says what tsnet2d has always answered (``parameter 'hostname' must
be a string``); the daemon prefixes ``daemon: `` and sends it with code ``bad_request``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Generic, Literal, Protocol, Self, TypeVar, overload

from tsnet2.proto._decode import get_bool, get_str, get_str_list, get_uint64
from tsnet2.proto.errors import LocalProtocolError, RemoteProtocolError
from tsnet2.proto.tls import check_alpn

__all__ = [
    "CERT_DOMAINS",
    "CLOSE",
    "METHODS",
    "REGISTER_LISTENER",
    "START",
    "TAILSCALE_IPS",
    "UNREGISTER_LISTENER",
    "UP",
    "CertDomainsResult",
    "Empty",
    "Method",
    "MethodSpec",
    "RegisterListenerParams",
    "RegisterListenerResult",
    "StartParams",
    "TailscaleIPsResult",
    "UnknownMethodError",
    "UnregisterListenerParams",
    "UpResult",
    "WireDocument",
    "decode_params",
    "decode_result",
    "encode_params",
    "encode_result",
    "method_spec",
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


class WireDocument(Protocol):
    """A method's params or result: a JSON object document and back."""

    def to_json(self) -> dict[str, Any]:
        """The document (keys in Go struct order)."""
        ...

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """Decode a document; wrong types raise :class:`RemoteProtocolError`."""
        ...


# Params checks, with the messages tsnet2d has always sent for bad params.


def _param_str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RemoteProtocolError(f"parameter {key!r} must be a string")
    return value


def _param_bool(doc: dict[str, Any], key: str) -> bool:
    value = doc.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RemoteProtocolError(f"parameter {key!r} must be a boolean")
    return value


def _param_str_list(doc: dict[str, Any], key: str) -> tuple[str, ...] | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RemoteProtocolError(f"{key} must be a list of strings")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class Empty:
    """The document ``{}``: the result of ``start``, ``close`` and ``unregister_listener``,
    and the params of the methods that take none (``up``, ``close``, ``tailscale_ips``,
    ``cert_domains``: they are sent without ``params``, and any received are ignored)."""

    def to_json(self) -> dict[str, Any]:
        """The empty document."""
        return {}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """Any object decodes to ``Empty()`` (unknown keys are ignored)."""
        return cls()


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
        """Decode a params document (a bad key is reported in tsnet2d's order of checks:
        hostname, advertise_tags, control_url, auth_key, ephemeral)."""
        hostname = _param_str(doc, "hostname")
        advertise_tags = _param_str_list(doc, "advertise_tags")
        control_url = _param_str(doc, "control_url")
        auth_key = _param_str(doc, "auth_key")
        ephemeral = _param_bool(doc, "ephemeral")
        return cls(hostname, control_url, auth_key, ephemeral, advertise_tags)


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
    """``register_listener`` params: ``{"network": "tcp", "addr": ":8080"}``.

    tsnet2 extension (optional; the prototype's shim never sends it): ``forward_socket``, an
    absolute path of a Unix socket the app listens on in the daemon's socket directory, and
    ``forward_mode`` (``"tcp"``, ``"http"`` or ``"proxy"``; default ``"tcp"``): the daemon
    then connects each inbound flow to that socket itself (a serve listener) instead of
    handing it to parked accept slots. Both keys are left out of the document when unset.

    tsnet2 extension ``tls`` (``listen_tls``): the daemon terminates TLS with the node's
    certificate on this listener and hands the app plaintext; ``alpn`` lists the protocols
    it offers, in preference order (None: no ALPN). Left out when unset. ``network``
    ``"udp"``/``"udp4"``/``"udp6"`` (extension) registers a UDP listener, whose datagrams
    travel on one packet channel (an accept request on channel 0x04, :mod:`tsnet2.proto.udp`).
    """

    network: str
    addr: str
    forward_socket: str = ""
    forward_mode: str = ""
    tls: bool = False
    alpn: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The params document."""
        doc: dict[str, Any] = {"network": self.network, "addr": self.addr}
        if self.forward_socket:
            doc["forward_socket"] = self.forward_socket
            doc["forward_mode"] = self.forward_mode or "tcp"
        if self.tls:
            doc["tls"] = True
            if self.alpn:
                doc["alpn"] = list(self.alpn)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """Decode a params document."""
        return cls(network=_param_str(doc, "network"), addr=_param_str(doc, "addr"),
                   forward_socket=_param_str(doc, "forward_socket"),
                   forward_mode=_param_str(doc, "forward_mode"),
                   tls=_param_bool(doc, "tls"),
                   alpn=check_alpn(_param_str_list(doc, "alpn"), "register_listener"))


@dataclass(frozen=True, slots=True)
class RegisterListenerResult:
    """``register_listener`` result: the new listener id and the bound address; a daemon
    that forwards (the ``forward_socket`` extension) echoes ``forward_socket``, so a client
    can tell a daemon that ignored the key (an older one) and undo the registration. The
    same for ``tls`` (echoed ``true`` by a daemon that terminates TLS on the listener).
    ``max_datagram``: for a UDP listener, the largest datagram payload the tunnel carries
    unfragmented (0 for TCP)."""

    listener_id: str
    addr: str
    forward_socket: str = ""
    tls: bool = False
    max_datagram: int = 0

    def to_json(self) -> dict[str, Any]:
        """The result document."""
        doc: dict[str, Any] = {"listener_id": self.listener_id, "addr": self.addr}
        if self.forward_socket:
            doc["forward_socket"] = self.forward_socket
        if self.tls:
            doc["tls"] = True
        if self.max_datagram:
            doc["max_datagram"] = self.max_datagram
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """Decode a result document."""
        w = "register_listener result"
        return cls(listener_id=get_str(doc, "listener_id", w), addr=get_str(doc, "addr", w),
                   forward_socket=get_str(doc, "forward_socket", w),
                   tls=get_bool(doc, "tls", w),
                   max_datagram=get_uint64(doc, "max_datagram", w))


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
        return cls(listener_id=_param_str(doc, "listener_id"))


# ---- the schema -------------------------------------------------------------------------

P = TypeVar("P", bound=WireDocument)
R = TypeVar("R", bound=WireDocument)


class UnknownMethodError(RemoteProtocolError):
    """A request names a method the daemon does not answer (``register_fallback_tcp`` too:
    the prototype defines the name, and its daemon answers the same)."""

    def __init__(self, method: str) -> None:
        super().__init__(f'unknown method "{method}"')
        self.method = method


@dataclass(frozen=True, slots=True)
class MethodSpec(Generic[P, R]):
    """One method on the wire: its name, params type and result type.

    ``sends_params=False``: the method takes no params; requests carry no ``params`` key
    and the daemon ignores one it is sent (``params`` is then :class:`Empty`).
    """

    method: Method
    params: type[P]
    result: type[R]
    sends_params: bool = True

    def encode_params(self, params: P | None = None) -> dict[str, Any] | None:
        """The request's params document (None: the request carries no ``params``)."""
        if not self.sends_params:
            if params is not None and not isinstance(params, Empty):
                raise LocalProtocolError(f"{self.method} takes no params, got {params!r}")
            return None
        if not isinstance(params, self.params):
            raise LocalProtocolError(
                f"{self.method} params must be a {self.params.__name__}, got {params!r}"
            )
        return params.to_json()

    def decode_params(self, doc: dict[str, Any] | None) -> P:
        """The typed params of a request (absent params decode as ``{}``)."""
        if not self.sends_params:
            return self.params.from_json({})
        return self.params.from_json(doc or {})

    def encode_result(self, result: R) -> dict[str, Any]:
        """The reply's result document."""
        if not isinstance(result, self.result):
            raise LocalProtocolError(
                f"{self.method} result must be a {self.result.__name__}, got {result!r}"
            )
        return result.to_json()

    def decode_result(self, doc: dict[str, Any] | None) -> R:
        """The typed result of a success reply (an absent result decodes as ``{}``)."""
        return self.result.from_json(doc or {})


START: Final = MethodSpec(Method.START, StartParams, Empty)
UP: Final = MethodSpec(Method.UP, Empty, UpResult, sends_params=False)
CLOSE: Final = MethodSpec(Method.CLOSE, Empty, Empty, sends_params=False)
TAILSCALE_IPS: Final = MethodSpec(
    Method.TAILSCALE_IPS, Empty, TailscaleIPsResult, sends_params=False
)
CERT_DOMAINS: Final = MethodSpec(Method.CERT_DOMAINS, Empty, CertDomainsResult, sends_params=False)
REGISTER_LISTENER: Final = MethodSpec(
    Method.REGISTER_LISTENER, RegisterListenerParams, RegisterListenerResult
)
UNREGISTER_LISTENER: Final = MethodSpec(Method.UNREGISTER_LISTENER, UnregisterListenerParams, Empty)

METHODS: Final[Mapping[str, MethodSpec[Any, Any]]] = MappingProxyType({
    spec.method: spec
    for spec in (START, UP, CLOSE, TAILSCALE_IPS, CERT_DOMAINS, REGISTER_LISTENER,
                 UNREGISTER_LISTENER)
})
"""Every method the daemon answers, in :class:`Method` order. ``register_fallback_tcp`` and
``unregister_fallback_tcp`` are names only: they are answered ``unknown method``."""


def method_spec(method: str) -> MethodSpec[Any, Any]:
    """The spec of ``method`` (a :class:`Method` or its wire name).

    Raises :class:`UnknownMethodError` for any other name.
    """
    spec = METHODS.get(method)
    if spec is None:
        raise UnknownMethodError(method)
    return spec


# The app side: params to send, typed results of replies.

_NoParamsMethod = Literal[Method.UP, Method.CLOSE, Method.TAILSCALE_IPS, Method.CERT_DOMAINS]
_EmptyResultMethod = Literal[Method.START, Method.CLOSE, Method.UNREGISTER_LISTENER]


@overload
def encode_params(method: Literal[Method.START], params: StartParams) -> dict[str, Any]: ...
@overload
def encode_params(
    method: Literal[Method.REGISTER_LISTENER], params: RegisterListenerParams
) -> dict[str, Any]: ...
@overload
def encode_params(
    method: Literal[Method.UNREGISTER_LISTENER], params: UnregisterListenerParams
) -> dict[str, Any]: ...
@overload
def encode_params(method: _NoParamsMethod, params: None = None) -> None: ...
@overload
def encode_params(
    method: Method | str, params: WireDocument | None = None
) -> dict[str, Any] | None: ...
def encode_params(
    method: Method | str, params: WireDocument | None = None
) -> dict[str, Any] | None:
    """The params document of a ``method`` request, for ``ControlClientCore.request``.

    None for the methods that take no params (the request then has no ``params`` key). A
    params object of the wrong type is a :class:`LocalProtocolError`; an unknown method an
    :class:`UnknownMethodError`.
    """
    return method_spec(method).encode_params(params)


@overload
def decode_result(method: Literal[Method.UP], doc: dict[str, Any] | None) -> UpResult: ...
@overload
def decode_result(
    method: Literal[Method.TAILSCALE_IPS], doc: dict[str, Any] | None
) -> TailscaleIPsResult: ...
@overload
def decode_result(
    method: Literal[Method.CERT_DOMAINS], doc: dict[str, Any] | None
) -> CertDomainsResult: ...
@overload
def decode_result(
    method: Literal[Method.REGISTER_LISTENER], doc: dict[str, Any] | None
) -> RegisterListenerResult: ...
@overload
def decode_result(method: _EmptyResultMethod, doc: dict[str, Any] | None) -> Empty: ...
@overload
def decode_result(method: Method | str, doc: dict[str, Any] | None) -> WireDocument: ...
def decode_result(method: Method | str, doc: dict[str, Any] | None) -> WireDocument:
    """The typed result of a success reply to ``method`` (``Response.result``; None counts
    as ``{}``). Wrong types raise :class:`RemoteProtocolError` naming the key."""
    result: WireDocument = method_spec(method).decode_result(doc)
    return result


# The daemon side: typed params of requests, result documents of replies.


def decode_params(method: str, doc: dict[str, Any] | None) -> WireDocument:
    """The typed params of a ``method`` request (``ControlRequest.params``).

    Raises :class:`UnknownMethodError` for a method the daemon does not answer, and
    :class:`RemoteProtocolError` (``parameter 'addr' must be a string``) for bad params.
    """
    params: WireDocument = method_spec(method).decode_params(doc)
    return params


def encode_result(method: str, result: WireDocument) -> dict[str, Any]:
    """The result document of a success reply to ``method``."""
    return method_spec(method).encode_result(result)
