"""PROXY protocol version 2 (HAProxy's binary header), sans-IO: encode and decode.

The daemon writes one header before the bytes of a ``proxy``-mode serve flow (``tsnet2d
--serve PORT=proxy:TARGET``, or a library ``listen_socket(..., identity="proxy")``): the
caller's tailnet address as the source, the node's tailnet address as the destination, and
TLVs with the caller's WhoIs identity. Byte layout (haproxy doc/proxy-protocol.txt §2.2)::

    0   12 bytes  signature 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
    12  1 byte    version (high nibble, 2) | command (low nibble: 0 LOCAL, 1 PROXY)
    13  1 byte    family (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
                  | transport (low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM)
    14  2 bytes   length of what follows, big-endian
    16  addresses INET: src addr (4), dst addr (4), src port (2), dst port (2)
                  INET6: src addr (16), dst addr (16), src port (2), dst port (2)
    ..  TLVs      type (1), length (2, big-endian), value

TLV types this project writes (:data:`TLV_NAMES`): the standard ``PP2_TYPE_UNIQUE_ID``
(0x05, the traffic log's ``conn_id`` of the flow) and four of the range the spec reserves
for custom use (0xE0-0xEF), each UTF-8 text and left out when unknown:

- 0xE0 ``user_login``: the caller's user login name (``alice@example.com``);
- 0xE1 ``user_name``: the caller's user display name;
- 0xE2 ``node_name``: the caller's node FQDN (``laptop.tail-scale.ts.net``);
- 0xE3 ``node_id``: the caller's stable node id.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from collections.abc import Iterable, Mapping

from tsnet2.proto.errors import RemoteProtocolError

__all__ = [
    "MAX_HEADER",
    "SIGNATURE",
    "TLV_NAMES",
    "TLV_NODE_ID",
    "TLV_NODE_NAME",
    "TLV_UNIQUE_ID",
    "TLV_USER_LOGIN",
    "TLV_USER_NAME",
    "ProxyHeader",
    "ProxyV2Error",
    "decode_proxy_v2",
    "encode_proxy_v2",
    "identity_tlvs",
]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12-byte signature every v2 header starts with."""

TLV_UNIQUE_ID = 0x05
TLV_USER_LOGIN = 0xE0
TLV_USER_NAME = 0xE1
TLV_NODE_NAME = 0xE2
TLV_NODE_ID = 0xE3

TLV_NAMES: Mapping[int, str] = {
    TLV_UNIQUE_ID: "conn_id",
    TLV_USER_LOGIN: "user_login",
    TLV_USER_NAME: "user_name",
    TLV_NODE_NAME: "node_name",
    TLV_NODE_ID: "node_id",
}
"""The TLV types tsnet2 writes, by the name :func:`identity_tlvs` and the docs use."""

MAX_HEADER = 16 + 0xFFFF
"""The longest possible header (the length field is 16 bits)."""

_FAMILY = {4: 0x11, 6: 0x21}  # INET/INET6 | STREAM
_ADDR_LEN = {0x1: 12, 0x2: 36, 0x3: 216}


class ProxyV2Error(RemoteProtocolError):
    """Bytes that are not a valid PROXY v2 header."""


@dataclasses.dataclass(frozen=True)
class ProxyHeader:
    """A decoded header. ``src``/``dst`` are ``(ip, port)`` for TCP over IPv4/IPv6, None for
    a LOCAL command or another family; ``tlvs`` in wire order."""

    command: int  # 0 LOCAL, 1 PROXY
    family: int  # the family/transport byte, e.g. 0x11 TCP over IPv4
    src: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None
    dst: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, kind: int) -> bytes | None:
        """The first TLV of this type, or None."""
        for t, v in self.tlvs:
            if t == kind:
                return v
        return None

    def identity(self) -> dict[str, str]:
        """The tsnet2 TLVs as text, by their :data:`TLV_NAMES` name (absent ones left out;
        bytes that are not UTF-8 are replaced)."""
        out: dict[str, str] = {}
        for t, v in self.tlvs:
            name = TLV_NAMES.get(t)
            if name is not None and name not in out:
                out[name] = v.decode("utf-8", "replace")
        return out


def identity_tlvs(*, conn_id: str = "", user_login: str = "", user_name: str = "",
                  node_name: str = "", node_id: str = "") -> list[tuple[int, bytes]]:
    """The TLVs for a caller's identity; empty values are left out."""
    out: list[tuple[int, bytes]] = []
    for kind, text in ((TLV_UNIQUE_ID, conn_id), (TLV_USER_LOGIN, user_login),
                       (TLV_USER_NAME, user_name), (TLV_NODE_NAME, node_name),
                       (TLV_NODE_ID, node_id)):
        if text:
            value = text.encode()
            if kind == TLV_UNIQUE_ID:
                value = value[:128]  # the spec's bound for UNIQUE_ID
            out.append((kind, value))
    return out


def encode_proxy_v2(src: tuple[str, int], dst: tuple[str, int],
                    tlvs: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """A PROXY command header for a TCP flow from ``src`` to ``dst`` (``(ip, port)``, one
    family for both). Raises ValueError for mixed families, bad ports or oversized TLVs."""
    sip, dip = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if sip.version != dip.version:
        raise ValueError(f"PROXY v2: source {sip} and destination {dip} differ in family")
    for port in (src[1], dst[1]):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"PROXY v2: port {port} out of range")
    body = sip.packed + dip.packed + struct.pack("!HH", src[1], dst[1])
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"PROXY v2: bad TLV type {kind} or length {len(value)}")
        body += struct.pack("!BH", kind, len(value)) + value
    if len(body) > 0xFFFF:
        raise ValueError("PROXY v2: header longer than 65535 bytes")
    return SIGNATURE + bytes([0x21, _FAMILY[sip.version]]) + struct.pack("!H", len(body)) + body


def decode_proxy_v2(data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    """Decode a header at the start of ``data``: ``(header, bytes used)``, or None when
    more bytes are needed. Raises :class:`ProxyV2Error` for anything else (bad signature,
    version, command, family, lengths or TLVs)."""
    buf = bytes(data[:MAX_HEADER])
    have = min(len(buf), len(SIGNATURE))
    if buf[:have] != SIGNATURE[:have]:
        raise ProxyV2Error("not a PROXY v2 header (bad signature)")
    if len(buf) < 16:
        return None
    ver_cmd, fam = buf[12], buf[13]
    if ver_cmd >> 4 != 2:
        raise ProxyV2Error(f"PROXY v2: unsupported version {ver_cmd >> 4}")
    command = ver_cmd & 0xF
    if command not in (0, 1):
        raise ProxyV2Error(f"PROXY v2: unknown command {command}")
    (length,) = struct.unpack_from("!H", buf, 14)
    if len(buf) < 16 + length:
        return None
    body = buf[16:16 + length]
    src = dst = None
    used = 0
    af, transport = fam >> 4, fam & 0xF
    if af > 3 or transport > 2:
        raise ProxyV2Error(f"PROXY v2: unknown family/transport byte {fam:#04x}")
    if af in _ADDR_LEN:
        used = _ADDR_LEN[af]
        if length < used:
            raise ProxyV2Error(f"PROXY v2: {length} bytes cannot hold the addresses")
        if command == 1 and af in (1, 2) and transport == 1:
            n = 4 if af == 1 else 16
            s = ipaddress.ip_address(body[:n])
            d = ipaddress.ip_address(body[n:2 * n])
            sport, dport = struct.unpack_from("!HH", body, 2 * n)
            src, dst = (s, sport), (d, dport)
    elif command == 1 and af == 0 and transport != 0:
        raise ProxyV2Error("PROXY v2: UNSPEC family with a transport")
    tlvs: list[tuple[int, bytes]] = []
    pos = used
    while pos < length:
        if length - pos < 3:
            raise ProxyV2Error("PROXY v2: truncated TLV")
        kind, n = struct.unpack_from("!BH", body, pos)
        if pos + 3 + n > length:
            raise ProxyV2Error(f"PROXY v2: TLV {kind:#04x} runs past the header")
        tlvs.append((kind, body[pos + 3:pos + 3 + n]))
        pos += 3 + n
    return ProxyHeader(command, fam, src, dst, tuple(tlvs)), 16 + length
