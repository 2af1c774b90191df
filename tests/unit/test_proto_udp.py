"""The UDP framing core (tsnet2.proto.udp): round trips, bounds, sticky errors, fuzz."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsnet2.proto import ErrorCode, LocalProtocolError, RemoteProtocolError, WireError
from tsnet2.proto.udp import (
    MAX_FRAME,
    MAX_NOTICE,
    Datagram,
    FrameDecoder,
    Notice,
    Oversized,
    encode_datagram,
    encode_notice,
    parse_udp_listen_addr,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

addrs = st.sampled_from(["100.64.0.1:53", "[fd7a:115c:a1e0::1]:5353", "100.127.255.254:1"])


def feed_split(dec: FrameDecoder, data: bytes, cuts: list[int]) -> list[object]:
    out: list[object] = []
    prev = 0
    for c in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        out += dec.feed(data[prev:c])
        prev = c
    return out


def test_wire_layout() -> None:
    assert encode_datagram(b"hi") == b"\x00\x04\x00\x00hi"
    assert encode_datagram(b"x", "1.2.3.4:5") == b"\x00\x0c\x00\x091.2.3.4:5x"
    frame = encode_notice("too big", ErrorCode.DATAGRAM_TOO_LARGE)
    assert frame[2:4] == b"\x01\x00"
    assert FrameDecoder().feed(frame) == [Notice("too big", ErrorCode.DATAGRAM_TOO_LARGE)]


def test_empty_datagram_round_trips() -> None:
    assert FrameDecoder().feed(encode_datagram(b"")) == [Datagram(b"")]


def test_encoder_refuses_frames_over_the_u16() -> None:
    encode_datagram(b"x" * (MAX_FRAME - 2))
    with pytest.raises(LocalProtocolError, match="exceeds 65535"):
        encode_datagram(b"x" * (MAX_FRAME - 1))
    with pytest.raises(LocalProtocolError):
        encode_datagram(b"", "é:1")


def test_oversized_is_skipped_without_buffering() -> None:
    dec = FrameDecoder(100, notices=False)
    big = encode_datagram(b"y" * 5000)
    events = dec.feed(big[:1000])
    assert events == [] and dec.buffered == 0
    events = dec.feed(big[1000:] + encode_datagram(b"ok"))
    assert events == [Oversized(5000), Datagram(b"ok")]


def test_addressing_rules_are_enforced() -> None:
    with pytest.raises(RemoteProtocolError, match="without a peer address"):
        FrameDecoder(addressed=True).feed(encode_datagram(b"x"))
    with pytest.raises(RemoteProtocolError, match="with an address"):
        FrameDecoder().feed(encode_datagram(b"x", "100.64.0.1:1"))
    with pytest.raises(RemoteProtocolError, match="ip:port"):
        FrameDecoder(addressed=True).feed(encode_datagram(b"x", "peer:53"))


def test_errors_are_sticky() -> None:
    dec = FrameDecoder(notices=False)
    with pytest.raises(RemoteProtocolError, match="notice frame from an app"):
        dec.feed(encode_notice("x"))
    with pytest.raises(RemoteProtocolError):
        dec.feed(encode_datagram(b"fine"))
    bad = FrameDecoder()
    with pytest.raises(RemoteProtocolError, match="kind 7"):
        bad.feed(struct.pack("!HBB", 2, 7, 0))
    short = FrameDecoder()
    with pytest.raises(RemoteProtocolError, match="cannot hold"):
        short.feed(struct.pack("!HBB", 3, 0, 9))


def test_listen_addr() -> None:
    la = parse_udp_listen_addr("udp", ":53")
    assert (la.network, la.host, la.port) == ("udp", None, 53)
    with pytest.raises(ValueError, match="udp4 needs an IPv4"):
        parse_udp_listen_addr("udp4", "[fd7a:115c:a1e0::1]:53")
    with pytest.raises(ValueError, match="expected udp"):
        parse_udp_listen_addr("tcp", ":53")


@FUZZ
@given(st.lists(st.tuples(st.binary(max_size=300), addrs), max_size=20),
       st.lists(st.integers(min_value=0, max_value=8000), max_size=30))
def test_round_trip_any_split(items: list[tuple[bytes, str]], cuts: list[int]) -> None:
    data = b"".join(encode_datagram(p, a) for p, a in items)
    dec = FrameDecoder(200, addressed=True)
    got = feed_split(dec, data, cuts)
    want = [Datagram(p, a) if len(p) <= 200 else Oversized(len(p), a) for p, a in items]
    assert got == want
    assert dec.buffered == 0


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0, max_value=3000)))
def test_garbage_only_raises_wire_errors_and_stays_bounded(data: bytes, cuts: list[int]) -> None:
    dec = FrameDecoder(512)
    try:
        for ev in feed_split(dec, data, cuts):
            if isinstance(ev, Datagram):
                assert len(ev.payload) <= 512
        assert dec.buffered <= 4 + 255 + max(512, MAX_NOTICE)
    except WireError:
        with pytest.raises(WireError):
            dec.feed(b"\x00\x02\x00\x00")
