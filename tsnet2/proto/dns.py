"""DNS messages (RFC 1035), sans-IO: parse and build what the DNS responder needs.

:func:`parse_message` reads a whole message (header, questions, resource records) from
bytes; :func:`build_query` and :func:`build_response` make them. Everything is bounded by
the message itself: names at most 255 bytes in wire form, labels at most 63, compression
pointers only backwards and at most :data:`MAX_POINTERS` per name (so a pointer loop ends
in an error, never a hang), and every count is checked against the bytes that are there.
Malformed input raises :class:`DnsError` (a RemoteProtocolError), nothing else.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import struct

from tsnet2.proto.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_NAME",
    "MAX_POINTERS",
    "DnsError",
    "Message",
    "Question",
    "RCode",
    "RType",
    "Record",
    "build_query",
    "build_response",
    "encode_name",
    "parse_message",
]

MAX_NAME = 255  # bytes of a name in wire form, the final zero included
MAX_LABEL = 63
MAX_POINTERS = 32
HEADER = struct.Struct(">HHHHHH")
FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
CLASS_IN = 1


class RType(enum.IntEnum):
    """Record types the responder knows by name (others are plain ints)."""

    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28
    OPT = 41
    ANY = 255


class RCode(enum.IntEnum):
    """Response codes (RFC 1035 §4.1.1)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


class DnsError(RemoteProtocolError):
    """A malformed DNS message."""


@dataclasses.dataclass(frozen=True, slots=True)
class Question:
    """A question: ``name`` as text without the final dot (case kept), type, class."""

    name: str
    qtype: int
    qclass: int = CLASS_IN


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """A resource record; ``rdata`` raw (names inside it are not expanded)."""

    name: str
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address of an A or AAAA record (None for other types or bad lengths)."""
        if self.rtype == RType.A and len(self.rdata) == 4:
            return ipaddress.IPv4Address(self.rdata)
        if self.rtype == RType.AAAA and len(self.rdata) == 16:
            return ipaddress.IPv6Address(self.rdata)
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """A parsed message."""

    id: int
    flags: int
    questions: tuple[Question, ...]
    answers: tuple[Record, ...] = ()
    authority: tuple[Record, ...] = ()
    additional: tuple[Record, ...] = ()
    question_wire: bytes = b""
    """The question section as received, when it has no compression pointer (echoed in
    responses as is, so a name is never changed by a text round trip)."""

    @property
    def udp_size(self) -> int:
        """The UDP payload size the sender accepts: its EDNS0 OPT record's (512 to 4096),
        else 512."""
        for rec in self.additional:
            if rec.rtype == RType.OPT:
                return max(512, min(rec.rclass, 4096))
        return 512

    @property
    def is_response(self) -> bool:
        """QR set."""
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        """The opcode (0: a standard query)."""
        return (self.flags >> 11) & 0xF

    @property
    def rcode(self) -> int:
        """The response code (low 4 bits; EDNS extended codes are not combined)."""
        return self.flags & 0xF


def _read_name(data: bytes, pos: int) -> tuple[str, int, bool]:
    """The name at ``pos``, the offset after it (after the first pointer if any) and
    whether it used a compression pointer.
    Labels are ASCII text (other bytes as ``\\xNN``, a dot inside a label as ``\\.``)."""
    labels: list[str] = []
    size = 1  # the final zero
    end = -1
    hops = 0
    while True:
        if pos >= len(data):
            raise DnsError("name runs past the end of the message")
        n = data[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DnsError("compression pointer runs past the end of the message")
            target = ((n & 0x3F) << 8) | data[pos + 1]
            if end < 0:
                end = pos + 2
            hops += 1
            if hops > MAX_POINTERS:
                raise DnsError(f"more than {MAX_POINTERS} compression pointers in a name")
            if target >= pos:
                raise DnsError("compression pointer that does not point backwards")
            pos = target
            continue
        if n & 0xC0:
            raise DnsError(f"unsupported label type {n >> 6:#x}")
        if n == 0:
            return ".".join(labels), (end if end >= 0 else pos + 1), end >= 0
        if pos + 1 + n > len(data):
            raise DnsError("label runs past the end of the message")
        size += n + 1
        if size > MAX_NAME:
            raise DnsError(f"name longer than {MAX_NAME} bytes")
        raw = data[pos + 1:pos + 1 + n]
        labels.append(raw.decode("ascii", "backslashreplace").replace(".", "\\."))
        pos += 1 + n


def parse_message(data: bytes) -> Message:
    """Parse a whole message. Raises :class:`DnsError`."""
    if len(data) < HEADER.size:
        raise DnsError(f"message of {len(data)} bytes is shorter than a DNS header")
    if len(data) > 65535:
        raise DnsError("message longer than 65535 bytes")
    mid, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    # Each question takes at least 5 bytes, each record 11: counts beyond that are lies.
    if qd * 5 + (an + ns + ar) * 11 > len(data) - HEADER.size:
        raise DnsError("section counts larger than the message")
    pos = HEADER.size
    questions = []
    plain = True
    for _ in range(qd):
        name, pos, pointer = _read_name(data, pos)
        plain = plain and not pointer
        if pos + 4 > len(data):
            raise DnsError("question runs past the end of the message")
        qtype, qclass = struct.unpack_from(">HH", data, pos)
        pos += 4
        questions.append(Question(name, qtype, qclass))
    qend = pos
    sections: list[list[Record]] = [[], [], []]
    for sec, count in zip(sections, (an, ns, ar), strict=True):
        for _ in range(count):
            name, pos, _ = _read_name(data, pos)
            if pos + 10 > len(data):
                raise DnsError("record runs past the end of the message")
            rtype, rclass, ttl, rdlen = struct.unpack_from(">HHIH", data, pos)
            pos += 10
            if pos + rdlen > len(data):
                raise DnsError("record data runs past the end of the message")
            sec.append(Record(name, rtype, rclass, ttl, data[pos:pos + rdlen]))
            pos += rdlen
    qwire = data[HEADER.size:qend] if plain else b""
    return Message(mid, flags, tuple(questions), tuple(sections[0]), tuple(sections[1]),
                   tuple(sections[2]), question_wire=qwire)


def parse_header(data: bytes) -> tuple[int, int] | None:
    """``(id, flags)`` of a message at least a header long, else None."""
    if len(data) < HEADER.size:
        return None
    mid, flags = struct.unpack_from(">HH", data)
    return mid, flags


def encode_name(name: str) -> bytes:
    """A name (``a.b.c`` or ``a.b.c.``) in wire form, without compression. Raises
    LocalProtocolError for a name that cannot be one."""
    name = name.rstrip(".") if name != "." else ""
    out = bytearray()
    if name:
        for label in name.split("."):
            raw = label.encode("ascii", "strict") if label.isascii() else b""
            if not raw or len(raw) > MAX_LABEL:
                raise LocalProtocolError(f"bad DNS name {name[:300]!r}")
            out += bytes((len(raw),)) + raw
    out += b"\x00"
    if len(out) > MAX_NAME:
        raise LocalProtocolError(f"DNS name longer than {MAX_NAME} bytes")
    return bytes(out)


def build_query(name: str, qtype: int, *, id_: int, rd: bool = True) -> bytes:
    """A standard query for one question."""
    return (HEADER.pack(id_ & 0xFFFF, FLAG_RD if rd else 0, 1, 0, 0, 0) + encode_name(name)
            + struct.pack(">HH", qtype, CLASS_IN))


def _record(rec: Record) -> bytes:
    return (encode_name(rec.name) + struct.pack(">HHIH", rec.rtype, rec.rclass, rec.ttl,
                                                len(rec.rdata)) + rec.rdata)


def build_response(query: Message, rcode: int, answers: tuple[Record, ...] = (), *,
                   authoritative: bool = False, recursion: bool = True,
                   max_size: int = 65535) -> bytes:
    """A response to ``query``: same id, opcode, RD and question, ``rcode``, ``answers``.
    Answers that do not fit ``max_size`` are left out with TC set (512 for plain UDP)."""
    flags = FLAG_QR | (query.flags & (0x7800 | FLAG_RD)) | (rcode & 0xF)
    if authoritative:
        flags |= FLAG_AA
    if recursion:
        flags |= FLAG_RA
    qsec = query.question_wire or b"".join(
        encode_name(q.name) + struct.pack(">HH", q.qtype, q.qclass) for q in query.questions)
    body = qsec
    count = 0
    for rec in answers:
        raw = _record(rec)
        if HEADER.size + len(body) + len(raw) > max_size:
            flags |= FLAG_TC
            break
        body += raw
        count += 1
    return HEADER.pack(query.id, flags, len(query.questions), count, 0, 0) + body
