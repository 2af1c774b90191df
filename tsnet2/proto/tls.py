"""TLS in the daemon: what a TLS flow's headers and records say about its session (pure).

tsnet2d terminates TLS for ``listen_tls`` listeners and originates it for ``dial`` requests
that carry a ``tls`` object, so the traffic log keeps the plaintext and the app never holds
a key. These two documents are additive extensions of the prototype's headers (docs/protocol.md):

- :class:`TLSDialOptions`: the ``tls`` object of a dial request,
  ``{"server_name": "web.tailnet.example", "alpn": ["h2", "http/1.1"]}`` (both optional);
- :class:`TLSInfo`: the ``tls`` object of a dial reply, an accept header and an ``open``
  record, ``{"alpn": .., "cipher": .., "peer_name": .., "sni": .., "version": ..}``, each key
  left out when empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from tsnet2.proto._decode import get_str, get_str_list
from tsnet2.proto.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["MAX_ALPN", "MAX_ALPN_PROTOCOLS", "MAX_SERVER_NAME", "TLSDialOptions", "TLSInfo",
           "check_alpn", "check_server_name"]

MAX_SERVER_NAME = 253
"""Longest server name (a DNS name) accepted."""
MAX_ALPN = 255
"""Longest ALPN protocol name (RFC 7301: one length byte)."""
MAX_ALPN_PROTOCOLS = 16
"""Most ALPN protocols one listener or dial may offer."""


def check_server_name(name: str, what: str) -> str:
    """``name`` if it is a usable DNS server name (no port, no spaces, at most 253 bytes),
    else :class:`RemoteProtocolError` naming ``what``."""
    if not name:
        return name
    if len(name) > MAX_SERVER_NAME or not name.isascii() or any(
            c.isspace() or c in ":/[]@" for c in name):
        raise RemoteProtocolError(f"{what}: bad server_name {name[:80]!r}: a DNS name of at "
                                  f"most {MAX_SERVER_NAME} characters, without a port")
    return name


def check_alpn(protocols: tuple[str, ...] | None, what: str) -> tuple[str, ...] | None:
    """``protocols`` if every name is 1-255 ASCII characters and there are at most 16."""
    if protocols is None:
        return None
    if len(protocols) > MAX_ALPN_PROTOCOLS:
        raise RemoteProtocolError(f"{what}: {len(protocols)} ALPN protocols; at most "
                                  f"{MAX_ALPN_PROTOCOLS}")
    for p in protocols:
        if not p or len(p) > MAX_ALPN or not p.isascii():
            raise RemoteProtocolError(f"{what}: bad ALPN protocol {p[:80]!r}: 1-{MAX_ALPN} "
                                      "ASCII characters")
    return protocols


@dataclass(frozen=True, slots=True)
class TLSDialOptions:
    """The ``tls`` object of a dial request: the daemon originates TLS to the peer.

    ``server_name``: the name the peer's certificate must carry (and the SNI sent); empty
    means the dialled node's FQDN from the netmap. ``alpn``: protocols to offer (None: none).
    """

    server_name: str = ""
    alpn: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The document; empty keys are left out."""
        doc: dict[str, Any] = {}
        if self.server_name:
            doc["server_name"] = self.server_name
        if self.alpn:
            doc["alpn"] = list(self.alpn)
        return doc

    @classmethod
    def from_json(cls, doc: Any, what: str = "dial request tls") -> Self:
        """Decode and check the document (a non-object is a :class:`RemoteProtocolError`)."""
        if not isinstance(doc, dict):
            raise RemoteProtocolError(f'{what}: "tls" must be an object')
        return cls(server_name=check_server_name(get_str(doc, "server_name", what), what),
                   alpn=check_alpn(get_str_list(doc, "alpn", what), what))

    def __post_init__(self) -> None:
        try:
            check_server_name(self.server_name, "TLS options")
            check_alpn(self.alpn, "TLS options")
        except RemoteProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """The TLS session of a flow, as the daemon negotiated it.

    Attributes:
        version: ``"TLSv1.3"`` or ``"TLSv1.2"`` (``ssl.SSLObject.version()``).
        cipher: the cipher suite's name (``"TLS_AES_256_GCM_SHA384"``).
        sni: the server name the client asked for (for ``listen_tls``, what the peer sent;
            for a TLS dial, what the daemon sent); empty when none.
        alpn: the negotiated application protocol (``"h2"``), empty when none.
        peer_name: for a TLS dial, the name the peer's certificate was verified for; for
            ``listen_tls``, empty (peers are identified by WhoIs, not client certificates).
    """

    version: str = ""
    cipher: str = ""
    sni: str = ""
    alpn: str = ""
    peer_name: str = ""

    def to_json(self) -> dict[str, Any]:
        """The document, keys in alphabetical order (as records have them), empty ones out."""
        doc: dict[str, Any] = {}
        for key in ("alpn", "cipher", "peer_name", "sni", "version"):
            value = getattr(self, key)
            if value:
                doc[key] = value
        return doc

    @classmethod
    def from_json(cls, doc: Any, what: str = "tls") -> Self:
        """Decode the document (a non-object is a :class:`RemoteProtocolError`)."""
        if not isinstance(doc, dict):
            raise RemoteProtocolError(f'{what}: "tls" must be an object')
        return cls(**{k: get_str(doc, k, what)
                      for k in ("version", "cipher", "sni", "alpn", "peer_name")})
