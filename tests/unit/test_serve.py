"""Serve: the --serve rule parser, the PROXY v2 codec, the HTTP identity rewriter and the
forward-socket checks (pure functions, no daemon)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsnet2.daemon.cli import main, parse_serve_rules
from tsnet2.daemon.serve import ForwardError, check_forward_socket
from tsnet2.proto.httpident import (
    RequestRewriter,
    Rewrite,
    decode_header_value,
    encode_header_value,
    identity_headers,
)
from tsnet2.proto.proxyv2 import (
    SIGNATURE,
    ProxyV2Error,
    decode_proxy_v2,
    encode_proxy_v2,
    identity_tlvs,
)
from tsnet2.proto.serve import ServeRule, ServeTarget, parse_serve_rule

# ---- rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "rule"), [
    ("80=127.0.0.1:8080", ServeRule(80, "tcp", ServeTarget("127.0.0.1", 8080))),
    ("80=http:127.0.0.1:8080", ServeRule(80, "http", ServeTarget("127.0.0.1", 8080))),
    ("80=tcp:127.1.2.3:1", ServeRule(80, "tcp", ServeTarget("127.1.2.3", 1))),
    ("443=[::1]:8443", ServeRule(443, "tcp", ServeTarget("::1", 8443))),
    ("443=proxy:[::1]:8443", ServeRule(443, "proxy", ServeTarget("::1", 8443))),
    ("8080=localhost:80", ServeRule(8080, "tcp", ServeTarget("127.0.0.1", 80))),
    ("8080=http:LocalHost:80", ServeRule(8080, "http", ServeTarget("127.0.0.1", 80))),
    ("2222=proxy:unix:/tsnet2/ssh.sock",
     ServeRule(2222, "proxy", ServeTarget(path="/tsnet2/ssh.sock"))),
    ("22=unix:/run/a:b.sock", ServeRule(22, "tcp", ServeTarget(path="/run/a:b.sock"))),
    ("65535=http:unix:/x", ServeRule(65535, "http", ServeTarget(path="/x"))),
])
def test_rule_ok(text: str, rule: ServeRule) -> None:
    assert parse_serve_rule(text) == rule


@pytest.mark.parametrize(("text", "words"), [
    ("80", "want PORT=TARGET"),
    ("=127.0.0.1:80", "tailnet port"),
    ("0=127.0.0.1:80", "tailnet port"),
    ("65536=127.0.0.1:80", "tailnet port"),
    ("x=127.0.0.1:80", "tailnet port"),
    ("80=127.0.0.1", "HOST:PORT"),
    ("80=127.0.0.1:0", "port"),
    ("80=127.0.0.1:99999", "port"),
    ("80=10.0.0.1:80", "not a loopback"),
    ("80=0.0.0.0:80", "not a loopback"),
    ("80=example.com:80", "loopback address"),
    ("80=::1:80", "brackets"),
    ("80=https:127.0.0.1:80", "unknown mode 'https'"),
    ("80=http:unix:relative.sock", "absolute"),
    ("80=unix:", "absolute"),
    ("80=unix:/" + "a" * 200, "longer than"),
    ("80=http:", "HOST:PORT"),
])
def test_rule_bad(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        parse_serve_rule(text)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"--serve {text!r}: ")


def test_rules_duplicate_port() -> None:
    with pytest.raises(ValueError, match="port 80 is already served"):
        parse_serve_rules(["80=127.0.0.1:1", "80=http:127.0.0.1:2"])
    assert len(parse_serve_rules(["80=127.0.0.1:1", "81=127.0.0.1:1"])) == 2


def test_target_text() -> None:
    assert str(ServeTarget("::1", 80)) == "[::1]:80"
    assert str(ServeTarget("127.0.0.1", 80)) == "127.0.0.1:80"
    assert str(ServeTarget(path="/a/b")) == "unix:/a/b"


def test_bad_rule_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--socket", "/nonexistent/s", "--state-dir", "/nonexistent/d",
                 "--serve", "80=10.1.1.1:80"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tsnet2d: --serve '80=10.1.1.1:80': target '10.1.1.1:80': 10.1.1.1 is not "
                   "a loopback address; serve forwards only to the pod itself (127.0.0.0/8, "
                   "::1, or unix:)"]


# ---- PROXY v2 ------------------------------------------------------------------------------


def test_proxy_v2_ipv4_layout() -> None:
    h = encode_proxy_v2(("100.64.0.1", 40000), ("100.64.0.2", 80))
    assert h[:12] == bytes.fromhex("0D0A0D0A000D0A515549540A")
    assert h[12] == 0x21 and h[13] == 0x11
    assert struct.unpack("!H", h[14:16])[0] == 12 == len(h) - 16
    assert h[16:20] == bytes([100, 64, 0, 1]) and h[20:24] == bytes([100, 64, 0, 2])
    assert h[24:28] == struct.pack("!HH", 40000, 80)


def test_proxy_v2_ipv6_tlvs_roundtrip() -> None:
    tlvs = identity_tlvs(conn_id="abc", user_login="alice@example.com", user_name="Alice Ä",
                         node_name="a.ts.net", node_id="nXYZ")
    h = encode_proxy_v2(("fd7a:115c:a1e0::1", 1), ("fd7a:115c:a1e0::2", 2), tlvs)
    assert h[13] == 0x21
    n = struct.unpack("!H", h[14:16])[0]
    assert n == 36 + sum(3 + len(v) for _, v in tlvs)
    assert h[16 + 36] == 0x05  # UNIQUE_ID first
    got = decode_proxy_v2(h + b"rest")
    assert got is not None
    hdr, used = got
    assert used == len(h)
    assert hdr.command == 1
    assert hdr.src == (ipaddress.ip_address("fd7a:115c:a1e0::1"), 1)
    assert hdr.dst == (ipaddress.ip_address("fd7a:115c:a1e0::2"), 2)
    assert hdr.identity() == {"conn_id": "abc", "user_login": "alice@example.com",
                              "user_name": "Alice Ä", "node_name": "a.ts.net",
                              "node_id": "nXYZ"}
    assert [t for t, _ in hdr.tlvs] == [0x05, 0xE0, 0xE1, 0xE2, 0xE3]


def test_proxy_v2_partial_and_errors() -> None:
    h = encode_proxy_v2(("127.0.0.1", 1), ("127.0.0.1", 2), [(0xE0, b"x")])
    for i in range(len(h)):
        assert decode_proxy_v2(h[:i]) is None
    with pytest.raises(ProxyV2Error, match="signature"):
        decode_proxy_v2(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProxyV2Error, match="version"):
        decode_proxy_v2(SIGNATURE + b"\x11\x11\x00\x00")
    with pytest.raises(ProxyV2Error, match="command"):
        decode_proxy_v2(SIGNATURE + b"\x22\x11\x00\x00")
    with pytest.raises(ProxyV2Error, match="cannot hold"):
        decode_proxy_v2(SIGNATURE + b"\x21\x11\x00\x04" + b"\0" * 4)
    with pytest.raises(ProxyV2Error, match="truncated TLV"):
        decode_proxy_v2(SIGNATURE + b"\x21\x11\x00\x0e" + b"\0" * 14)
    with pytest.raises(ProxyV2Error, match="runs past"):
        decode_proxy_v2(SIGNATURE + b"\x21\x11\x00\x0f" + b"\0" * 12 + b"\xe0\x00\x09")
    with pytest.raises(ValueError, match="family"):
        encode_proxy_v2(("127.0.0.1", 1), ("::1", 2))
    local = decode_proxy_v2(SIGNATURE + b"\x20\x00\x00\x00")
    assert local is not None and local[0].command == 0 and local[0].src is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_proxy_v2_decoder_fuzz(tail: bytes) -> None:
    for data in (tail, SIGNATURE + tail):
        try:
            got = decode_proxy_v2(data)
        except ProxyV2Error:
            continue
        if got is not None:
            assert 16 <= got[1] <= len(data)


# ---- HTTP identity rewriter ----------------------------------------------------------------

IDENT = identity_headers(peer_ip="100.64.0.7", user_login="alice@example.com",
                         user_name="Alice", node_name="a.ts.net", node_id="n1")


def _heads(out: bytes) -> list[list[str]]:
    """The header lines of each request head in `out` (no bodies in these tests)."""
    return [h.split("\r\n") for h in out.decode("latin-1").split("\r\n\r\n") if h]


def test_rewriter_adds_and_strips() -> None:
    rw = RequestRewriter(IDENT)
    req = (b"GET /x HTTP/1.1\r\nHost: h\r\ntailscale-user-login: mallory@evil\r\n"
           b"X-Forwarded-For: 1.2.3.4\r\nTSNET2-NODE-NAME: fake\r\nForwarded: for=1.1.1.1\r\n"
           b"X-Real-IP: 9.9.9.9\r\nAccept: */*\r\n\r\n")
    out = rw.feed(req)
    assert not out.close and out.to_peer == b""
    (lines,) = _heads(out.to_target)
    assert lines == ["GET /x HTTP/1.1", "Host: h", "Accept: */*",
                     "Tailscale-User-Login: alice@example.com", "Tailscale-User-Name: Alice",
                     "Tsnet2-Node-Name: a.ts.net", "Tsnet2-Node-Id: n1",
                     "X-Forwarded-For: 100.64.0.7", "X-Forwarded-Proto: http",
                     "Forwarded: for=100.64.0.7;proto=http"]


def test_rewriter_pipelined_bytewise() -> None:
    reqs = (b"POST /a HTTP/1.1\r\nContent-Length: 5\r\nX-Forwarded-For: x\r\n\r\nhello"
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n0\r\nTailscale-User-Login: trailer-spoof\r\nX-T: 1\r\n\r\n"
            b"GET /c HTTP/1.0\r\n\r\n")
    whole = RequestRewriter(IDENT).feed(reqs).to_target
    rw = RequestRewriter(IDENT)
    pieces = b"".join(rw.feed(reqs[i:i + 1]).to_target for i in range(len(reqs)))
    assert pieces == whole
    assert rw.requests == 3
    assert whole.count(b"Tailscale-User-Login: alice@example.com") == 3
    assert b"trailer-spoof" not in whole and b"X-T: 1\r\n" in whole
    assert b"X-Forwarded-For: x" not in whole
    assert b"\r\n\r\nhello" in whole
    assert b"3;ext=1\r\nabc\r\n0\r\n" in whole


def test_rewriter_body_is_not_parsed_as_head() -> None:
    body = b"GET /evil HTTP/1.1\r\nTailscale-User-Login: x\r\n\r\n"
    req = b"PUT / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    out = RequestRewriter(IDENT).feed(req).to_target
    assert out.endswith(body)
    assert out.count(b"Tailscale-User-Login") == 2  # ours, and the body's (untouched)


def test_rewriter_expect_continue() -> None:
    rw = RequestRewriter(IDENT)
    out = rw.feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert b"Expect: 100-continue" in out.to_target
    assert rw.response(b"HTTP/1.1 100 Continue\r\n\r\n") == Rewrite()
    assert rw.feed(b"ok").to_target == b"ok"
    assert rw.feed(b"GET /next HTTP/1.1\r\n\r\n").to_target.startswith(b"GET /next")


UPGRADE = b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
SPOOF = b"GET /x HTTP/1.1\r\nTailscale-User-Login: mallory\r\n\r\n"


def test_rewriter_upgrade_switched_goes_raw() -> None:
    rw = RequestRewriter(IDENT)
    first = rw.feed(b"GET /a HTTP/1.1\r\n\r\n" + UPGRADE + b"\x81\x05hello")
    assert first.to_target.count(b"Tailscale-User-Login: alice") == 2
    assert first.to_target.endswith(b"\r\n\r\n")  # the frame waits for the answer
    assert rw.feed(b"more").to_target == b""
    # the answer to /a (chunked), then the 101, in odd pieces
    answers = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nHTTP/\r\n0\r\n"
               b"\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81")
    released = b"".join(rw.response(answers[i:i + 7]).to_target
                        for i in range(0, len(answers), 7))
    assert released == b"\x81\x05hellomore"
    assert rw.feed(SPOOF).to_target == SPOOF  # raw from now on: a websocket stream


def test_rewriter_upgrade_refused_stays_http() -> None:
    for answer in (b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno!",
                   b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n"):
        rw = RequestRewriter(IDENT)
        rw.feed(UPGRADE)
        assert rw.feed(SPOOF).to_target == b""
        out = rw.response(answer)
        assert not out.close
        assert b"mallory" not in out.to_target
        assert out.to_target.startswith(b"GET /x HTTP/1.1\r\n")
        assert b"Tailscale-User-Login: alice@example.com" in out.to_target
        assert b"mallory" not in rw.feed(SPOOF).to_target


def test_rewriter_connect_and_lost_tracking() -> None:
    rw = RequestRewriter(IDENT)
    rw.feed(b"CONNECT h:443 HTTP/1.1\r\n\r\nxyz")
    assert rw.response(b"HTTP/1.1 200 Connection established\r\n\r\n").to_target == b"xyz"
    # A response the daemon cannot follow (close-delimited): later upgrades count as refused.
    rw = RequestRewriter(IDENT)
    rw.feed(b"GET / HTTP/1.1\r\n\r\n")
    rw.response(b"HTTP/1.0 200 OK\r\n\r\nbody until close")
    rw.feed(UPGRADE)
    out = rw.response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert rw.feed(SPOOF).to_target != SPOOF
    assert out.to_target == b""
    # HEAD and 304 answers carry no body
    rw = RequestRewriter(IDENT)
    rw.feed(b"HEAD / HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\nIf-None-Match: x\r\n\r\n" + UPGRADE)
    got = rw.response(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
                      b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"
                      b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert got == Rewrite()
    assert rw.feed(SPOOF).to_target == SPOOF


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_rewriter_response_fuzz(data: bytes) -> None:
    rw = RequestRewriter(IDENT)
    rw.feed(b"GET / HTTP/1.1\r\n\r\n" + UPGRADE + SPOOF)
    out = rw.response(data)
    if out.to_target == SPOOF:  # released raw: only after a real 101 status line
        assert b" 101" in data
    else:
        assert b"mallory" not in out.to_target


def test_rewriter_oversized_head_431() -> None:
    rw = RequestRewriter(IDENT, max_head=1024)
    out = rw.feed(b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 2000)
    assert out.close and out.to_target == b""
    assert out.to_peer.startswith(b"HTTP/1.1 431 ")
    assert rw.feed(b"\r\n\r\n") .to_target == b""  # failed: nothing more goes on


@pytest.mark.parametrize("req", [
    b"GET / HTTP/1.1\r\nX : y\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: y\r\n folded\r\n\r\n",
    b"GET /  HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\n\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXX",
])
def test_rewriter_bad_request_400(req: bytes) -> None:
    out = RequestRewriter(IDENT).feed(req)
    assert out.close and out.to_peer.startswith(b"HTTP/1.1 400 "), out


def test_rewriter_http2_505() -> None:
    out = RequestRewriter(IDENT).feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert out.close and out.to_peer.startswith(b"HTTP/1.1 505 ")


def test_header_value_encoding() -> None:
    assert encode_header_value("Alice") == "Alice"
    enc = encode_header_value("Zoë Ünal")
    assert enc.isascii() and enc.startswith("=?utf-8?q?")
    assert decode_header_value(enc) == "Zoë Ünal"
    assert decode_header_value("plain") == "plain"
    v6 = dict(identity_headers(peer_ip="fd7a::1"))
    assert v6["Forwarded"] == 'for="[fd7a::1]";proto=http'
    assert "Tailscale-User-Login" not in v6


_names = st.sampled_from(["Host", "X-Forwarded-For", "tailscale-user-login", "Tsnet2-X",
                          "forwarded", "Accept", "X-A"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_names, st.text("abc xyz", max_size=8)), max_size=6),
       st.binary(max_size=20), st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_rewriter_fuzz_never_leaks_spoofed(headers: list[tuple[str, str]], body: bytes,
                                           cuts: list[int]) -> None:
    head = b"POST / HTTP/1.1\r\n" + b"".join(
        f"{n}: {v.strip()}\r\n".encode() for n, v in headers)
    req = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    data = req * 2
    rw = RequestRewriter(IDENT)
    out = bytearray()
    pos = 0
    for c in cuts * 10:
        out += rw.feed(data[pos:pos + c]).to_target
        pos += c
    out += rw.feed(data[pos:]).to_target
    expect = RequestRewriter(IDENT).feed(data).to_target
    assert bytes(out) == expect
    assert rw.requests == 2
    low = bytes(out).lower()
    assert low.count(b"\r\nx-forwarded-for:") == 2
    assert low.count(b"\r\ntailscale-user-login:") == 2
    assert b"tsnet2-x:" not in low


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_rewriter_fuzz_garbage(data: bytes) -> None:
    rw = RequestRewriter(IDENT, max_head=100)
    out = rw.feed(data)
    assert out.close or len(out.to_target) <= len(data) + 1000
    if out.close:
        assert out.to_peer.startswith(b"HTTP/1.1 4") or out.to_peer.startswith(b"HTTP/1.1 5")


# ---- forward sockets -----------------------------------------------------------------------


def test_check_forward_socket(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir()
    path = d / "app.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        me = os.geteuid()
        assert check_forward_socket(str(path), d, me) == ServeTarget(path=str(path))
        assert check_forward_socket(str(path), d, 0).path == str(path)
        with pytest.raises(ForwardError, match="belongs to uid"):
            check_forward_socket(str(path), d, me + 12345)
        with pytest.raises(ForwardError, match="not in the daemon's socket directory"):
            check_forward_socket(str(path), tmp_path, me)
        with pytest.raises(ForwardError, match="not in the daemon's socket directory"):
            check_forward_socket(str(d / ".." / "run" / "app.sock"), d, me)
        link = d / "link.sock"
        link.symlink_to(path)
        with pytest.raises(ForwardError, match="symlink"):
            check_forward_socket(str(link), d, me)
        plain = d / "file"
        plain.write_text("")
        with pytest.raises(ForwardError, match="not a Unix socket"):
            check_forward_socket(str(plain), d, me)
        with pytest.raises(ForwardError, match="No such file"):
            check_forward_socket(str(d / "gone.sock"), d, me)
        with pytest.raises(ForwardError, match="absolute"):
            check_forward_socket("app.sock", d, me)


# ---- the control-protocol extension and the library's helpers ------------------------------


def test_register_listener_extension_is_additive() -> None:
    from tsnet2.proto.methods import RegisterListenerParams, RegisterListenerResult

    old = RegisterListenerParams("tcp", ":80")
    assert old.to_json() == {"network": "tcp", "addr": ":80"}  # what the Go shim sends
    assert RegisterListenerParams.from_json({"network": "tcp", "addr": ":80"}) == old
    new = RegisterListenerParams("tcp", ":80", forward_socket="/run/x.sock")
    assert new.to_json() == {"network": "tcp", "addr": ":80", "forward_socket": "/run/x.sock",
                             "forward_mode": "tcp"}
    assert RegisterListenerParams.from_json(new.to_json()).forward_mode == "tcp"
    assert RegisterListenerResult("id", ":80").to_json() == {"listener_id": "id",
                                                            "addr": ":80"}
    assert RegisterListenerResult.from_json({"listener_id": "i", "addr": ":1"}) \
        .forward_socket == ""
    assert RegisterListenerResult.from_json(
        {"listener_id": "i", "addr": ":1", "forward_socket": "/s"}).forward_socket == "/s"


def test_forward_mode_checked(tmp_path: Path) -> None:
    from tsnet2.daemon.serve import forward_for

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "a.sock"))
        fwd = forward_for(str(tmp_path / "a.sock"), "", tmp_path, os.geteuid())
        assert fwd.mode == "tcp" and fwd.inode is not None
        assert forward_for(str(tmp_path / "a.sock"), "http+proxy", tmp_path, 0).mode \
            == "http+proxy"
        with pytest.raises(ForwardError, match="forward_mode 'gopher'"):
            forward_for(str(tmp_path / "a.sock"), "gopher", tmp_path, 0)


def test_identity_from_asgi_and_wsgi() -> None:
    import tsnet2

    headers = dict(identity_headers(peer_ip="100.64.0.9", user_login="bob@example.com",
                                    user_name="Zoë", node_name="b.ts.net", node_id="nB",
                                    tags=["tag:a", "tag:b"]))
    scope = {"type": "http",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    ident = tsnet2.identity_from_asgi_scope(scope)
    assert ident == tsnet2.CallerIdentity(peer_ip="100.64.0.9", user_login="bob@example.com",
                                          user_name="Zoë", node_name="b.ts.net",
                                          node_id="nB", tags=("tag:a", "tag:b"))
    environ = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()}
    environ["REMOTE_ADDR"] = ""
    assert tsnet2.identity_from_wsgi_environ(environ) == ident
    assert tsnet2.identity_from_asgi_scope({"type": "http", "headers": []}) is None
    assert tsnet2.identity_from_wsgi_environ({"HTTP_HOST": "x"}) is None


def test_listen_socket_checks_identity_first() -> None:
    import tsnet2

    with tsnet2.Server(socket_path="/nonexistent/tsnet2.sock") as srv, \
            pytest.raises(tsnet2.AddressError, match="identity='https'"):
        srv.listen_socket("tcp", ":80", identity="https")


def test_rule_http_proxy_mode() -> None:
    assert parse_serve_rule("80=http+proxy:127.0.0.1:8080").mode == "http+proxy"


def test_daemon_checks_forward_socket_before_the_node(tmp_path: Path) -> None:
    """The control route refuses a bad forward socket with its reason (no node needed)."""
    import asyncio

    from tsnet2 import proto
    from tsnet2.daemon.datapath import ListenError
    from tsnet2.daemon.server import Daemon, DaemonConfig, Session

    d = Daemon(DaemonConfig(socket_path=tmp_path / "s.sock", state_dir=tmp_path / "state",
                            traffic_log=str(tmp_path / "traffic.jsonl")))
    a, b = socket.socketpair()
    try:
        session = Session(a, proto.ControlServerCore())

        def call(params: dict[str, str]) -> object:
            req = proto.ControlRequest(1, "register_listener",
                                       {"network": "tcp", "addr": ":80", **params})
            return asyncio.run(d._call(req, session))

        with pytest.raises(ForwardError, match="not in the daemon's socket directory"):
            call({"forward_socket": "/elsewhere/x.sock", "forward_mode": "http"})
        with pytest.raises(ForwardError, match="No such file"):
            call({"forward_socket": str(tmp_path / "x.sock")})
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp_path / "x.sock"))
            # The socket passes; the node is not running, so the listener is refused there.
            with pytest.raises(ListenError, match="cannot listen") as info:
                call({"forward_socket": str(tmp_path / "x.sock"), "forward_mode": "proxy"})
            assert not isinstance(info.value, ForwardError)
    finally:
        a.close()
        b.close()
