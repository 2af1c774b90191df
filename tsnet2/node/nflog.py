"""A minimal NFLOG (``nfnetlink_log``) subscriber: the TCP SYNs the audit guard refused.

The guard (``tsnet2.node.guard``, option ``log_group``) sends a copy of the headers of every
refused inbound SYN to an nftables ``log group N`` before rejecting it with a TCP reset. This
module receives those copies on a raw ``socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)``:

- ``parse_messages(data)`` (sans-IO) turns one netlink datagram into ``RefusedSyn`` records;
- ``NflogReader(group)`` binds the group and reads without blocking, for an event loop::

      reader = NflogReader(group)                     # in the node's network namespace
      loop.add_reader(reader.fileno(), lambda: handle(reader.read_ready()))
      ...
      loop.remove_reader(reader.fileno()); reader.close()

An NFLOG group lives in a network namespace, and a netlink socket talks to the namespace of
the thread that created it: construct the reader inside the node's namespace (tsnet2d runs
there; tests use ``lab.in_netns(...)``). One socket per group per namespace: binding a group
someone else holds fails (``NflogError``). Closing the socket frees the group (the kernel
destroys a closed socket's instances). Needs ``CAP_NET_ADMIN`` in the namespace.

Wire format (Linux UAPI; ``include/uapi/linux/netlink.h``, ``.../netfilter/nfnetlink.h``,
``.../netfilter/nfnetlink_log.h``; behaviour from ``net/netfilter/nfnetlink_log.c``):

- ``struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }`` (host order), each
  message padded to 4 bytes; ``NLMSG_NOOP`` 1, ``NLMSG_ERROR`` 2 (``int error`` then the
  request's header), ``NLMSG_DONE`` 3 (ends a batch of several packets).
- nfnetlink type = ``NFNL_SUBSYS_ULOG (4) << 8 | msg``: ``NFULNL_MSG_PACKET`` 0 (kernel to
  us), ``NFULNL_MSG_CONFIG`` 1 (us to kernel). Then ``struct nfgenmsg { u8 nfgen_family;
  u8 version (NFNETLINK_V0 = 0); be16 res_id (the group) }``, then ``struct nlattr { u16
  nla_len; u16 nla_type; }`` attributes, 4-aligned; the type's top two bits are flags
  (``NLA_F_NESTED`` 0x8000, ``NLA_F_NET_BYTEORDER`` 0x4000).
- packet attributes: ``NFULA_PACKET_HDR`` 1 (``struct nfulnl_msg_packet_hdr { be16
  hw_protocol; u8 hook; u8 _pad; }``), ``NFULA_PAYLOAD`` 9 (from the network header, up to
  the copy range), ``NFULA_PREFIX`` 10 (NUL-terminated).
- config attributes: ``NFULA_CFG_CMD`` 1 (``struct nfulnl_msg_config_cmd { u8 command; }``,
  ``NFULNL_CFG_CMD_BIND`` 1), ``NFULA_CFG_MODE`` 2 (packed ``{ be32 copy_range; u8
  copy_mode; u8 _pad; }``, ``NFULNL_COPY_PACKET`` 2), ``NFULA_CFG_QTHRESH`` 5 (be32).

The kernel batches by default (100 packets or 1 s); the reader sets the queue threshold to 1
so each refused SYN arrives at once (the guard's rate limit bounds how many). The legacy
``NFULNL_CFG_CMD_PF_BIND``/``PF_UNBIND`` commands are not sent: they choose the namespace's
*default* logger for a family, while nftables' ``log group`` names the nfnetlink_log logger
itself. A group already bound by another socket answers ``EPERM``; by this one, ``EBUSY``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from types import TracebackType

from .errors import NodeError

__all__ = [
    "DEFAULT_COPY_RANGE",
    "NflogError",
    "NflogReader",
    "RefusedSyn",
    "parse_messages",
]

# -- constants (see the module docstring for where they come from) ---------------------------

NETLINK_NETFILTER = 12
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NFNL_SUBSYS_ULOG = 4
NFNETLINK_V0 = 0
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_PACKET_HDR, NFULA_PAYLOAD, NFULA_PREFIX = 1, 9, 10
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH = 1, 2, 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
NLA_TYPE_MASK = 0x3FFF

DEFAULT_COPY_RANGE = 128
"""Bytes of each packet copied: IPv4 (60) or IPv6 (40 + extension headers) plus TCP's ports."""
RECV_SIZE = 1 << 16
"""The most one ``recv`` reads: one netlink datagram (larger ones are counted as malformed)."""
MAX_DATAGRAMS = 1024
"""Datagrams one ``read_ready()`` call takes at most; the fd stays readable if more wait."""

_NLMSG = struct.Struct("=IHHII")  # nlmsghdr, host byte order
_NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, res_id (big-endian)
_NLA = struct.Struct("=HH")  # nlattr, host byte order
_TCP_SYN, _TCP_ACK = 0x02, 0x10
_V6_EXT_SIMPLE = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8
_V6_FRAGMENT, _V6_AH = 44, 51
_MAX_V6_EXT = 8
_IPPROTO_TCP = 6


class NflogError(NodeError):
    """Bad NFLOG input or a failed NFLOG socket operation.

    ``parse_messages`` raises it for a datagram whose netlink framing is broken (a length that
    overruns the data, an attribute shorter than its header) or for a kernel error message;
    ``NflogReader`` for a socket that cannot be opened or bound (``errno`` is then set).
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True)
class RefusedSyn:
    """One inbound TCP SYN the guard refused: who tried to reach which local port."""

    src: IPv4Address | IPv6Address
    sport: int
    dst: IPv4Address | IPv6Address
    dport: int
    prefix: str


# -- parsing (pure) ------------------------------------------------------------------------------


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """nlattr TLVs in ``data[start:end]`` by type (flags masked off; the last one wins)."""
    attrs: dict[int, bytes] = {}
    pos = start
    while end - pos >= _NLA.size:
        length, kind = _NLA.unpack_from(data, pos)
        if length < _NLA.size or pos + length > end:
            raise NflogError(f"malformed netlink attribute at offset {pos}: length {length}")
        attrs[kind & NLA_TYPE_MASK] = data[pos + _NLA.size : pos + length]
        pos += _align(length)
    return attrs


def _tcp_syn(segment: bytes, offset: int) -> tuple[int, int] | None:
    """(sport, dport) of a SYN without ACK at ``segment[offset:]``, else None."""
    if len(segment) < offset + 14:
        return None
    sport, dport = struct.unpack_from("!HH", segment, offset)
    flags = segment[offset + 13]
    if not flags & _TCP_SYN or flags & _TCP_ACK:
        return None
    return sport, dport


def _parse_ipv4(pkt: bytes, prefix: str) -> RefusedSyn | None:
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    frag_offset = struct.unpack_from("!H", pkt, 6)[0] & 0x1FFF
    if ihl < 20 or pkt[9] != _IPPROTO_TCP or frag_offset:
        return None
    ports = _tcp_syn(pkt, ihl)
    if ports is None:
        return None
    return RefusedSyn(IPv4Address(pkt[12:16]), ports[0], IPv4Address(pkt[16:20]), ports[1],
                      prefix)  # fmt: skip


def _parse_ipv6(pkt: bytes, prefix: str) -> RefusedSyn | None:
    if len(pkt) < 40 or pkt[0] >> 4 != 6:
        return None
    nxt, pos = pkt[6], 40
    for _ in range(_MAX_V6_EXT):
        if nxt == _IPPROTO_TCP:
            break
        if len(pkt) < pos + 8:
            return None
        if nxt in _V6_EXT_SIMPLE:
            nxt, pos = pkt[pos], pos + (pkt[pos + 1] + 1) * 8
        elif nxt == _V6_FRAGMENT:
            if struct.unpack_from("!H", pkt, pos + 2)[0] >> 3:  # not the first fragment
                return None
            nxt, pos = pkt[pos], pos + 8
        elif nxt == _V6_AH:
            nxt, pos = pkt[pos], pos + (pkt[pos + 1] + 2) * 4
        else:  # ESP, no next header, or another upper layer: nothing for us
            return None
    if nxt != _IPPROTO_TCP:
        return None
    ports = _tcp_syn(pkt, pos)
    if ports is None:
        return None
    return RefusedSyn(IPv6Address(pkt[8:24]), ports[0], IPv6Address(pkt[24:40]), ports[1],
                      prefix)  # fmt: skip


def _parse_packet(family: int, attrs: dict[int, bytes]) -> RefusedSyn | None:
    payload = attrs.get(NFULA_PAYLOAD)
    if not payload:
        return None
    hdr = attrs.get(NFULA_PACKET_HDR, b"")
    hw_protocol = struct.unpack_from("!H", hdr)[0] if len(hdr) >= 2 else 0
    v4 = hw_protocol == ETH_P_IP or (hw_protocol != ETH_P_IPV6 and family == NFPROTO_IPV4)
    v6 = hw_protocol == ETH_P_IPV6 or (hw_protocol != ETH_P_IP and family == NFPROTO_IPV6)
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    if v4:
        return _parse_ipv4(payload, prefix)
    if v6:
        return _parse_ipv6(payload, prefix)
    return None


def parse_messages(data: bytes) -> list[RefusedSyn]:
    """The refused SYNs in one netlink datagram from an NFLOG socket (pure; never blocks).

    Packet messages whose payload is not a TCP SYN (without ACK) over IPv4 or IPv6 that can
    be parsed (a truncated header, a later fragment, an unknown IPv6 extension header) are
    skipped, as are other message types, ``NLMSG_DONE`` and acks. Raises ``NflogError``
    (and nothing else) for a broken netlink framing or a kernel error message.
    """
    out: list[RefusedSyn] = []
    pos, end = 0, len(data)
    while end - pos >= _NLMSG.size:
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, pos)
        if length < _NLMSG.size or pos + length > end:
            raise NflogError(
                f"malformed netlink message at offset {pos}: length {length}, "
                f"{end - pos} bytes left"
            )
        if kind == NLMSG_ERROR:
            if length < _NLMSG.size + 4:
                raise NflogError(f"truncated netlink error message at offset {pos}")
            code = struct.unpack_from("=i", data, pos + _NLMSG.size)[0]
            if code != 0:
                raise NflogError(f"the kernel reported {_strerror(-code)}", -code)
        elif kind == (NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET):
            body = pos + _NLMSG.size
            if length < _NLMSG.size + _NFGEN.size:
                raise NflogError(f"NFLOG packet message at offset {pos} has no nfgenmsg")
            family = data[body]
            syn = _parse_packet(family, _attributes(data, body + _NFGEN.size, pos + length))
            if syn is not None:
                out.append(syn)
        pos += _align(length)
    return out


def _strerror(code: int) -> str:
    try:
        name = errno.errorcode.get(code, str(code))
        return f"{name} ({os.strerror(code)})"
    except ValueError:
        return f"error {code}"


# -- building requests ---------------------------------------------------------------------------


def _attr(kind: int, value: bytes) -> bytes:
    raw = _NLA.pack(_NLA.size + len(value), kind) + value
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def config_message(group: int, copy_range: int, seq: int) -> bytes:
    """The NFULNL_MSG_CONFIG request that binds ``group``, copies packets, flushes each one."""
    attrs = (
        _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
        + _attr(NFULA_CFG_MODE, struct.pack("!IBB", copy_range, NFULNL_COPY_PACKET, 0))
        + _attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1))
    )
    body = _NFGEN.pack(socket.AF_UNSPEC, NFNETLINK_V0, group) + attrs
    kind = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


# -- the socket ----------------------------------------------------------------------------------


def _check_group(group: object) -> int:
    if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group <= 0xFFFF:
        raise NflogError(f"NFLOG group {group!r} is not an int in 0-65535")
    return group


class NflogReader:
    """A bound NFLOG group in the calling thread's network namespace; non-blocking reads.

    ``group``: the nftables ``log group``; ``copy_range``: bytes copied of each packet.
    Raises ``NflogError`` if the socket cannot be opened or the group bound (no
    CAP_NET_ADMIN, group held by another socket, no nfnetlink_log in the kernel).
    ``overruns`` counts the times the kernel dropped messages because the socket buffer was
    full (``ENOBUFS``); ``malformed`` counts datagrams that could not be parsed or came from
    a sender other than the kernel. Not thread-safe; a context manager (closes on exit).
    """

    def __init__(self, group: int, *, copy_range: int = DEFAULT_COPY_RANGE,
                 timeout: float = 5.0) -> None:  # fmt: skip
        """Open the socket, bind ``group`` and wait (up to ``timeout`` s) for the kernel's ack."""
        self.group = _check_group(group)
        if (
            isinstance(copy_range, bool)
            or not isinstance(copy_range, int)
            or not (40 <= copy_range <= 0xFFFF - 4)
        ):
            raise NflogError(f"copy range {copy_range!r} must be an int in 40-65531")
        self.overruns = 0
        self.malformed = 0
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_NETFILTER)  # fmt: skip
        except OSError as exc:
            raise NflogError(f"cannot open a NETLINK_NETFILTER socket: {exc}", exc.errno) from exc
        try:
            sock.bind((0, 0))
            self._bind_group(sock, copy_range, timeout)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock

    def _bind_group(self, sock: socket.socket, copy_range: int, timeout: float) -> None:
        seq = 1
        sock.settimeout(timeout)
        try:
            sock.send(config_message(self.group, copy_range, seq))
            while True:
                data, (pid, _groups) = sock.recvfrom(RECV_SIZE)
                if pid != 0 or len(data) < _NLMSG.size + 4:
                    continue
                _len, kind, _flags, got_seq, _pid = _NLMSG.unpack_from(data)
                if kind != NLMSG_ERROR or got_seq != seq:
                    continue
                code = -struct.unpack_from("=i", data, _NLMSG.size)[0]
                if code:
                    raise NflogError(self._bind_hint(code), code)
                return
        except TimeoutError:
            raise NflogError(f"no answer from the kernel binding NFLOG group {self.group} "
                             f"within {timeout} s") from None  # fmt: skip
        except OSError as exc:
            raise NflogError(self._bind_hint(exc.errno or 0), exc.errno) from exc

    def _bind_hint(self, code: int) -> str:
        what = f"cannot bind NFLOG group {self.group}: {_strerror(code)}"
        if code == errno.EPERM:
            return (what + "; another process in this network namespace holds the group "
                    "(pick another group), or this one lacks CAP_NET_ADMIN")  # fmt: skip
        if code == errno.EBUSY:
            return what + "; this socket already holds the group"
        if code in (errno.ENOENT, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT):
            return what + "; the kernel lacks nfnetlink_log (modprobe nfnetlink_log)"
        return what

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._sock is None

    def fileno(self) -> int:
        """The socket's fd, for ``loop.add_reader`` or ``select``; -1 once closed."""
        return -1 if self._sock is None else self._sock.fileno()

    def read_ready(self, max_datagrams: int = MAX_DATAGRAMS) -> list[RefusedSyn]:
        """Every refused SYN waiting now (up to ``max_datagrams`` datagrams); never blocks.

        Returns [] when nothing is waiting. A datagram that does not parse is skipped and
        counted in ``malformed``; a full socket buffer is counted in ``overruns``. Raises
        ``NflogError`` if the reader is closed or the socket fails otherwise.
        """
        if self._sock is None:
            raise NflogError(f"the NFLOG reader for group {self.group} is closed")
        out: list[RefusedSyn] = []
        for _ in range(max_datagrams):
            try:
                data, _anc, flags, addr = self._sock.recvmsg(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise NflogError(f"reading NFLOG group {self.group} failed: {exc}",
                                 exc.errno) from exc  # fmt: skip
            if flags & socket.MSG_TRUNC or addr[0] != 0:  # too long, or not from the kernel
                self.malformed += 1
                continue
            try:
                out.extend(parse_messages(data))
            except NflogError:
                self.malformed += 1
        return out

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` s until something is readable (for tests and tools)."""
        if self._sock is None:
            return False
        ready, _, _ = select.select([self._sock], [], [], timeout)
        return bool(ready)

    def close(self) -> None:
        """Close the socket; the kernel unbinds the group. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> NflogReader:
        """Return self."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close."""
        self.close()
