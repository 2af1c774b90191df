"""A small rtnetlink (``NETLINK_ROUTE``) client: exactly what the node needs, no pyroute2.

pyroute2's package ``__init__`` loads its NDB, IPDB and more: about 13 MB of the daemon's
idle RSS for a dozen requests. This module speaks the protocol directly on
``socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)``:

- ``Rtnl``: one socket, one request at a time. Link index by name, link up/MTU, link add
  (``kind``) and delete, dumps of links, addresses and routes, address add/delete, route
  replace. Every request asks for an ACK; a kernel error becomes ``RtnlError`` (an
  ``OSError`` with the errno, the request and the kernel's extended-ACK message).
- pure helpers (no socket) that build requests (``build_*``, ``nlmsg``) and parse replies
  (``parse_messages``, ``parse_link``, ``parse_address``, ``parse_route``), tested against
  bytes captured from pyroute2/iproute2 and the kernel.

**Namespaces.** A netlink socket belongs to the network namespace of the thread that created
it, for its whole life, whichever thread uses it later (``tsnet2.node.netns``). ``Rtnl()``
opens its socket in the constructor: construct it inside ``enter_netns(...)``.

The requests are byte for byte those pyroute2 0.9 sent for the same calls (the unit tests
hold the captures), so routes get ``proto static``, addresses carry ``IFA_ADDRESS`` (and
``IFA_LOCAL`` for IPv4), and address flags such as ``IFA_F_NODAD`` travel in ``IFA_FLAGS``.

Bounds: a reply datagram is read into at most ``RECV_SIZE`` bytes (a truncated one is an
error, never silently cut), one exchange takes at most ``MAX_MESSAGES`` messages, and each
read waits at most ``timeout`` seconds. Messages that are not the kernel's answer to the
current request (another sender, another port id or sequence number, e.g. a late reply to a
request that timed out) are dropped and counted against the same bound.

Wire format (Linux UAPI ``include/uapi/linux/netlink.h``, ``rtnetlink.h``, ``if_link.h``,
``if_addr.h``): ``struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }``;
``struct nlattr { u16 len; u16 type; }`` followed by the value, each padded to 4 bytes;
``struct ifinfomsg { u8 family; u8 pad; u16 type; s32 index; u32 flags; u32 change; }``,
``struct ifaddrmsg { u8 family; u8 prefixlen; u8 flags; u8 scope; u32 index; }``,
``struct rtmsg { u8 family, dst_len, src_len, tos, table, protocol, scope, type; u32
flags; }``. ``NLMSG_ERROR`` carries ``s32 error`` (0 is the ACK), the request's header (the
socket sets ``NETLINK_CAP_ACK``) and, with ``NLM_F_ACK_TLVS``, attributes of which
``NLMSGERR_ATTR_MSG`` is the kernel's text.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import TracebackType
from typing import NamedTuple

__all__ = [
    "IFA_F_NODAD",
    "IFF_LOOPBACK",
    "IFF_UP",
    "MAX_MESSAGES",
    "RECV_SIZE",
    "RT_SCOPE_LINK",
    "RT_TABLE_MAIN",
    "Address",
    "Link",
    "NlMsg",
    "Route",
    "Rtnl",
    "RtnlError",
    "build_addr_add",
    "build_addr_del",
    "build_addr_dump",
    "build_link_add",
    "build_link_del",
    "build_link_dump",
    "build_link_get",
    "build_link_set",
    "build_route_dump",
    "build_route_replace",
    "nlmsg",
    "parse_address",
    "parse_attrs",
    "parse_error",
    "parse_link",
    "parse_messages",
    "parse_route",
]

# -- constants (see the module docstring for where they come from) ---------------------------

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK = 10, 11

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # in an NLMSG_ERROR's flags
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26

IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 3, 4, 18
IFLA_INFO_KIND = 1
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_FLAGS = 1, 2, 3, 8
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 7, 15

IFF_UP, IFF_LOOPBACK = 0x1, 0x8
IFA_F_NODAD = 0x02
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1
NLA_TYPE_MASK = 0x3FFF  # the top two bits are NLA_F_NESTED / NLA_F_NET_BYTEORDER

RECV_SIZE = 1 << 16
"""Bytes one read takes: the kernel's dump datagrams are at most 32 KiB."""
MAX_MESSAGES = 1 << 20
"""Messages one request may be answered with (a dump of a million routes is refused)."""
DEFAULT_TIMEOUT = 10.0
"""Seconds one read waits for the kernel."""

_NLMSG = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_ERR = struct.Struct("=i")
_U32 = struct.Struct("=I")

_MSG_NAMES = {
    RTM_NEWLINK: "RTM_NEWLINK", RTM_DELLINK: "RTM_DELLINK", RTM_GETLINK: "RTM_GETLINK",
    RTM_NEWADDR: "RTM_NEWADDR", RTM_DELADDR: "RTM_DELADDR", RTM_GETADDR: "RTM_GETADDR",
    RTM_NEWROUTE: "RTM_NEWROUTE", RTM_GETROUTE: "RTM_GETROUTE",
}

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class RtnlError(OSError):
    """A failed rtnetlink request, or a reply that breaks the protocol.

    ``errno`` is the kernel's errno (``EBADMSG`` for a malformed reply, ``ETIMEDOUT`` when
    the kernel did not answer in time); ``request`` names what was asked ("RTM_NEWROUTE
    100.64.0.0/10 oif 5"); ``kernel_message`` is the kernel's extended-ACK text, if any.
    ``str()`` gives all three: ``[Errno 95] RTM_NEWLINK t2wg (kind wireguard): Operation
    not supported (kernel: Unknown device type)``.
    """

    def __init__(self, code: int, request: str, kernel_message: str | None = None,
                 detail: str | None = None) -> None:
        text = f"{request}: {detail or os.strerror(code)}"
        if kernel_message:
            text += f" (kernel: {kernel_message})"
        super().__init__(code, text)
        self.request = request
        self.kernel_message = kernel_message


# -- the pure part: framing ------------------------------------------------------------------


class NlMsg(NamedTuple):
    """One netlink message: header fields and the payload after the 16-byte header."""

    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


def _align(n: int) -> int:
    return (n + 3) & ~3


def nlmsg(msg_type: int, flags: int, body: bytes, seq: int, pid: int = 0) -> bytes:
    """One netlink message: header (length, type, flags, seq, port id) and ``body``."""
    return _NLMSG.pack(_NLMSG.size + len(body), msg_type, flags, seq, pid) + body


def _attr(attr_type: int, value: bytes) -> bytes:
    length = _NLA.size + len(value)
    return _NLA.pack(length, attr_type) + value + b"\0" * (_align(length) - length)


def _ip_bytes(ip: IPAddress) -> bytes:
    return ip.packed


def _family(ip: IPAddress | IPNetwork) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


def parse_messages(data: bytes) -> list[NlMsg]:
    """Split one netlink datagram into messages (``RtnlError`` EBADMSG if malformed)."""
    out: list[NlMsg] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _NLMSG.size:
            raise RtnlError(errno.EBADMSG, "netlink reply",
                            detail=f"{len(data) - offset} trailing bytes are not a message")
        length, msg_type, flags, seq, pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size or offset + length > len(data):
            raise RtnlError(errno.EBADMSG, "netlink reply",
                            detail=f"message length {length} at offset {offset} overruns "
                                   f"the {len(data)}-byte datagram")
        out.append(NlMsg(msg_type, flags, seq, pid, data[offset + _NLMSG.size:offset + length]))
        offset += _align(length)
    return out


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes by type (flag bits masked off; a repeated type keeps the last value)."""
    out: dict[int, bytes] = {}
    offset = 0
    while len(data) - offset >= _NLA.size:
        length, attr_type = _NLA.unpack_from(data, offset)
        if length < _NLA.size or offset + length > len(data):
            raise RtnlError(errno.EBADMSG, "netlink reply",
                            detail=f"attribute length {length} at offset {offset} overruns "
                                   f"its {len(data)}-byte message")
        out[attr_type & NLA_TYPE_MASK] = data[offset + _NLA.size:offset + length]
        offset += _align(length)
    return out


def _fixed(payload: bytes, fmt: struct.Struct, what: str) -> tuple[int, ...]:
    if len(payload) < fmt.size:
        raise RtnlError(errno.EBADMSG, "netlink reply",
                        detail=f"{what} of {len(payload)} bytes, expected {fmt.size}")
    return fmt.unpack_from(payload)


def _u32(attrs: dict[int, bytes], key: int) -> int | None:
    value = attrs.get(key)
    if value is None:
        return None
    if len(value) != 4:
        raise RtnlError(errno.EBADMSG, "netlink reply",
                        detail=f"attribute {key} of {len(value)} bytes, expected 4")
    return int(_U32.unpack(value)[0])


def _ip(attrs: dict[int, bytes], key: int, family: int) -> IPAddress | None:
    value = attrs.get(key)
    if value is None:
        return None
    if family == socket.AF_INET and len(value) == 4:
        return IPv4Address(value)
    if family == socket.AF_INET6 and len(value) == 16:
        return IPv6Address(value)
    raise RtnlError(errno.EBADMSG, "netlink reply",
                    detail=f"attribute {key}: {len(value)} bytes is no address of family {family}")


def _string(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_error(payload: bytes, flags: int, *, done: bool = False) -> tuple[int, str | None]:
    """An ``NLMSG_ERROR`` payload (``NLMSG_DONE`` with ``done``): the positive errno (0 for
    an ACK or a clean end of dump) and the kernel's extended-ACK message, if any.

    ``NLMSG_ERROR`` holds ``s32 error``, then the request's header (``NLM_F_CAPPED``) or
    the whole request, then attributes (``NLM_F_ACK_TLVS``); ``NLMSG_DONE`` holds ``s32
    error`` and then the attributes.
    """
    (code,) = _fixed(payload, _ERR, "NLMSG_ERROR" if not done else "NLMSG_DONE")
    message = None
    if flags & NLM_F_ACK_TLVS:
        offset = _ERR.size
        if not done:
            if len(payload) < _ERR.size + _NLMSG.size:
                raise RtnlError(errno.EBADMSG, "netlink reply",
                                detail="NLMSG_ERROR without the request's header")
            offset += _NLMSG.size if flags & NLM_F_CAPPED else _align(
                _NLMSG.unpack_from(payload, _ERR.size)[0])
        message = _string(parse_attrs(payload[offset:]).get(NLMSGERR_ATTR_MSG))
    return -code, message


# -- the pure part: objects ------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A network interface (``RTM_NEWLINK``): index, ``IFF_*`` flags, name, MTU."""

    index: int
    flags: int
    name: str | None
    mtu: int | None


@dataclass(frozen=True)
class Address:
    """An interface address (``RTM_NEWADDR``).

    ``address`` is ``IFA_ADDRESS`` (the peer on a point-to-point link), ``local``
    ``IFA_LOCAL``; ``ip`` the first of them that is set, as ``ip addr`` shows it.
    ``flags`` is ``IFA_FLAGS`` when present (32 bits), else the header's 8 bits.
    """

    family: int
    prefixlen: int
    flags: int
    scope: int
    index: int
    address: IPAddress | None
    local: IPAddress | None
    label: str | None

    @property
    def ip(self) -> IPAddress | None:
        """``IFA_ADDRESS`` if set, else ``IFA_LOCAL``."""
        return self.address if self.address is not None else self.local


@dataclass(frozen=True)
class Route:
    """A route (``RTM_NEWROUTE``); ``table`` is ``RTA_TABLE`` when present, else the
    header's (which says 252, "compat", for tables above 255)."""

    family: int
    dst_len: int
    table: int
    protocol: int
    scope: int
    type: int
    dst: IPAddress | None
    oif: int | None
    gateway: IPAddress | None
    prefsrc: IPAddress | None


def parse_link(payload: bytes) -> Link:
    """An ``RTM_NEWLINK`` payload."""
    _fam, _type, index, flags, _change = _fixed(payload, _IFINFO, "ifinfomsg")
    attrs = parse_attrs(payload[_IFINFO.size:])
    return Link(index, flags, _string(attrs.get(IFLA_IFNAME)), _u32(attrs, IFLA_MTU))


def parse_address(payload: bytes) -> Address:
    """An ``RTM_NEWADDR`` payload."""
    family, prefixlen, flags, scope, index = _fixed(payload, _IFADDR, "ifaddrmsg")
    attrs = parse_attrs(payload[_IFADDR.size:])
    wide = _u32(attrs, IFA_FLAGS)
    return Address(family, prefixlen, flags if wide is None else wide, scope, index,
                   _ip(attrs, IFA_ADDRESS, family), _ip(attrs, IFA_LOCAL, family),
                   _string(attrs.get(IFA_LABEL)))


def parse_route(payload: bytes) -> Route:
    """An ``RTM_NEWROUTE`` payload."""
    family, dst_len, _src, _tos, table, proto, scope, rtype, _flags = _fixed(
        payload, _RTMSG, "rtmsg")
    attrs = parse_attrs(payload[_RTMSG.size:])
    wide = _u32(attrs, RTA_TABLE)
    return Route(family, dst_len, table if wide is None else wide, proto, scope, rtype,
                 _ip(attrs, RTA_DST, family), _u32(attrs, RTA_OIF),
                 _ip(attrs, RTA_GATEWAY, family), _ip(attrs, RTA_PREFSRC, family))


# -- the pure part: requests (type, flags, body) ---------------------------------------------

Request = tuple[int, int, bytes]


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)


def build_link_get(name: str) -> Request:
    """``RTM_GETLINK`` of one link by name (``ip link show NAME``)."""
    return RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, _ifinfo() + _attr(IFLA_IFNAME, _name(name))


def build_link_dump() -> Request:
    """``RTM_GETLINK`` dump of every link."""
    return RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, _ifinfo()


def build_link_set(index: int, *, mtu: int | None = None, up: bool | None = None) -> Request:
    """``RTM_NEWLINK`` changing link ``index``: ``mtu``, and up/down (None leaves either)."""
    body = _ifinfo(index, IFF_UP if up else 0, IFF_UP if up is not None else 0)
    if mtu is not None:
        body += _attr(IFLA_MTU, _U32.pack(mtu))
    return RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body


def build_link_add(name: str, kind: str) -> Request:
    """``RTM_NEWLINK`` creating link ``name`` of ``kind`` (``ip link add NAME type KIND``)."""
    linkinfo = _attr(IFLA_INFO_KIND, _name(kind))  # NUL-terminated, as pyroute2 sends it
    body = _ifinfo() + _attr(IFLA_IFNAME, _name(name)) + _attr(IFLA_LINKINFO, linkinfo)
    return RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE, body


def build_link_del(index: int) -> Request:
    """``RTM_DELLINK`` of link ``index``."""
    return RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, _ifinfo(index)


def build_addr_dump() -> Request:
    """``RTM_GETADDR`` dump of every address of both families."""
    return RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)


def _addr_attrs(ip: IPAddress) -> bytes:
    attrs = _attr(IFA_ADDRESS, _ip_bytes(ip))
    if ip.version == 4:  # IPv4 needs IFA_LOCAL (the address itself); IPv6 takes IFA_ADDRESS
        attrs += _attr(IFA_LOCAL, _ip_bytes(ip))
    return attrs


def build_addr_add(index: int, ip: IPAddress, prefixlen: int, flags: int = 0) -> Request:
    """``RTM_NEWADDR`` adding ``ip``/``prefixlen`` to link ``index``, scope global;
    ``flags`` (``IFA_F_*``, e.g. ``IFA_F_NODAD``) go in ``IFA_FLAGS``. EEXIST if present."""
    body = _IFADDR.pack(_family(ip), prefixlen, 0, RT_SCOPE_UNIVERSE, index) + _addr_attrs(ip)
    if flags:
        body += _attr(IFA_FLAGS, _U32.pack(flags))
    return RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE, body


def build_addr_del(index: int, ip: IPAddress, prefixlen: int) -> Request:
    """``RTM_DELADDR`` removing ``ip``/``prefixlen`` from link ``index``."""
    body = _IFADDR.pack(_family(ip), prefixlen, 0, RT_SCOPE_UNIVERSE, index) + _addr_attrs(ip)
    return RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, body


def build_route_replace(dst: IPNetwork, oif: int) -> Request:
    """``RTM_NEWROUTE`` create-or-replace: ``dst`` through link ``oif``, table main,
    ``proto static``, scope universe (``ip route replace DST dev IF proto static``)."""
    header = _RTMSG.pack(_family(dst), dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC,
                         RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
    body = header + _attr(RTA_DST, dst.network_address.packed) + _attr(RTA_OIF, _U32.pack(oif))
    return RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE, body


def build_route_dump(family: int, table: int = RT_TABLE_MAIN) -> Request:
    """``RTM_GETROUTE`` dump of ``family`` (the kernel sends every table; filter the reply)."""
    header = _RTMSG.pack(family, 0, 0, 0, table if table < 256 else 252, 0, 0, 0, 0)
    return RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, header


def describe(request: Request) -> str:
    """A short human name for a request, for error messages ("RTM_NEWROUTE ...")."""
    msg_type, _flags, body = request
    name = _MSG_NAMES.get(msg_type, f"message type {msg_type}")
    try:
        if msg_type in (RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK):
            _f, _t, index, flags, change = _IFINFO.unpack_from(body)
            attrs = parse_attrs(body[_IFINFO.size:])
            parts = [_string(attrs.get(IFLA_IFNAME)) or (f"index {index}" if index else "")]
            if IFLA_LINKINFO in attrs:
                kind = _string(parse_attrs(attrs[IFLA_LINKINFO]).get(IFLA_INFO_KIND))
                parts.append(f"(kind {kind})")
            if change & IFF_UP:
                parts.append("up" if flags & IFF_UP else "down")
            if IFLA_MTU in attrs:
                parts.append(f"mtu {_u32(attrs, IFLA_MTU)}")
            return " ".join([name, *filter(None, parts)])
        if msg_type in (RTM_NEWADDR, RTM_DELADDR):
            family, plen, _fl, _sc, index = _IFADDR.unpack_from(body)
            ip = _ip(parse_attrs(body[_IFADDR.size:]), IFA_ADDRESS, family)
            return f"{name} {ip}/{plen} index {index}"
        if msg_type == RTM_NEWROUTE:
            family, dst_len = body[0], body[1]
            attrs = parse_attrs(body[_RTMSG.size:])
            return f"{name} {_ip(attrs, RTA_DST, family)}/{dst_len} oif {_u32(attrs, RTA_OIF)}"
    except (struct.error, RtnlError):
        pass
    return name


# -- the socket ------------------------------------------------------------------------------


class Rtnl:
    """An rtnetlink socket in the calling thread's network namespace; a context manager.

    Not thread-safe (one request at a time); use it from any thread, it keeps talking to
    the namespace it was opened in.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Open and bind the socket (``RtnlError`` if netlink is unavailable)."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_ROUTE)
        except OSError as exc:
            raise RtnlError(exc.errno or errno.EIO, "open NETLINK_ROUTE socket") from None
        try:
            sock.bind((0, 0))
            for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):  # kernels before 4.12 lack these
                with contextlib.suppress(OSError):
                    sock.setsockopt(SOL_NETLINK, opt, 1)
            sock.settimeout(timeout)
            self.portid: int = sock.getsockname()[0]
        except BaseException:
            sock.close()
            raise
        self.timeout = timeout
        self._sock = sock
        self._seq = 0

    def close(self) -> None:
        """Close the socket. Idempotent."""
        self._sock.close()

    def __enter__(self) -> Rtnl:
        """Return self; ``close()`` on exit."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close the socket."""
        self.close()

    # -- the exchange ----------------------------------------------------------------------

    def _recv(self, what: str) -> bytes:
        try:
            data, _anc, msg_flags, addr = self._sock.recvmsg(RECV_SIZE)
        except TimeoutError:
            raise RtnlError(errno.ETIMEDOUT, what,
                            detail=f"no reply from the kernel within {self.timeout:g} s") from None
        except OSError as exc:
            raise RtnlError(exc.errno or errno.EIO, what) from None
        if msg_flags & socket.MSG_TRUNC:
            raise RtnlError(errno.EMSGSIZE, what,
                            detail=f"a reply datagram exceeds {RECV_SIZE} bytes")
        if addr[0] != 0:  # not from the kernel: ignore
            return b""
        return bytes(data)

    def exchange(self, request: Request) -> Iterator[NlMsg]:
        """Send ``request`` and yield the kernel's data messages for it, until its ACK
        (``NLMSG_ERROR`` 0) or, for a dump, ``NLMSG_DONE``. A kernel error raises
        ``RtnlError``. Consume the iterator fully before the next request."""
        msg_type, flags, body = request
        what = describe(request)
        self._seq = self._seq % 0xFFFFFFFF + 1
        seq = self._seq
        try:
            self._sock.sendall(nlmsg(msg_type, flags, body, seq))
        except TimeoutError:
            raise RtnlError(errno.ETIMEDOUT, what, detail="send timed out") from None
        except OSError as exc:
            raise RtnlError(exc.errno or errno.EIO, what) from None
        seen = 0
        while True:
            for msg in parse_messages(self._recv(what)):
                seen += 1
                if seen > MAX_MESSAGES:
                    raise RtnlError(errno.EMSGSIZE, what,
                                    detail=f"more than {MAX_MESSAGES} reply messages")
                if msg.seq != seq or msg.pid != self.portid:
                    continue  # not an answer to this request (e.g. to one that timed out)
                if msg.type == NLMSG_ERROR:
                    code, text = parse_error(msg.payload, msg.flags)
                    if code:
                        raise RtnlError(code, what, text)
                    return
                if msg.type == NLMSG_DONE:
                    if len(msg.payload) >= _ERR.size:
                        code, text = parse_error(msg.payload, msg.flags, done=True)
                        if code:
                            raise RtnlError(code, what, text)
                    return
                if msg.type == NLMSG_OVERRUN:
                    raise RtnlError(errno.ENOBUFS, what, detail="netlink overrun")
                if msg.type == NLMSG_NOOP:
                    continue
                yield msg
                if not flags & NLM_F_ACK and not msg.flags & NLM_F_MULTI:
                    return  # a single answer, no ACK asked for

    def _do(self, request: Request) -> list[NlMsg]:
        return list(self.exchange(request))

    # -- links -----------------------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        """The index of link ``name``, or None if there is none (``ENODEV``)."""
        try:
            for msg in self._do(build_link_get(name)):
                if msg.type == RTM_NEWLINK:
                    return parse_link(msg.payload).index
        except RtnlError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return None

    def links(self) -> list[Link]:
        """Every link of the namespace."""
        return [parse_link(m.payload) for m in self.exchange(build_link_dump())
                if m.type == RTM_NEWLINK]

    def link_set(self, index: int, *, mtu: int | None = None, up: bool | None = None) -> None:
        """Set link ``index``'s MTU and/or bring it up (``up=True``) or down."""
        self._do(build_link_set(index, mtu=mtu, up=up))

    def link_add(self, name: str, kind: str) -> None:
        """Create link ``name`` of ``kind`` (EEXIST if the name is taken, EOPNOTSUPP if the
        kernel has no such kind)."""
        self._do(build_link_add(name, kind))

    def link_del(self, index: int) -> None:
        """Delete link ``index``."""
        self._do(build_link_del(index))

    # -- addresses -------------------------------------------------------------------------

    def addresses(self, index: int | None = None) -> list[Address]:
        """Addresses of both families, of link ``index`` only if given."""
        out: list[Address] = []
        for msg in self.exchange(build_addr_dump()):
            if msg.type != RTM_NEWADDR:
                continue
            addr = parse_address(msg.payload)
            if index is None or addr.index == index:
                out.append(addr)
        return out

    def addr_add(self, index: int, ip: IPAddress, prefixlen: int, flags: int = 0) -> None:
        """Add ``ip``/``prefixlen`` (``IFA_F_*`` ``flags``) to link ``index``."""
        self._do(build_addr_add(index, ip, prefixlen, flags))

    def addr_del(self, index: int, ip: IPAddress, prefixlen: int) -> None:
        """Remove ``ip``/``prefixlen`` from link ``index``."""
        self._do(build_addr_del(index, ip, prefixlen))

    # -- routes ----------------------------------------------------------------------------

    def routes(self, family: int, table: int = RT_TABLE_MAIN) -> list[Route]:
        """The routes of ``family`` (AF_INET / AF_INET6) in ``table``."""
        out: list[Route] = []
        for msg in self.exchange(build_route_dump(family, table)):
            if msg.type != RTM_NEWROUTE:
                continue
            route = parse_route(msg.payload)
            if route.table == table and route.family == family:
                out.append(route)
        return out

    def route_replace(self, dst: IPNetwork, oif: int) -> None:
        """Create or replace the route to ``dst`` through link ``oif`` (table main)."""
        self._do(build_route_replace(dst, oif))
