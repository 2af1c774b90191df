"""UDP framing on a dial or packet channel (sans-IO), after the dial reply / accept header.

A Unix stream socket has no datagram boundaries, so each datagram travels as one frame,
in both directions::

    u16 frame_len | u8 kind | u8 addr_len | addr (ASCII "ip:port") | payload

big-endian; ``frame_len`` counts the bytes after the u16 (so a frame is at most 65537
bytes on the wire). ``kind`` :data:`KIND_DATAGRAM` (0) carries one datagram;
:data:`KIND_NOTICE` (1) is an error notice from the daemon whose payload is JSON
``{"err": "...", "code": "..."}`` (for example ``datagram_too_large`` after the daemon
dropped an oversized frame). ``addr_len`` is 0 on a dialled (connected) channel; on a
listener's packet channel every frame names the peer: the sender of an inbound datagram,
the destination of an outbound one.

:class:`FrameDecoder` is incremental and bounded: feed it whatever the socket returned and
it yields :class:`Datagram`, :class:`Notice` and :class:`Oversized` events. A frame whose
payload exceeds the decoder's ``max_payload`` is not buffered: its payload is skipped as it
arrives and one :class:`Oversized` event reports it (the daemon answers it with a notice).
A malformed frame is a :class:`~tsnet2.proto.errors.RemoteProtocolError`, and the decoder
stays failed (sticky): the caller must close the channel.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from dataclasses import dataclass

from tsnet2.proto.addr import ListenAddr, parse_listen_addr, split_host_port
from tsnet2.proto.codes import ErrorCode, parse_code
from tsnet2.proto.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "KIND_DATAGRAM",
    "KIND_NOTICE",
    "MAX_ADDR",
    "MAX_FRAME",
    "MAX_NOTICE",
    "UDP_NETWORKS",
    "Datagram",
    "FrameDecoder",
    "Notice",
    "Oversized",
    "encode_datagram",
    "encode_notice",
    "parse_udp_listen_addr",
]

KIND_DATAGRAM = 0
"""A frame carrying one datagram."""
KIND_NOTICE = 1
"""A frame carrying an error notice from the daemon (JSON payload)."""
MAX_FRAME = 0xFFFF
"""The largest ``frame_len`` (the u16's maximum)."""
MAX_ADDR = 0xFF
"""The longest address field (the u8's maximum); real ones are at most 47 bytes."""
UDP_NETWORKS = ("udp", "udp4", "udp6")
"""Networks of UDP dials and listeners."""
MAX_NOTICE = 4096
"""The largest notice payload the daemon sends (and a decoder accepts)."""

_HEAD = struct.Struct("!HBB")


@dataclass(frozen=True, slots=True)
class Datagram:
    """One datagram: ``payload`` and the peer ``addr`` (``""`` on a dialled channel)."""

    payload: bytes
    addr: str = ""


@dataclass(frozen=True, slots=True)
class Notice:
    """An error notice from the daemon: ``err`` (for a human), ``code`` (an ErrorCode or
    None), and ``addr`` (the peer of the datagram it is about, ``""`` if none)."""

    err: str
    code: ErrorCode | None = None
    addr: str = ""


@dataclass(frozen=True, slots=True)
class Oversized:
    """A datagram frame whose payload (``size`` bytes) exceeded the decoder's limit: it
    was skipped, not delivered. ``addr`` as for :class:`Datagram`."""

    size: int
    addr: str = ""


Event = Datagram | Notice | Oversized


def _addr_bytes(addr: str) -> bytes:
    try:
        raw = addr.encode("ascii")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"UDP frame address {addr!r:.80} is not ASCII") from None
    if len(raw) > MAX_ADDR:
        raise LocalProtocolError(f"UDP frame address of {len(raw)} bytes exceeds {MAX_ADDR}")
    return raw


def _frame(kind: int, addr: str, payload: bytes | bytearray | memoryview) -> bytes:
    a = _addr_bytes(addr)
    n = 2 + len(a) + len(payload)
    if n > MAX_FRAME:
        raise LocalProtocolError(
            f"UDP frame of {n} bytes exceeds {MAX_FRAME}; a datagram payload is at most "
            f"{MAX_FRAME - 2 - len(a)} bytes here")
    return _HEAD.pack(n, kind, len(a)) + a + bytes(payload)


def encode_datagram(payload: bytes | bytearray | memoryview, addr: str = "") -> bytes:
    """One datagram frame (``addr`` ``""`` on a dialled channel)."""
    return _frame(KIND_DATAGRAM, addr, payload)


def encode_notice(err: str, code: ErrorCode | None = None, addr: str = "") -> bytes:
    """One notice frame (daemon to app): JSON ``{"err":..,"code":..}``."""
    if not err:
        raise LocalProtocolError("a UDP notice needs an error message")
    doc = {"err": err[:1024]}
    if code is not None:
        doc["code"] = str(code)
    return _frame(KIND_NOTICE, addr, json.dumps(doc, separators=(",", ":")).encode())


def _check_addr(raw: bytes) -> str:
    try:
        text = raw.decode("ascii")
        host, _port = split_host_port(text)
        ipaddress.ip_address(host)
    except (UnicodeDecodeError, ValueError):
        raise RemoteProtocolError(
            f"UDP frame address {bytes(raw)!r:.80} is not an ASCII ip:port") from None
    return text


class FrameDecoder:
    """Incremental decoder of UDP frames (see the module docstring).

    ``max_payload``: the largest datagram payload delivered; larger ones are skipped and
    reported as :class:`Oversized`. ``notices``: whether kind-1 frames are allowed (True
    for the app side; the daemon refuses notices from an app). ``addressed``: True on a
    listener's packet channel (every datagram frame must carry an address), False on a
    dialled channel (none may).

    Bound: besides what one :meth:`feed` is given, it holds at most one partial frame's
    header, address and (up to ``max_payload``) payload.
    """

    __slots__ = ("_addr", "_addressed", "_buf", "_failed", "_max", "_notices", "_skip",
                 "_skip_size")

    def __init__(self, max_payload: int = MAX_FRAME, *, notices: bool = True,
                 addressed: bool = False) -> None:
        """Create a decoder; ``max_payload`` must be 0-65535."""
        if not 0 <= max_payload <= MAX_FRAME:
            raise LocalProtocolError(f"max_payload must be 0-{MAX_FRAME}, got {max_payload}")
        self._max = max_payload
        self._notices = notices
        self._addressed = addressed
        self._buf = bytearray()
        self._failed: RemoteProtocolError | None = None
        self._skip = 0  # payload bytes of an oversized frame still to discard
        self._skip_size = 0
        self._addr = ""

    @property
    def max_payload(self) -> int:
        """The largest payload delivered."""
        return self._max

    @property
    def buffered(self) -> int:
        """Bytes of a partial frame held."""
        return len(self._buf)

    def _fail(self, msg: str) -> RemoteProtocolError:
        self._failed = RemoteProtocolError(msg)
        self._buf.clear()
        return self._failed

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Decode what ``data`` completes; return the events in order.

        Raises :class:`RemoteProtocolError` on a malformed frame (and on every later call).
        """
        if self._failed is not None:
            raise self._failed
        view = memoryview(data).cast("B")
        events: list[Event] = []
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
            if not self._skip:
                events.append(Oversized(self._skip_size, self._addr))
        if view:
            self._buf += view
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 4:
                frame_len, kind, addr_len = _HEAD.unpack_from(buf, pos)
                if frame_len < 2 + addr_len:
                    raise self._fail(f"UDP frame of {frame_len} bytes cannot hold its "
                                     f"{addr_len}-byte address")
                if kind == KIND_NOTICE:
                    if not self._notices:
                        raise self._fail("UDP notice frame from an app (only the daemon "
                                         "sends notices)")
                    if frame_len - 2 - addr_len > MAX_NOTICE:
                        raise self._fail(f"UDP notice of {frame_len} bytes exceeds "
                                         f"{MAX_NOTICE}")
                elif kind != KIND_DATAGRAM:
                    raise self._fail(f"unknown UDP frame kind {kind}")
                if kind == KIND_DATAGRAM and bool(addr_len) != self._addressed:
                    raise self._fail(
                        "UDP datagram frame without a peer address on a listener's packet "
                        "channel" if self._addressed else
                        "UDP datagram frame with an address on a dialled channel")
                if len(buf) - pos < 4 + addr_len:
                    break
                addr = _check_addr(bytes(buf[pos + 4:pos + 4 + addr_len])) if addr_len else ""
                size = frame_len - 2 - addr_len
                end = pos + 2 + frame_len
                if kind == KIND_DATAGRAM and size > self._max:
                    have = len(buf) - (pos + 4 + addr_len)
                    if have >= size:
                        events.append(Oversized(size, addr))
                        pos = end
                        continue
                    self._skip = size - have
                    self._skip_size = size
                    self._addr = addr
                    pos = len(buf)
                    break
                if len(buf) < end:
                    break
                payload = bytes(buf[pos + 4 + addr_len:end])
                pos = end
                if kind == KIND_DATAGRAM:
                    events.append(Datagram(payload, addr))
                else:
                    events.append(_notice(payload, addr))
        except RemoteProtocolError as exc:
            if self._failed is None:
                self._failed = exc
            self._buf.clear()
            raise self._failed from None
        del buf[:pos]
        return events


def _notice(payload: bytes, addr: str) -> Notice:
    try:
        doc = json.loads(payload)
    except ValueError:
        raise RemoteProtocolError("UDP notice payload is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("err"), str):
        raise RemoteProtocolError('UDP notice payload is not {"err": "...", ...}')
    code = doc.get("code")
    return Notice(doc["err"], parse_code(code) if isinstance(code, str) else None, addr)


def parse_udp_listen_addr(network: str, addr: str) -> ListenAddr:
    """Validate a UDP listen request: network ``udp``/``udp4``/``udp6`` and an IP-or-empty
    host (the rules of :func:`~tsnet2.proto.addr.parse_listen_addr` for TCP). Raises
    :class:`WireAddressError`."""
    return parse_listen_addr(network, addr, networks=UDP_NETWORKS)
