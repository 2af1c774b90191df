"""The NFLOG parser (``tsnet2.node.nflog.parse_messages``) on hand-built netlink datagrams.

The messages are built here from the UAPI layouts (nlmsghdr, nfgenmsg, nlattr,
nfulnl_msg_packet_hdr), independently of the module's own request builder. The real kernel
path is in tests/integration/test_guard.py.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsnet2.node import NodeError
from tsnet2.node.nflog import NflogError, NflogReader, RefusedSyn, config_message, parse_messages

PACKET_TYPE = 4 << 8 | 0  # NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET
SYN, ACK, RST = 0x02, 0x10, 0x04
B4, A4 = "100.64.0.2", "100.64.0.1"
B6, A6 = "fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1"


def pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def attr(kind: int, value: bytes) -> bytes:
    return pad4(struct.pack("=HH", 4 + len(value), kind) + value)


def nlmsg(kind: int, body: bytes, flags: int = 0, seq: int = 0) -> bytes:
    return pad4(struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body)


def tcp(sport: int, dport: int, flags: int = SYN) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 64240, 0, 0)


def ipv4(src: str, dst: str, payload: bytes, proto: int = 6, frag: int = 0, ihl: int = 5) -> bytes:
    opts = b"\x01" * ((ihl - 5) * 4)  # NOPs
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(opts) + len(payload), 1, frag,
                      64, proto, 0, IPv4Address(src).packed, IPv4Address(dst).packed)  # fmt: skip
    return hdr + opts + payload


def ipv6(src: str, dst: str, payload: bytes, nxt: int = 6) -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), nxt, 64)
        + IPv6Address(src).packed
        + IPv6Address(dst).packed
        + payload
    )


def packet(
    payload: bytes,
    *,
    family: int = socket.AF_INET,
    hw_protocol: int | None = 0x0800,
    prefix: bytes | None = b"tsnet2-refused\0",
    group: int = 7,
) -> bytes:
    """An NFULNL_MSG_PACKET as the kernel builds it (the attribute order of nfnetlink_log.c)."""
    body = struct.pack("!BBH", family, 0, group)
    if hw_protocol is not None:
        body += attr(1, struct.pack("!HBB", hw_protocol, 1, 0))  # NFULA_PACKET_HDR, hook INPUT
    if prefix is not None:
        body += attr(10, prefix)  # NFULA_PREFIX
    body += attr(4, struct.pack("!I", 3))  # NFULA_IFINDEX_INDEV
    body += attr(3, struct.pack("!QQ", 1700000000, 0))  # NFULA_TIMESTAMP
    body += attr(9, payload)  # NFULA_PAYLOAD
    return nlmsg(PACKET_TYPE, body)


def v4_syn(sport: int = 40000, dport: int = 8080, flags: int = SYN) -> bytes:
    return packet(ipv4(B4, A4, tcp(sport, dport, flags)))


def v6_syn(payload: bytes, nxt: int = 6) -> bytes:
    return packet(ipv6(B6, A6, payload, nxt), family=socket.AF_INET6, hw_protocol=0x86DD)


def test_ipv4_syn() -> None:
    assert parse_messages(v4_syn()) == [
        RefusedSyn(IPv4Address(B4), 40000, IPv4Address(A4), 8080, "tsnet2-refused")
    ]


def test_ipv4_with_options() -> None:
    got = parse_messages(packet(ipv4(B4, A4, tcp(1, 2), ihl=15)))
    assert [(s.sport, s.dport) for s in got] == [(1, 2)]


def test_ipv6_syn() -> None:
    (syn,) = parse_messages(v6_syn(tcp(40001, 443)))
    assert syn == RefusedSyn(IPv6Address(B6), 40001, IPv6Address(A6), 443, "tsnet2-refused")


def test_ipv6_extension_headers_are_skipped() -> None:
    hop = bytes([60, 0]) + b"\x01\x04\0\0\0\0"  # hop-by-hop (8 bytes) -> destination options
    dst = bytes([44, 1]) + b"\x01\x0c" + b"\0" * 12  # destination options (16 bytes) -> fragment
    frag = bytes([51, 0]) + struct.pack("!HI", 0x0001, 7)  # first fragment (M=1) -> AH
    ah = bytes([6, 1]) + b"\0" * 10  # AH, (1 + 2) * 4 = 12 bytes -> TCP
    (syn,) = parse_messages(v6_syn(hop + dst + frag + ah + tcp(5, 22), nxt=0))
    assert (syn.src, syn.sport, syn.dport) == (ip_address(B6), 5, 22)


@pytest.mark.parametrize(
    "payload",
    [
        ipv4(B4, A4, tcp(1, 2, SYN | ACK)),  # a SYN-ACK is no connection attempt
        ipv4(B4, A4, tcp(1, 2, RST)),
        ipv4(B4, A4, tcp(1, 2)[:13]),  # truncated before the flags
        ipv4(B4, A4, b"\0" * 8, proto=17),  # UDP
        ipv4(B4, A4, tcp(1, 2), frag=0x0010),  # a later fragment
        ipv4(B4, A4, tcp(1, 2))[:19],  # shorter than an IPv4 header
        b"\x44" + ipv4(B4, A4, tcp(1, 2))[1:],  # IHL 4 (< 20 bytes)
        ipv6(B6, A6, tcp(1, 2)),  # v6 bytes while the header says IPv4
        b"",
    ],
)
def test_not_a_parsable_ipv4_syn_is_skipped(payload: bytes) -> None:
    assert parse_messages(packet(payload)) == []


@pytest.mark.parametrize(
    ("nxt", "payload"),
    [
        (44, bytes([6, 0]) + struct.pack("!HI", 8 << 3, 7) + tcp(1, 2)),  # a later fragment
        (50, b"\0" * 16 + tcp(1, 2)),  # ESP: encrypted, nothing to read
        (59, b""),  # no next header
        (0, bytes([0, 0]) + b"\0" * 6),  # hop-by-hop, then more hop-by-hop, then truncated
        (0, (bytes([0, 0]) + b"\0" * 6) * 9 + tcp(1, 2)),  # too many extension headers
        (0, bytes([6, 200]) + b"\0" * 6 + tcp(1, 2)),  # a length past the copy
        (6, tcp(1, 2)[:10]),
    ],
)
def test_not_a_parsable_ipv6_syn_is_skipped(nxt: int, payload: bytes) -> None:
    assert parse_messages(v6_syn(payload, nxt)) == []


def test_family_without_packet_header_and_hw_protocol_mismatch() -> None:
    v6 = ipv6(B6, A6, tcp(1, 2))
    # No NFULA_PACKET_HDR: nfgen_family decides.
    assert len(parse_messages(packet(v6, family=socket.AF_INET6, hw_protocol=None))) == 1
    # hw_protocol wins over the family; a payload of the other version is skipped.
    assert parse_messages(packet(v6, family=socket.AF_INET6, hw_protocol=0x0800)) == []
    assert len(parse_messages(packet(v6, family=socket.AF_INET, hw_protocol=0x86DD))) == 1
    assert parse_messages(packet(v6, family=socket.AF_UNSPEC, hw_protocol=0x0806)) == []


def test_prefix_missing_or_unterminated() -> None:
    raw = ipv4(B4, A4, tcp(1, 2))
    assert parse_messages(packet(raw, prefix=None))[0].prefix == ""
    assert parse_messages(packet(raw, prefix=b"abc"))[0].prefix == "abc"
    assert parse_messages(packet(raw, prefix=b"\xff\0junk"))[0].prefix == "\ufffd"


def test_attribute_flag_bits_are_masked() -> None:
    body = struct.pack("!BBH", socket.AF_INET, 0, 7) + attr(0x4000 | 9, ipv4(B4, A4, tcp(1, 2)))
    assert len(parse_messages(nlmsg(PACKET_TYPE, body))) == 1


def test_a_batch_with_done_acks_and_other_types() -> None:
    ack = nlmsg(2, struct.pack("=i", 0) + struct.pack("=IHHII", 16, 0, 0, 1, 0))
    other = nlmsg(4 << 8 | 1, struct.pack("!BBH", 0, 0, 7))  # a CONFIG message: ignored
    noop = nlmsg(1, b"")
    done = nlmsg(3, struct.pack("!BBH", 0, 0, 0))
    data = v4_syn(1, 80) + ack + other + noop + v6_syn(tcp(2, 81)) + done + b"\0" * 7
    assert [(s.sport, s.dport) for s in parse_messages(data)] == [(1, 80), (2, 81)]
    assert parse_messages(b"") == [] and parse_messages(b"\0" * 15) == []


def test_kernel_error_message_is_an_nflog_error() -> None:
    err = nlmsg(2, struct.pack("=i", -errno.EPERM) + struct.pack("=IHHII", 16, 0, 0, 1, 0))
    with pytest.raises(NflogError, match="EPERM") as info:
        parse_messages(err)
    assert info.value.errno == errno.EPERM
    assert isinstance(info.value, NodeError)
    with pytest.raises(NflogError, match="truncated"):
        parse_messages(struct.pack("=IHHII", 18, 2, 0, 0, 0) + b"\0\0")


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("=IHHII", 15, PACKET_TYPE, 0, 0, 0),  # shorter than its own header
        struct.pack("=IHHII", 17, PACKET_TYPE, 0, 0, 0),  # longer than the datagram
        v4_syn()[:-8],  # cut inside the payload attribute
        nlmsg(PACKET_TYPE, b"\2\0"),  # no room for nfgenmsg
        nlmsg(PACKET_TYPE, struct.pack("!BBH", 2, 0, 7) + struct.pack("=HH", 2, 9)),  # nla_len 2
        nlmsg(PACKET_TYPE, struct.pack("!BBH", 2, 0, 7) + struct.pack("=HH", 40, 9)),  # overruns
    ],
)
def test_broken_framing_is_an_nflog_error(data: bytes) -> None:
    with pytest.raises(NflogError, match=r"malformed|nfgenmsg"):
        parse_messages(data)


def test_config_message_layout() -> None:
    msg = config_message(7, 128, seq=3)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq, pid) == (len(msg), 4 << 8 | 1, 0x1 | 0x4, 3, 0)
    assert msg[16:20] == bytes([socket.AF_UNSPEC, 0, 0, 7])  # nfgenmsg, res_id = group (BE)
    assert msg[20:] == (
        struct.pack("=HH", 5, 1) + b"\x01\0\0\0"  # NFULA_CFG_CMD: BIND, padded to 8
        + struct.pack("=HH", 10, 2) + struct.pack("!IBB", 128, 2, 0) + b"\0\0"  # MODE: PACKET
        + struct.pack("=HH", 8, 5) + struct.pack("!I", 1)  # NFULA_CFG_QTHRESH: 1
    )  # fmt: skip


@pytest.mark.parametrize("group", [-1, 65536, True, "7", None])
def test_reader_rejects_a_bad_group(group: object) -> None:
    with pytest.raises(NflogError, match="group"):
        NflogReader(group)  # type: ignore[arg-type]


@pytest.mark.parametrize("copy_range", [0, 39, 65532, False])
def test_reader_rejects_a_bad_copy_range(copy_range: object) -> None:
    with pytest.raises(NflogError, match="copy range"):
        NflogReader(1, copy_range=copy_range)  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    try:
        got = parse_messages(data)
    except NflogError:
        return
    assert all(isinstance(s, RefusedSyn) for s in got)


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=200),
    st.sampled_from([socket.AF_INET, socket.AF_INET6, 0, 7]),
    st.sampled_from([0x0800, 0x86DD, 0, None]),
    st.one_of(st.none(), st.binary(max_size=40)),
)
def test_well_framed_messages_with_any_payload_never_raise(
    payload: bytes, family: int, hw: int | None, prefix: bytes | None
) -> None:
    got = parse_messages(packet(payload, family=family, hw_protocol=hw, prefix=prefix) * 2)
    assert len(got) in (0, 2)
    for syn in got:
        assert 0 <= syn.sport <= 65535 and 0 <= syn.dport <= 65535


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=120), st.integers(0, 5))
def test_mutated_valid_datagrams_never_raise_anything_else(noise: bytes, where: int) -> None:
    data = bytearray(v4_syn() + v6_syn(tcp(1, 2)))
    pos = (where * 37) % len(data)
    data[pos : pos + len(noise)] = noise
    with contextlib.suppress(NflogError):
        parse_messages(bytes(data))
