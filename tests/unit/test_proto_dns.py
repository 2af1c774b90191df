"""tsnet2.proto.dns (the DNS responder's message parser and builder) and the responder's
flag parsing: examples and property tests (never a crash but DnsError, bounded work on
compression pointers, build/parse round trips)."""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsnet2.daemon.dns import (
    DnsConfigError,
    default_upstreams,
    parse_upstream,
    resolv_conf_nameservers,
)
from tsnet2.proto import LocalProtocolError
from tsnet2.proto.dns import (
    FLAG_AA,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    FLAG_TC,
    MAX_POINTERS,
    DnsError,
    Question,
    RCode,
    Record,
    RType,
    build_query,
    build_response,
    encode_name,
    parse_message,
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEADER = struct.Struct(">HHHHHH")


def test_query_round_trip() -> None:
    raw = build_query("tsnet2-b.tail-scale.ts.net.", RType.AAAA, id_=0xBEEF)
    msg = parse_message(raw)
    assert msg.id == 0xBEEF and msg.flags == FLAG_RD and not msg.is_response
    assert msg.questions == (Question("tsnet2-b.tail-scale.ts.net", RType.AAAA),)
    assert msg.udp_size == 512 and msg.question_wire == raw[12:]


def test_response_flags_answers_and_echoed_question() -> None:
    raw = build_query("TsNet2-B", RType.A, id_=7)
    q = parse_message(raw)
    rec = Record("TsNet2-B", RType.A, 1, 60, ipaddress.IPv4Address("100.64.0.2").packed)
    out = parse_message(build_response(q, RCode.NOERROR, (rec,), authoritative=True))
    assert out.id == 7 and out.is_response and out.rcode == RCode.NOERROR
    assert out.flags & (FLAG_QR | FLAG_AA | FLAG_RD | FLAG_RA) == FLAG_QR | FLAG_AA | FLAG_RD \
        | FLAG_RA
    assert out.questions == q.questions
    assert out.answers == (rec,) and str(out.answers[0].address) == "100.64.0.2"
    nx = parse_message(build_response(q, RCode.NXDOMAIN, authoritative=True))
    assert nx.rcode == RCode.NXDOMAIN and nx.answers == ()


def test_truncation() -> None:
    q = parse_message(build_query("x", RType.A, id_=1))
    recs = tuple(Record("x", RType.A, 1, 60, bytes((10, 0, 0, i))) for i in range(100))
    out = parse_message(build_response(q, RCode.NOERROR, recs, max_size=512))
    assert out.flags & FLAG_TC and 0 < len(out.answers) < 100


def test_edns_udp_size() -> None:
    raw = bytearray(build_query("x", RType.A, id_=1))
    raw[11] = 1  # ARCOUNT
    raw += b"\x00" + struct.pack(">HHIH", RType.OPT, 1232, 0, 0)
    assert parse_message(bytes(raw)).udp_size == 1232


def test_compression_pointers() -> None:
    # Question "a.example", answer name = pointer to the question's "example".
    q = HEADER.pack(1, FLAG_QR, 1, 1, 0, 0) + b"\x01a\x07example\x00\x00\x01\x00\x01"
    ans = b"\x01b\xc0\x0e" + struct.pack(">HHIH", 1, 1, 5, 4) + b"\x01\x02\x03\x04"
    msg = parse_message(q + ans)
    assert msg.answers[0].name == "b.example"
    assert msg.question_wire  # no pointer in the question: echoed as received


@pytest.mark.parametrize(("raw", "why"), [
    (b"\x00" * 11, "shorter than a DNS header"),
    (HEADER.pack(1, 0, 1, 0, 0, 0), "section counts"),
    (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x09abc\x00\x01\x00\x01", "label runs past"),
    (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01", "backwards"),
    (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x80abc\x00\x01\x00\x01", "label type"),
    (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x01a\x00\x00\x01", "question runs past"),
    (HEADER.pack(1, 0, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",
     "longer than 255"),
    (HEADER.pack(1, 0, 0, 1, 0, 0) + b"\x00" + struct.pack(">HHIH", 1, 1, 0, 9) + b"\x00",
     "record data runs past"),
])
def test_malformed(raw: bytes, why: str) -> None:
    with pytest.raises(DnsError, match=why):
        parse_message(raw)


@pytest.mark.parametrize(("links", "ok"), [(MAX_POINTERS - 1, True), (MAX_POINTERS, False)])
def test_pointer_chains_are_bounded(links: int, ok: bool) -> None:
    """A record name that is a pointer to a pointer to ... the root name (each pointing
    backwards): at most MAX_POINTERS hops."""
    question = b"\x00\x00\x01\x00\x01"  # the root name, at offset 12
    # The chain is the data of a first record (its name the root: 1 + 10 bytes), so the
    # parser meets it only through the second record's name.
    base = 12 + len(question) + 11
    chain = bytearray()
    prev = 12
    for i in range(links):
        chain += struct.pack(">H", 0xC000 | prev)
        prev = base + 2 * i
    first = b"\x00" + struct.pack(">HHIH", 16, 1, 0, len(chain)) + bytes(chain)
    second = struct.pack(">H", 0xC000 | prev) + struct.pack(">HHIH", 1, 1, 0, 0)
    raw = HEADER.pack(1, 0, 1, 2, 0, 0) + question + first + second
    if ok:
        assert parse_message(raw).answers[1].name == ""
    else:
        with pytest.raises(DnsError, match="compression pointers"):
            parse_message(raw)


def test_encode_name_limits() -> None:
    assert encode_name(".") == b"\x00"
    assert encode_name("a.b.") == b"\x01a\x01b\x00"
    for bad in ("a..b", "a" * 64, ".".join(["a" * 63] * 4), "é.com"):
        with pytest.raises(LocalProtocolError):
            encode_name(bad)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_parse_never_crashes(raw: bytes) -> None:
    try:
        msg = parse_message(raw)
    except DnsError:
        return
    assert len(msg.questions) + len(msg.answers) + len(msg.authority) + \
        len(msg.additional) <= len(raw)


@FUZZ
@given(st.binary(min_size=12, max_size=300), st.integers(0, 0xFFFF))
def test_fuzz_header_with_pointers(body: bytes, qd: int) -> None:
    raw = HEADER.pack(1, 0, qd % 4, 0, 0, 0) + bytes(b | 0xC0 if i % 2 == 0 else b
                                                     for i, b in enumerate(body))
    with contextlib.suppress(DnsError):
        parse_message(raw)


labels = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)


@FUZZ
@given(st.lists(labels, min_size=1, max_size=5), st.integers(0, 65535), st.integers(0, 0xFFFF),
       st.lists(st.binary(min_size=4, max_size=4), max_size=5))
def test_fuzz_round_trip(parts: list[str], qtype: int, qid: int, addrs: list[bytes]) -> None:
    name = ".".join(parts)
    q = parse_message(build_query(name, qtype, id_=qid))
    assert q.questions == (Question(name, qtype),) and q.id == qid
    recs = tuple(Record(name, RType.A, 1, 60, a) for a in addrs)
    out = parse_message(build_response(q, RCode.NOERROR, recs))
    assert out.answers == recs and out.questions == q.questions


# ---- flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    ("1.1.1.1", ("1.1.1.1", 53)), ("10.0.0.10:5353", ("10.0.0.10", 5353)),
    ("fd00::1", ("fd00::1", 53)), ("[fd00::1]:53", ("fd00::1", 53)),
])
def test_parse_upstream(text: str, want: tuple[str, int]) -> None:
    assert parse_upstream(text) == want


@pytest.mark.parametrize("text", ["dns.google", "1.1.1.1:0", "1.1.1.1:x", "[fd00::1]", ""])
def test_parse_upstream_refuses(text: str) -> None:
    with pytest.raises(DnsConfigError):
        parse_upstream(text)


def test_default_upstreams_skip_the_responder(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch x\nnameserver 127.0.0.1\nnameserver 10.96.0.10\n"
                    "nameserver fe80::1%eth0\nnameserver bogus\n")
    assert resolv_conf_nameservers(conf) == ["127.0.0.1", "10.96.0.10", "fe80::1"]
    assert default_upstreams(("127.0.0.1", 53), conf) == (("10.96.0.10", 53), ("fe80::1", 53))
    assert default_upstreams(("127.0.0.1", 5353), conf)[0] == ("127.0.0.1", 53)
    assert resolv_conf_nameservers(tmp_path / "missing") == []


def test_cli_dns_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from tsnet2.daemon import cli
    for argv, why in ((["--dns-listen", "10.1.2.3:53"], "not a loopback address"),
                      (["--dns-upstream", "1.1.1.1"], "needs --dns-listen"),
                      (["--dns-listen", "127.0.0.1:53", "--dns-upstream", "x"],
                       "want an IP address")):
        code = cli.main(["--socket", "/nonexistent/s", "--state-dir", "/nonexistent/d",
                         *argv])
        assert code == 2
        assert why in capsys.readouterr().err
