"""The egress proxy's sans-IO cores: SOCKS5 (tsnet2.proto.socks5) and HTTP proxy requests
(tsnet2.proto.httpproxy), with examples and property tests (never a crash other than their
own errors, always bounded, sticky errors, any split of the bytes gives the same result)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsnet2.daemon.egress import EgressConfigError, parse_loopback_listen
from tsnet2.proto import LocalProtocolError, RemoteProtocolError
from tsnet2.proto.httpproxy import MAX_HEAD, HttpProxyCore, HttpProxyError, encode_response
from tsnet2.proto.socks5 import (
    MAX_MESSAGE,
    ConnectRequest,
    Reply,
    Socks5Error,
    Socks5ServerCore,
    encode_reply,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- SOCKS5 --------------------------------------------------------------------------------


def _greet_and(request: bytes) -> bytes:
    return b"\x05\x02\x02\x00" + request


def _socks(data: bytes, chunk: int | None = None) -> tuple[Socks5ServerCore, ConnectRequest]:
    core = Socks5ServerCore()
    pieces = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    req = None
    for p in pieces:
        req = core.receive(p)
        if req is not None:
            break
    assert req is not None
    return core, req


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_socks5_connect_by_name(chunk: int | None) -> None:
    data = _greet_and(b"\x05\x01\x00\x03\x08tsnet2-b" + struct.pack(">H", 8080) + b"GET /")
    core, req = _socks(data, chunk)
    assert req == ConnectRequest("tsnet2-b", 8080, "domain", b"GET /" if chunk is None
                                 else req.rest)
    assert core.data_to_send() == b"\x05\x00"
    assert core.state == "done"
    with pytest.raises(LocalProtocolError):
        core.receive(b"x")


def test_socks5_connect_by_address() -> None:
    _, req = _socks(_greet_and(b"\x05\x01\x00\x01" + bytes([100, 64, 0, 2]) + b"\x00\x50"))
    assert (req.host, req.port, req.atyp) == ("100.64.0.2", 80, "ipv4")
    v6 = bytes.fromhex("fd7a115ca1e000000000000000000002")
    _, req = _socks(_greet_and(b"\x05\x01\x00\x04" + v6 + b"\x01\xbb"))
    assert (req.host, req.port, req.atyp) == ("fd7a:115c:a1e0::2", 443, "ipv6")


@pytest.mark.parametrize(("data", "reply", "answer"), [
    (b"\x04\x01\x00", None, b""),  # SOCKS4
    (b"\x05\x00", None, b"\x05\xff"),  # no methods
    (b"\x05\x01\x02", None, b"\x05\xff"),  # username/password only
    (_greet_and(b"\x05\x02\x00\x01\x01\x02\x03\x04\x00\x50"), Reply.COMMAND_NOT_SUPPORTED, None),
    (_greet_and(b"\x05\x03\x00\x01\x01\x02\x03\x04\x00\x50"), Reply.COMMAND_NOT_SUPPORTED, None),
    (_greet_and(b"\x05\x09\x00\x01\x01\x02\x03\x04\x00\x50"), Reply.COMMAND_NOT_SUPPORTED, None),
    (_greet_and(b"\x05\x01\x00\x09"), Reply.ADDRESS_TYPE_NOT_SUPPORTED, None),
    (_greet_and(b"\x05\x01\x00\x03\x00\x00\x50"), Reply.GENERAL_FAILURE, None),
    (_greet_and(b"\x05\x01\x00\x03\x03a b\x00\x50"), Reply.GENERAL_FAILURE, None),
    (_greet_and(b"\x05\x01\x01\x01\x01\x02\x03\x04\x00\x50"), Reply.GENERAL_FAILURE, None),
    (_greet_and(b"\x04\x01\x00\x01\x01\x02\x03\x04\x00\x50"), Reply.GENERAL_FAILURE, None),
    (_greet_and(b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x00"), Reply.GENERAL_FAILURE, None),
])
def test_socks5_refusals(data: bytes, reply: Reply | None, answer: bytes | None) -> None:
    core = Socks5ServerCore()
    with pytest.raises(Socks5Error) as info:
        core.receive(data)
    assert info.value.reply == reply
    out = core.data_to_send()
    if answer is not None:
        assert out == answer
    else:
        assert out == b"\x05\x00" + encode_reply(reply or Reply.GENERAL_FAILURE)
    assert core.state == "error"
    with pytest.raises(Socks5Error):  # sticky
        core.receive(b"\x05")


def test_socks5_eof() -> None:
    core = Socks5ServerCore()
    core.receive(b"\x05\x01")
    with pytest.raises(Socks5Error):
        core.receive(b"")


def test_socks5_reply_encoding() -> None:
    assert encode_reply(Reply.SUCCEEDED, "100.64.0.1", 40000) == (
        b"\x05\x00\x00\x01" + bytes([100, 64, 0, 1]) + struct.pack(">H", 40000))
    assert encode_reply(Reply.SUCCEEDED, "fd7a:115c:a1e0::1", 1)[3] == 4
    assert encode_reply(Reply.HOST_UNREACHABLE) == b"\x05\x04\x00\x01\x00\x00\x00\x00\x00\x00"
    with pytest.raises(LocalProtocolError):
        encode_reply(Reply.SUCCEEDED, "1.2.3.4", 70000)


@FUZZ
@given(st.lists(st.binary(max_size=600), max_size=8))
def test_socks5_fuzz_never_crashes_and_stays_bounded(chunks: list[bytes]) -> None:
    core = Socks5ServerCore()
    for chunk in chunks:
        try:
            req = core.receive(chunk)
        except RemoteProtocolError:
            assert core.state == "error"
            assert core.buffered == 0
            with pytest.raises(RemoteProtocolError):
                core.receive(b"x")
            return
        if req is not None:
            assert 1 <= req.port <= 65535
            return
        assert core.buffered <= MAX_MESSAGE + len(chunk)
        assert len(core.data_to_send()) <= 2


@FUZZ
@given(st.binary(min_size=1, max_size=30), st.integers(1, 65535), st.data())
def test_socks5_any_split_gives_the_same_request(name: bytes, port: int,
                                                 data: st.DataObject) -> None:
    raw = _greet_and(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
    whole = Socks5ServerCore()
    try:
        expect: ConnectRequest | Exception | None = whole.receive(raw)
    except Socks5Error as exc:
        expect = exc
    cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=6)))
    core = Socks5ServerCore()
    got: ConnectRequest | Exception | None = None
    prev = 0
    for c in [*cuts, len(raw)]:
        try:
            got = core.receive(raw[prev:c])
        except Socks5Error as exc:
            got = exc
            break
        prev = c
    if isinstance(expect, Exception):
        assert isinstance(got, Socks5Error) and got.reply == expect.reply  # type: ignore[attr-defined]
    else:
        assert got == expect


# ---- HTTP proxy ----------------------------------------------------------------------------


def test_http_connect() -> None:
    req = HttpProxyCore().receive(b"CONNECT tsnet2-b:443 HTTP/1.1\r\nHost: tsnet2-b:443\r\n"
                                  b"\r\n\x16\x03\x01")
    assert req is not None
    assert (req.kind, req.host, req.port, req.rest) == ("connect", "tsnet2-b", 443,
                                                          b"\x16\x03\x01")
    with pytest.raises(LocalProtocolError):
        req.forward_head()
    req = HttpProxyCore().receive(b"CONNECT [fd7a:115c:a1e0::2]:80 HTTP/1.0\n\n")
    assert req is not None and (req.host, req.port) == ("fd7a:115c:a1e0::2", 80)


def test_http_absolute_form_is_rewritten() -> None:
    core = HttpProxyCore()
    assert core.receive(b"\r\nPOST http://Tsnet2-B.tail.ts.net./a/b?c=d#frag HTTP/1.1\r\n") \
        is None
    req = core.receive(b"Host: evil:1\r\nProxy-Connection: keep-alive\r\n"
                       b"Proxy-Authorization: Basic eA==\r\nConnection: X-Drop, keep-alive\r\n"
                       b"X-Drop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\n"
                       b"Transfer-Encoding: chunked\r\nX-Keep: yes\r\n\r\n5\r\nhello")
    assert req is not None
    assert (req.kind, req.host, req.port, req.target) == (
        "forward", "Tsnet2-B.tail.ts.net.", 80, "/a/b?c=d")
    assert req.forward_head() == (
        b"POST /a/b?c=d HTTP/1.1\r\nHost: Tsnet2-B.tail.ts.net.\r\n"
        b"Transfer-Encoding: chunked\r\nX-Keep: yes\r\nConnection: close\r\n\r\n")
    assert req.rest == b"5\r\nhello"


def test_http_absolute_form_port_and_empty_path() -> None:
    req = HttpProxyCore().receive(b"GET http://100.64.0.2:8080 HTTP/1.1\r\n\r\n")
    assert req is not None and (req.host, req.port, req.target) == ("100.64.0.2", 8080, "/")
    assert req.forward_head().startswith(b"GET / HTTP/1.1\r\nHost: 100.64.0.2:8080\r\n")
    req = HttpProxyCore().receive(b"GET http://peer?x=1 HTTP/1.1\r\n\r\n")
    assert req is not None and req.target == "/?x=1"


@pytest.mark.parametrize(("data", "status"), [
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # origin-form: not a proxy request
    (b"GET https://peer/ HTTP/1.1\r\n\r\n", 400),
    (b"GET ftp://peer/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://user@peer/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://peer:0/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://peer:99999/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://pe er/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://fd7a::1/ HTTP/1.1\r\n\r\n", 400),  # IPv6 without brackets
    (b"CONNECT peer HTTP/1.1\r\n\r\n", 400),  # no port
    (b"CONNECT peer:443 HTTP/2.0\r\n\r\n", 400),
    (b"GET http://peer/ HTTP/1.1 x\r\n\r\n", 400),
    (b"G(T http://peer/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://peer/ HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET http://peer/ HTTP/1.1\r\n folded\r\n\r\n", 400),
    (b"GET http://peer/ HTTP/1.1\r\nNoColon\r\n\r\n", 400),
    (b"GET http://peer/ HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"POST http://peer/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
     400),
    (b"POST http://peer/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET http://peer/ HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
    (b"GET http://peer/ HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
    (b"\x16\x03\x01\x02\x00", None),  # TLS to the proxy: incomplete, then EOF
])
def test_http_refusals(data: bytes, status: int | None) -> None:
    core = HttpProxyCore()
    with pytest.raises(HttpProxyError) as info:
        core.receive(data)
        core.receive(b"")
    assert info.value.status == (status or 400)
    with pytest.raises(HttpProxyError):  # sticky
        core.receive(b"\r\n")


def test_http_head_bound_without_end() -> None:
    core = HttpProxyCore(max_head=64)
    assert core.receive(b"GET http://peer/ HTTP/1.1\r\n") is None
    with pytest.raises(HttpProxyError) as info:
        core.receive(b"X: " + b"a" * 100)
    assert info.value.status == 431
    assert core.buffered == 0


def test_encode_response() -> None:
    assert encode_response(200) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    out = encode_response(404, "no tailnet node named 'x'")
    assert out.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert out.endswith(b"Connection: close\r\n\r\nno tailnet node named 'x'\n")
    assert b"Content-Length: 26\r\n" in out


@FUZZ
@given(st.lists(st.binary(max_size=3000), max_size=10))
def test_http_fuzz_never_crashes_and_stays_bounded(chunks: list[bytes]) -> None:
    core = HttpProxyCore(max_head=4096)
    for chunk in chunks:
        try:
            req = core.receive(chunk)
        except RemoteProtocolError as exc:
            assert isinstance(exc, HttpProxyError) and exc.status in (400, 431)
            assert core.buffered == 0
            return
        if req is not None:
            assert 1 <= req.port <= 65535 and req.host
            if req.kind == "forward":
                head = req.forward_head()
                assert head.endswith(b"Connection: close\r\n\r\n")
                assert head.count(b"\r\n\r\n") == 1
            return
        assert core.buffered <= 4096 + 4 + len(chunk)


http_heads = st.builds(
    lambda m, host, port, path, hdrs: (
        f"{m} http://{host}:{port}{path} HTTP/1.1\r\n".encode()
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in hdrs) + b"\r\n"),
    st.sampled_from(["GET", "POST", "PUT", "HEAD"]),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
    st.integers(1, 65535),
    st.from_regex(r"(/[a-zA-Z0-9._~-]{0,8}){1,3}", fullmatch=True),
    st.lists(st.tuples(st.from_regex(r"X-[A-Za-z]{1,8}", fullmatch=True),
                       st.from_regex(r"[ -~]{0,20}", fullmatch=True).map(str.strip)),
             max_size=5),
)


@FUZZ
@given(http_heads, st.data())
def test_http_any_split_gives_the_same_request(head: bytes, data: st.DataObject) -> None:
    expect = HttpProxyCore().receive(head)
    assert expect is not None
    cuts = sorted(data.draw(st.sets(st.integers(1, len(head) - 1), max_size=8)))
    core = HttpProxyCore()
    got = None
    prev = 0
    for c in [*cuts, len(head)]:
        got = core.receive(head[prev:c])
        prev = c
        if got is not None:
            break
    assert got == expect
    assert prev == len(head)


# ---- --egress-listen -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:1055", ("127.0.0.1", 1055)), ("[::1]:1055", ("::1", 1055)),
    ("127.0.0.2:0", ("127.0.0.2", 0)),
])
def test_loopback_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_loopback_listen("--egress-listen", text) == want


@pytest.mark.parametrize(("text", "why"), [
    ("0.0.0.0:1055", "not a loopback address"), ("10.0.0.1:1055", "not a loopback address"),
    ("[::]:1055", "not a loopback address"), ("localhost:1055", "names are not resolved"),
    ("127.0.0.1", "missing port"), ("127.0.0.1:x", "bad port"),
])
def test_loopback_listen_refuses(text: str, why: str) -> None:
    with pytest.raises(EgressConfigError, match=why):
        parse_loopback_listen("--egress-listen", text)


def test_cli_refuses_a_non_loopback_egress_listen(capsys: pytest.CaptureFixture[str]) -> None:
    from tsnet2.daemon import cli
    code = cli.main(["--socket", "/nonexistent/s", "--state-dir", "/nonexistent/d",
                     "--egress-listen", "0.0.0.0:1055"])
    assert code == 2
    assert "is not a loopback address" in capsys.readouterr().err


def test_help_describes_the_egress_flags() -> None:
    from tsnet2.daemon import cli
    text = " ".join(cli.build_parser().format_help().split())
    for flag in ("--egress-listen HOST:PORT", "--egress-socket PATH", "--dns-listen HOST:PORT",
                 "--dns-upstream IP[:PORT]"):
        assert flag in text
    assert "loopback" in text and "names resolve against the tailnet only" in text
