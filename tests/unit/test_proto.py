"""Byte-exact tests of the sans-IO protocol core (seed-spec §2)."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable
from typing import Any

import pytest

from tsnet2 import proto
from tsnet2.proto import (
    MAX_CONTROL_LINE,
    MAX_HEADER_LINE,
    AcceptHeader,
    CertDomainsResult,
    ChannelKind,
    ControlClientCore,
    ControlRequest,
    ControlServerCore,
    DialReply,
    DialRequest,
    LineReader,
    LineTooLong,
    ListenAddr,
    LocalProtocolError,
    Method,
    RegisterListenerParams,
    RegisterListenerResult,
    RemoteProtocolError,
    Response,
    StartParams,
    TailscaleIPsResult,
    UnregisterListenerParams,
    UpResult,
    WireAddressError,
    WireError,
)


def b64(doc: bytes) -> str:
    return base64.b64encode(doc).decode()


START_JSON = (
    b'{"hostname":"a","control_url":"http://127.0.0.1:9/","auth_key":"tskey-x",'
    b'"ephemeral":true,"advertise_tags":["tag:a"]}'
)
START_PARAMS = {
    "hostname": "a",
    "control_url": "http://127.0.0.1:9/",
    "auth_key": "tskey-x",
    "ephemeral": True,
    "advertise_tags": ["tag:a"],
}

# --------------------------------------------------------------------------- channels


def test_channel_bytes_are_the_prototypes() -> None:
    assert [(k.name, k.value) for k in ChannelKind] == [
        ("CONTROL", 1),
        ("LOCALAPI", 2),
        ("DIAL", 3),
        ("ACCEPT", 4),
    ]
    assert ChannelKind.DIAL.byte == b"\x03"
    for b in range(1, 5):
        assert proto.parse_channel_byte(b) is ChannelKind(b)


@pytest.mark.parametrize("b", [0, 5, 0x10, 0x47, 0xFF])
def test_unknown_channel_byte(b: int) -> None:
    with pytest.raises(
        RemoteProtocolError, match=f"unknown channel byte 0x{b:02x}; expected 0x01-0x04"
    ):
        proto.parse_channel_byte(b)


def test_limits() -> None:
    assert MAX_CONTROL_LINE == 1 << 20
    assert MAX_HEADER_LINE == 4096


def _isort_key(name: str) -> tuple[int, str]:
    # ruff RUF022 ("isort-style"): CONSTANTS, then Classes, then functions, each A-Z.
    kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return kind, name


def test_all_is_sorted_and_complete() -> None:
    assert proto.__all__ == sorted(proto.__all__, key=_isort_key)
    for name in proto.__all__:
        assert hasattr(proto, name), name


# --------------------------------------------------------------------------- go_json

GO_JSON_CASES: list[tuple[Any, bytes]] = [
    ({}, b"{}"),
    ({"b": 1, "a": [True, None, "x"]}, b'{"b":1,"a":[true,null,"x"]}'),
    ("<a href='x'>&</a>", b"\"\\u003ca href='x'\\u003e\\u0026\\u003c/a\\u003e\""),
    ("caf\u00e9 \u65e5\u672c", '"caf\u00e9 \u65e5\u672c"'.encode()),
    ("\u2028\u2029", b'"\\u2028\\u2029"'),
    ("\x00\x01\x08\x0c\n\r\t\x1f\x7f", b'"\\u0000\\u0001\\b\\f\\n\\r\\t\\u001f\x7f"'),
    ('q"b\\', b'"q\\"b\\\\"'),
    ("\ud800x", '"\ufffdx"'.encode()),
    (-(2**63), b"-9223372036854775808"),
]


@pytest.mark.parametrize(("obj", "expected"), GO_JSON_CASES)
def test_go_json(obj: Any, expected: bytes) -> None:
    assert proto.go_json(obj) == expected


def test_go_json_rejects_nan() -> None:
    with pytest.raises(ValueError):
        proto.go_json(float("nan"))


# --------------------------------------------------------------------------- encoders

ENCODER_CASES: list[tuple[str, Callable[[], bytes], bytes]] = [
    (
        "start request",
        lambda: proto.encode_request(ControlRequest(1, "start", START_PARAMS)),
        b'{"id":1,"method":"start","params":"' + b64(START_JSON).encode() + b'"}\n',
    ),
    (
        "spec example start",
        lambda: proto.encode_request(ControlRequest(1, "start", {"hostname": "a"})),
        b'{"id":1,"method":"start","params":"eyJob3N0bmFtZSI6ImEifQ=="}\n',
    ),
    (
        "up request, no params",
        lambda: proto.encode_request(ControlRequest(7, "up")),
        b'{"id":7,"method":"up"}\n',
    ),
    ("id 0 omitted", lambda: proto.encode_request(ControlRequest(0, "up")), b'{"method":"up"}\n'),
    (
        "html escaped in params",
        lambda: proto.encode_request(ControlRequest(2, "x", {"a": "<>"})),
        b'{"id":2,"method":"x","params":"' + b64(b'{"a":"\\u003c\\u003e"}').encode() + b'"}\n',
    ),
    (
        "empty success",
        lambda: proto.encode_response(Response(1, {})),
        b'{"id":1,"result":"e30="}\n',
    ),
    (
        "None result is {}",
        lambda: proto.encode_response(Response(3)),
        b'{"id":3,"result":"e30="}\n',
    ),
    (
        "up result",
        lambda: proto.encode_response(
            Response(2, UpResult(("100.64.0.1", "fd7a:115c:a1e0::1"), "a", None).to_json())
        ),
        b'{"id":2,"result":"'
        + b64(
            b'{"tailscale_ips":["100.64.0.1","fd7a:115c:a1e0::1"],"node_name":"a","cert_domains":null}'
        ).encode()
        + b'"}\n',
    ),
    (
        "error reply",
        lambda: proto.encode_response(Response(4, None, 'daemon: unknown method "nope"')),
        b'{"id":4,"error":"daemon: unknown method \\"nope\\""}\n',
    ),
    ("server reply", lambda: ControlServerCore().reply(9, {}), b'{"id":9,"result":"e30="}\n'),
    (
        "server reply_error",
        lambda: ControlServerCore().reply_error(9, "boom"),
        b'{"id":9,"error":"boom"}\n',
    ),
    (
        "dial request",
        lambda: proto.encode_dial_request("tcp", "100.64.0.1:8080"),
        b'{"op":"dial","network":"tcp","addr":"100.64.0.1:8080"}\n',
    ),
    ("dial request, empty omitted", lambda: proto.encode_dial_request("", ""), b'{"op":"dial"}\n'),
    ("dial ok", lambda: proto.encode_dial_reply(True), b'{"ok":true}\n'),
    (
        "dial failed",
        lambda: proto.encode_dial_reply(False, "daemon: backend not started; call Start first"),
        b'{"ok":false,"err":"daemon: backend not started; call Start first"}\n',
    ),
    (
        "dial ok + additive addrs",
        lambda: proto.encode_dial_reply(
            True, local="100.64.0.2:40000", remote="[fd7a:115c:a1e0::1]:80"
        ),
        b'{"ok":true,"local":"100.64.0.2:40000","remote":"[fd7a:115c:a1e0::1]:80"}\n',
    ),
    (
        "accept request",
        lambda: proto.encode_accept_request("0123456789abcdef"),
        b'{"listener_id":"0123456789abcdef"}\n',
    ),
    (
        "accept header",
        lambda: proto.encode_accept_header(
            "0123456789abcdef", "100.64.0.1:8080", "100.64.0.2:40211"
        ),
        b'{"listener_id":"0123456789abcdef","local":"100.64.0.1:8080","remote":"100.64.0.2:40211"}\n',
    ),
]


@pytest.mark.parametrize(
    ("name", "encode", "expected"), ENCODER_CASES, ids=[c[0] for c in ENCODER_CASES]
)
def test_encoders_are_byte_exact(name: str, encode: Callable[[], bytes], expected: bytes) -> None:
    assert encode() == expected


# --------------------------------------------------------------------------- decoders

FRAME_CASES: list[tuple[bytes, ControlRequest | Response]] = [
    (
        b'{"id":1,"method":"start","params":"' + b64(START_JSON).encode() + b'"}',
        ControlRequest(1, "start", START_PARAMS),
    ),
    (
        b'{"id":1,"method":"start","params":' + START_JSON + b"}",
        ControlRequest(1, "start", START_PARAMS),
    ),
    (b'{"id":7,"method":"up"}', ControlRequest(7, "up", None)),
    (b'{"id":7,"method":"up","params":null}', ControlRequest(7, "up", None)),
    (b'{"id":7,"method":"up","params":""}', ControlRequest(7, "up", None)),
    # base64 of null
    (b'{"id":7,"method":"up","params":"bnVsbA=="}', ControlRequest(7, "up", None)),
    (b'{"method":"up"}', ControlRequest(0, "up", None)),
    (b'{"id":1,"result":"e30="}', Response(1, {}, None)),
    (b'{"id":1,"result":{"a":[1]}}', Response(1, {"a": [1]}, None)),
    (b'{"id":1}', Response(1, None, None)),
    (b'{"id":4,"error":"boom"}', Response(4, None, "boom")),
    (b'{"id":4,"error":"boom","result":"e30="}', Response(4, None, "boom")),
    (b'{"id":4,"error":"","result":"e30="}', Response(4, {}, None)),
    (b'{"id":18446744073709551615,"result":"e30=","extra":1}', Response(2**64 - 1, {}, None)),
    (b' {"id":1,"result":"e30="} \r', Response(1, {}, None)),
]


@pytest.mark.parametrize(("line", "expected"), FRAME_CASES)
def test_decode_frame(line: bytes, expected: ControlRequest | Response) -> None:
    assert proto.decode_frame(line) == expected
    assert proto.decode_frame(line + b"\n") == expected


BAD_FRAMES: list[tuple[bytes, str]] = [
    (b"", "invalid JSON"),
    (b"{", "invalid JSON"),
    (b"\xff\xfe", "invalid JSON"),
    (b"[1,2]", "expected a JSON object, got array"),
    (b'"x"', "expected a JSON object, got string"),
    (b"null", "expected a JSON object, got null"),
    (b'{"id":"1","method":"up"}', '"id" must be an integer'),
    (b'{"id":-1,"method":"up"}', '"id" must be an integer'),
    (b'{"id":1.5,"method":"up"}', '"id" must be an integer'),
    (b'{"id":true,"method":"up"}', '"id" must be an integer'),
    (b'{"id":18446744073709551616,"method":"up"}', '"id" must be an integer'),
    (b'{"id":1,"method":5}', '"method" must be a string'),
    (b'{"id":1,"method":""}', '"method" must not be empty'),
    (b'{"id":1,"method":"up","params":"!!!"}', "invalid base64"),
    (b'{"id":1,"method":"up","params":"e30"}', "invalid base64"),
    (b'{"id":1,"method":"up","params":"' + b64(b"{nope").encode() + b'"}', "invalid JSON"),
    (b'{"id":1,"method":"up","params":"' + b64(b"[1]").encode() + b'"}', "must be a JSON object"),
    (b'{"id":1,"method":"up","params":[1]}', "must be a JSON object"),
    (b'{"id":1,"method":"up","params":5}', "must be a JSON object"),
    (b'{"id":1,"result":true}', "must be a JSON object"),
    (b'{"id":1,"error":7}', '"error" must be a string'),
    (b'{"id":NaN}', "invalid JSON"),
    (b"[" * 100_000, "invalid JSON"),
]


@pytest.mark.parametrize(("line", "message"), BAD_FRAMES)
def test_decode_frame_rejects(line: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        proto.decode_frame(line)


def test_decode_frame_line_cap() -> None:
    with pytest.raises(LineTooLong):
        proto.decode_frame(b'{"id":1,"error":"' + b"x" * MAX_CONTROL_LINE + b'"}')


HEADER_DECODE_CASES: list[tuple[Callable[[bytes], object], bytes, object]] = [
    (
        proto.decode_dial_request,
        b'{"op":"dial","network":"tcp","addr":"a:1"}',
        DialRequest("dial", "tcp", "a:1"),
    ),
    (proto.decode_dial_request, b'{"op":"dial"}', DialRequest("dial", "", "")),
    (proto.decode_dial_reply, b'{"ok":true}', DialReply(True)),
    (proto.decode_dial_reply, b'{"ok":false,"err":"no route"}', DialReply(False, "no route")),
    (proto.decode_dial_reply, b"{}", DialReply(False)),
    (
        proto.decode_dial_reply,
        b'{"ok":true,"local":"100.64.0.2:4","remote":"100.64.0.1:80","future":1}',
        DialReply(True, "", "100.64.0.2:4", "100.64.0.1:80"),
    ),
    (proto.decode_accept_request, b'{"listener_id":"0123456789abcdef"}', "0123456789abcdef"),
    (
        proto.decode_accept_header,
        b'{"listener_id":"l","local":"100.64.0.1:80","remote":"[fd7a:115c:a1e0::2]:5"}',
        AcceptHeader("l", "100.64.0.1:80", "[fd7a:115c:a1e0::2]:5"),
    ),
]


@pytest.mark.parametrize(("decode", "line", "expected"), HEADER_DECODE_CASES)
def test_decode_headers(decode: Callable[[bytes], object], line: bytes, expected: object) -> None:
    assert decode(line) == expected
    assert decode(line + b"\n") == expected


BAD_HEADERS: list[tuple[Callable[[bytes], object], bytes, str]] = [
    (proto.decode_dial_request, b'{"op":"listen"}', "unknown op"),
    (proto.decode_dial_request, b"{}", "unknown op"),
    (proto.decode_dial_request, b'{"op":"dial","addr":5}', '"addr" must be a string'),
    (proto.decode_dial_request, b"dial tcp a:1", "invalid JSON"),
    (proto.decode_dial_reply, b'{"ok":"yes"}', '"ok" must be a boolean'),
    (proto.decode_dial_reply, b'{"ok":false,"err":{}}', '"err" must be a string'),
    (proto.decode_dial_reply, b"[]", "expected a JSON object"),
    (proto.decode_accept_request, b"{}", "missing or empty"),
    (proto.decode_accept_request, b'{"listener_id":""}', "missing or empty"),
    (proto.decode_accept_request, b'{"listener_id":1}', "must be a string"),
    (proto.decode_accept_header, b'{"listener_id":"l","local":1}', '"local" must be a string'),
    (proto.decode_accept_header, b"\x00", "invalid JSON"),
    (
        proto.decode_accept_header,
        b'{"listener_id":"' + b"a" * MAX_HEADER_LINE + b'"}',
        "longer than",
    ),
]


@pytest.mark.parametrize(("decode", "line", "message"), BAD_HEADERS)
def test_decode_headers_reject(
    decode: Callable[[bytes], object], line: bytes, message: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode(line)


def test_encoders_refuse_bad_values() -> None:
    with pytest.raises(LocalProtocolError):
        proto.encode_request(ControlRequest(1, ""))
    with pytest.raises(LocalProtocolError):
        proto.encode_request(ControlRequest(-1, "up"))
    with pytest.raises(LocalProtocolError):
        proto.encode_response(Response(1, {}, "both"))
    with pytest.raises(LocalProtocolError):
        proto.encode_response(Response(1, None, ""))
    with pytest.raises(LocalProtocolError):
        proto.encode_dial_reply(False)
    with pytest.raises(LocalProtocolError):
        proto.encode_accept_request("")
    with pytest.raises(LocalProtocolError, match="exceeds 4096"):
        proto.encode_dial_request("tcp", "h" * MAX_HEADER_LINE + ":1")
    with pytest.raises(LocalProtocolError, match="exceeds"):
        proto.encode_response(Response(1, {"x": "y" * MAX_CONTROL_LINE}))


# --------------------------------------------------------------------------- LineReader


def feed_whole(reader: LineReader, data: bytes) -> list[bytes]:
    reader.feed(data)
    out = []
    while (line := reader.next_line()) is not None:
        out.append(line)
    return out


def feed_bytewise(reader: LineReader, data: bytes) -> list[bytes]:
    out = []
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        while (line := reader.next_line()) is not None:
            out.append(line)
    return out


@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
def test_line_reader_lines(feed: Callable[[LineReader, bytes], list[bytes]]) -> None:
    r = LineReader(8)
    assert feed(r, b"a\n\nbcd\n12345678\nrest") == [b"a", b"", b"bcd", b"12345678"]
    assert r.take_rest() == b"rest"
    assert r.buffered == 0
    assert not r.eof
    r.feed(b"")
    assert r.eof
    assert r.next_line() is None


def test_line_reader_too_long_raises_at_feed_without_newline() -> None:
    r = LineReader(8)
    r.feed(b"12345678")  # exactly the limit, still waiting for "\n"
    assert r.next_line() is None
    with pytest.raises(LineTooLong, match="longer than 8 bytes"):
        r.feed(b"9")
    with pytest.raises(LineTooLong):  # stays failed
        r.next_line()
    assert r.buffered == 0


def test_line_reader_too_long_even_with_newline_in_same_chunk() -> None:
    r = LineReader(8)
    with pytest.raises(LineTooLong):
        r.feed(b"123456789\n")


def test_line_reader_later_lines_checked_when_current() -> None:
    r = LineReader(4)
    r.feed(b"ab\n" + b"x" * 10)  # a header followed by raw stream bytes is fine
    assert r.next_line() == b"ab"
    with pytest.raises(LineTooLong):
        r.next_line()


def test_line_reader_header_then_stream() -> None:
    r = LineReader(MAX_HEADER_LINE)
    stream = bytes(range(256)) * 200  # 51 KiB with newlines in it
    r.feed(b'{"ok":true}\n' + stream)
    assert r.next_line() == b'{"ok":true}'
    assert r.take_rest() == stream


def test_line_reader_eof_mid_line() -> None:
    r = LineReader(16)
    r.feed(b"done\npart")
    r.feed(b"")
    assert not r.eof  # a full line is still there
    assert r.next_line() == b"done"
    assert r.eof
    with pytest.raises(RemoteProtocolError, match="connection closed mid-line"):
        r.next_line()
    with pytest.raises(LocalProtocolError):
        r.feed(b"more")


def test_line_reader_scans_each_byte_once() -> None:
    # 16384 feeds of 64 bytes build a 1 MiB line. Rescanning the buffer on every feed
    # would touch ~8.6 GB; scanning each byte once takes milliseconds.
    import time

    r = LineReader(MAX_CONTROL_LINE)
    chunk = b"x" * 64
    start = time.monotonic()
    for _ in range(MAX_CONTROL_LINE // 64 - 1):
        r.feed(chunk)
        assert r.next_line() is None
    r.feed(b"x" * 63 + b"\n")
    assert r.next_line() == b"x" * (MAX_CONTROL_LINE - 1)
    assert time.monotonic() - start < 3.0


# --------------------------------------------------------------------------- control cores


def test_client_core_ids_and_out_of_order_replies() -> None:
    c = ControlClientCore()
    id1, data1 = c.request("start", {"hostname": "a"})
    id2, data2 = c.request(Method.UP)
    id3, _ = c.request("cert_domains")
    assert (id1, id2, id3) == (1, 2, 3)
    assert data2 == b'{"id":2,"method":"up"}\n'
    assert proto.decode_frame(data1) == ControlRequest(1, "start", {"hostname": "a"})
    assert c.pending == {1, 2, 3}
    srv = ControlServerCore()
    replies = srv.reply(3, {"domains": None}) + srv.reply_error(1, "no") + srv.reply(99, {})
    assert c.receive_data(replies) == [Response(3, {"domains": None}), Response(1, None, "no")]
    assert c.pending == {2}


@pytest.mark.parametrize("bytewise", [False, True])
def test_client_core_ignores_notifications_and_requests(bytewise: bool) -> None:
    c = ControlClientCore()
    c.request("up")
    data = b'{"result":"e30="}\n{"id":1,"method":"ping"}\n\n{"id":1,"result":"e30="}\n'
    got: list[Response] = []
    if bytewise:
        for i in range(len(data)):
            got += c.receive_data(data[i : i + 1])
    else:
        got = c.receive_data(data)
    assert got == [Response(1, {})]
    assert c.pending == frozenset()


def test_client_core_cancel_drops_late_reply() -> None:
    c = ControlClientCore()
    id_, _ = c.request("up")
    c.cancel(id_)
    assert c.pending == frozenset()
    assert c.receive_data(b'{"id":1,"result":"e30="}\n') == []
    c.cancel(12345)  # unknown ids are fine


def test_client_core_eof_and_bad_frame_keep_pending() -> None:
    c = ControlClientCore()
    c.request("a")
    c.request("b")
    with pytest.raises(RemoteProtocolError, match="invalid JSON"):
        c.receive_data(b'{"id":1,"result":"e30="}\n{oops\n')
    assert c.pending == {1, 2}  # nothing silently lost: the caller fails them all
    c2 = ControlClientCore()
    c2.request("a")
    with pytest.raises(RemoteProtocolError, match="closed by the daemon"):
        c2.receive_data(b"")
    assert c2.pending == {1}


def test_server_core_requests_errors_and_continue() -> None:
    s = ControlServerCore()
    data = (
        proto.encode_request(ControlRequest(1, "start", START_PARAMS))
        + b"not json\n"
        + b'{"id":5,"result":"e30="}\n'
        + b'{"id":2,"method":"up","params":{"x":1}}\n'
    )
    items = s.receive_data(data)
    assert items[0] == ControlRequest(1, "start", START_PARAMS)
    assert isinstance(items[1], RemoteProtocolError)
    assert isinstance(items[2], RemoteProtocolError) and "got a reply" in str(items[2])
    assert items[3] == ControlRequest(2, "up", {"x": 1})
    assert s.receive_data(b"") == []
    assert s.eof


def test_server_core_bytewise_equals_whole() -> None:
    data = b"".join(data for _, _, data in _frames()) + b"junk\n"
    whole = ControlServerCore().receive_data(data)
    s = ControlServerCore()
    bytewise: list[ControlRequest | WireError] = []
    for i in range(len(data)):
        bytewise += s.receive_data(data[i : i + 1])
    assert [repr(x) for x in whole] == [repr(x) for x in bytewise]
    assert len(whole) == 4


def _frames() -> list[tuple[int, str, bytes]]:
    c = ControlClientCore()
    out = []
    for method, params in [
        ("start", START_PARAMS),
        ("up", None),
        ("register_listener", {"network": "tcp", "addr": ":80"}),
    ]:
        id_, data = c.request(method, params)
        out.append((id_, method, data))
    return out


def test_server_core_too_long_is_fatal() -> None:
    s = ControlServerCore()
    with pytest.raises(LineTooLong):
        s.receive_data(b"x" * (MAX_CONTROL_LINE + 1))
    s2 = ControlServerCore()
    with pytest.raises(RemoteProtocolError, match="mid-line"):
        s2.receive_data(b'{"id":1')
        s2.receive_data(b"")


def test_round_trip_through_cores() -> None:
    client, server = ControlClientCore(), ControlServerCore()
    _, data = client.request(
        Method.REGISTER_LISTENER, RegisterListenerParams("tcp", ":8080").to_json()
    )
    (req,) = server.receive_data(data)
    assert isinstance(req, ControlRequest)
    params = RegisterListenerParams.from_json(req.params or {})
    assert params == RegisterListenerParams("tcp", ":8080")
    reply = server.reply(req.id, RegisterListenerResult("0011223344556677", ":8080").to_json())
    (resp,) = client.receive_data(reply)
    assert RegisterListenerResult.from_json(resp.result or {}) == RegisterListenerResult(
        "0011223344556677", ":8080"
    )


# --------------------------------------------------------------------------- methods


def test_method_names() -> None:
    assert [m.value for m in Method] == [
        "start",
        "up",
        "close",
        "tailscale_ips",
        "cert_domains",
        "register_listener",
        "unregister_listener",
        "register_fallback_tcp",
        "unregister_fallback_tcp",
    ]
    assert proto.go_json({"m": Method.UP}) == b'{"m":"up"}'


TYPED_CASES: list[tuple[Any, bytes]] = [
    (
        StartParams("a", "http://127.0.0.1:9/", "tskey-x", True, ("tag:a",)),
        START_JSON,
    ),
    (
        StartParams(),
        b'{"hostname":"","control_url":"","auth_key":"","ephemeral":false,"advertise_tags":null}',
    ),
    (
        UpResult(("100.64.0.1",), "a", ("a.ts.net",)),
        b'{"tailscale_ips":["100.64.0.1"],"node_name":"a","cert_domains":["a.ts.net"]}',
    ),
    (UpResult(), b'{"tailscale_ips":null,"node_name":"","cert_domains":null}'),
    (
        TailscaleIPsResult("100.64.0.1", "fd7a:115c:a1e0::1"),
        b'{"v4":"100.64.0.1","v6":"fd7a:115c:a1e0::1"}',
    ),
    (TailscaleIPsResult(), b"{}"),
    (CertDomainsResult(None), b'{"domains":null}'),
    (CertDomainsResult(("a.b",)), b'{"domains":["a.b"]}'),
    (RegisterListenerParams("tcp4", "0.0.0.0:0"), b'{"network":"tcp4","addr":"0.0.0.0:0"}'),
    (
        RegisterListenerResult("0011223344556677", ":10003"),
        b'{"listener_id":"0011223344556677","addr":":10003"}',
    ),
    (UnregisterListenerParams("0011223344556677"), b'{"listener_id":"0011223344556677"}'),
]


@pytest.mark.parametrize(("value", "expected"), TYPED_CASES)
def test_typed_params_round_trip(value: Any, expected: bytes) -> None:
    assert proto.go_json(value.to_json()) == expected
    assert type(value).from_json(value.to_json()) == value


def test_typed_decode_tolerates_missing_and_rejects_wrong_types() -> None:
    assert StartParams.from_json({}) == StartParams()
    assert StartParams.from_json({"hostname": "h", "new_key": 1}) == StartParams(hostname="h")
    assert UpResult.from_json({"tailscale_ips": None}) == UpResult()
    assert TailscaleIPsResult.from_json({"v4": "1.2.3.4"}) == TailscaleIPsResult("1.2.3.4", None)
    for cls, doc in [
        (StartParams, {"ephemeral": "yes"}),
        (StartParams, {"advertise_tags": "tag:a"}),
        (StartParams, {"advertise_tags": [1]}),
        (UpResult, {"node_name": 3}),
        (RegisterListenerParams, {"network": None, "addr": 80}),
        (CertDomainsResult, {"domains": {}}),
    ]:
        with pytest.raises(RemoteProtocolError):
            cls.from_json(doc)  # type: ignore[attr-defined]


def test_start_params_repr_hides_auth_key() -> None:
    assert "tskey-secret" not in repr(StartParams(auth_key="tskey-secret"))


# --------------------------------------------------------------------------- the method table


def test_method_table_holds_every_method_the_daemon_answers() -> None:
    assert list(proto.METHODS) == [m for m in Method if not m.endswith("_fallback_tcp")]
    for name, spec in proto.METHODS.items():
        assert spec.method == name and proto.method_spec(str(name)) is spec
    takes_none = [m for m, spec in proto.METHODS.items() if not spec.sends_params]
    assert takes_none == [Method.UP, Method.CLOSE, Method.TAILSCALE_IPS, Method.CERT_DOMAINS]


def _b64_frame(prefix: str, key: str, doc: bytes) -> bytes:
    return f'{prefix},"{key}":"{b64(doc)}"}}\n'.encode()


# method, params, request bytes, result, reply bytes: one exchange per method, as both ends
# see it through the table (the start, up and register_listener bytes are docs/protocol.md's).
WIRE_CASES: list[tuple[Method, Any, bytes, Any, bytes]] = [
    (
        Method.START,
        StartParams("tsnet2-a", "http://127.0.0.1:8080", "", True, None),
        b'{"id":1,"method":"start","params":"eyJob3N0bmFtZSI6InRzbmV0Mi1hIiwiY29udHJvbF91cmwi'
        b"OiJodHRwOi8vMTI3LjAuMC4xOjgwODAiLCJhdXRoX2tleSI6IiIsImVwaGVtZXJhbCI6dHJ1ZSwiYWR2ZXJ0"
        b'aXNlX3RhZ3MiOm51bGx9"}\n',
        proto.Empty(),
        b'{"id":1,"result":"e30="}\n',
    ),
    (
        Method.UP,
        None,
        b'{"id":1,"method":"up"}\n',
        UpResult(("100.64.0.1", "fd7a:115c:a1e0::1"), "tsnet2-a", ("tsnet2-a.tail-scale.ts.net",)),
        b'{"id":1,"result":"eyJ0YWlsc2NhbGVfaXBzIjpbIjEwMC42NC4wLjEiLCJmZDdhOjExNWM6YTFlMDo6MSJd'
        b"LCJub2RlX25hbWUiOiJ0c25ldDItYSIsImNlcnRfZG9tYWlucyI6WyJ0c25ldDItYS50YWlsLXNjYWxlLnRz"
        b'Lm5ldCJdfQ=="}\n',
    ),
    (
        Method.CLOSE,
        None,
        b'{"id":1,"method":"close"}\n',
        proto.Empty(),
        b'{"id":1,"result":"e30="}\n',
    ),
    (
        Method.TAILSCALE_IPS,
        None,
        b'{"id":1,"method":"tailscale_ips"}\n',
        TailscaleIPsResult("100.64.0.1", None),
        _b64_frame('{"id":1', "result", b'{"v4":"100.64.0.1"}'),
    ),
    (
        Method.CERT_DOMAINS,
        None,
        b'{"id":1,"method":"cert_domains"}\n',
        CertDomainsResult(None),
        _b64_frame('{"id":1', "result", b'{"domains":null}'),
    ),
    (
        Method.REGISTER_LISTENER,
        RegisterListenerParams("tcp", ":8080"),
        b'{"id":1,"method":"register_listener","params":"eyJuZXR3b3JrIjoidGNwIiwiYWRkciI6Ijo4'
        b'MDgwIn0="}\n',
        RegisterListenerResult("3a1b5c7d9e0f1a2b", ":8080"),
        b'{"id":1,"result":"eyJsaXN0ZW5lcl9pZCI6IjNhMWI1YzdkOWUwZjFhMmIiLCJhZGRyIjoiOjgwODAifQ=="}\n',
    ),
    (
        Method.UNREGISTER_LISTENER,
        UnregisterListenerParams("3a1b5c7d9e0f1a2b"),
        _b64_frame(
            '{"id":1,"method":"unregister_listener"',
            "params",
            b'{"listener_id":"3a1b5c7d9e0f1a2b"}',
        ),
        proto.Empty(),
        b'{"id":1,"result":"e30="}\n',
    ),
]


@pytest.mark.parametrize(
    ("method", "params", "request_line", "result", "reply_line"),
    WIRE_CASES,
    ids=[c[0].value for c in WIRE_CASES],
)
def test_every_method_through_the_table(
    method: Method, params: Any, request_line: bytes, result: Any, reply_line: bytes
) -> None:
    client, server = ControlClientCore(), ControlServerCore()
    _, data = client.request(method, proto.encode_params(method, params))
    assert data == request_line
    (req,) = server.receive_data(data)
    assert isinstance(req, ControlRequest)
    assert proto.decode_params(req.method, req.params) == (params or proto.Empty())
    reply = server.reply(req.id, proto.encode_result(req.method, result))
    assert reply == reply_line
    (resp,) = client.receive_data(reply)
    assert proto.decode_result(method, resp.result) == result


# What tsnet2d has always answered for bad params (the daemon prefixes "daemon: "), and the
# order it checks start's keys in.
PARAMS_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("start", {"hostname": 1}, "parameter 'hostname' must be a string"),
    (
        "start",
        {"control_url": [], "advertise_tags": "tag:a"},
        "advertise_tags must be a list of strings",
    ),
    ("start", {"advertise_tags": [1]}, "advertise_tags must be a list of strings"),
    ("start", {"control_url": 1, "auth_key": 2}, "parameter 'control_url' must be a string"),
    ("start", {"auth_key": {}}, "parameter 'auth_key' must be a string"),
    ("start", {"ephemeral": "yes"}, "parameter 'ephemeral' must be a boolean"),
    ("start", {"ephemeral": 1}, "parameter 'ephemeral' must be a boolean"),
    ("start", {"advertise_tags": ""}, "advertise_tags must be a list of strings"),
    ("register_listener", {"network": 5}, "parameter 'network' must be a string"),
    ("register_listener", {"network": "tcp", "addr": 80}, "parameter 'addr' must be a string"),
    ("unregister_listener", {"listener_id": 3}, "parameter 'listener_id' must be a string"),
]


@pytest.mark.parametrize(("method", "doc", "message"), PARAMS_ERRORS)
def test_bad_params_say_what_the_daemon_always_said(
    method: str, doc: dict[str, Any], message: str
) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        proto.decode_params(method, doc)
    assert str(info.value) == message


def test_params_zero_values_and_methods_that_take_none() -> None:
    assert proto.decode_params("start", None) == StartParams()
    assert proto.decode_params("start", {"advertise_tags": None, "x": 1}) == StartParams()
    assert proto.decode_params("register_listener", {}) == RegisterListenerParams("", "")
    for method in (Method.UP, Method.CLOSE, Method.TAILSCALE_IPS, Method.CERT_DOMAINS):
        assert proto.encode_params(method) is None
        assert proto.encode_params(method, proto.Empty()) is None
        # Whatever params arrive are ignored, as tsnet2d always did.
        assert proto.decode_params(method, {"hostname": 1}) == proto.Empty()
        with pytest.raises(LocalProtocolError, match="takes no params"):
            proto.encode_params(method, StartParams())
    for method, bad in [
        (Method.START, None),
        (Method.START, UpResult()),
        (Method.REGISTER_LISTENER, UnregisterListenerParams("x")),
    ]:
        with pytest.raises(LocalProtocolError, match="params must be a"):
            proto.encode_params(method, bad)
    with pytest.raises(LocalProtocolError, match="result must be a UpResult"):
        proto.encode_result("up", proto.Empty())


def test_results_zero_values_and_bad_types() -> None:
    assert proto.decode_result(Method.UP, None) == UpResult()
    assert proto.decode_result(Method.START, {"anything": 1}) == proto.Empty()
    assert proto.decode_result("tailscale_ips", {"v6": "fd7a::1", "v5": 1}) == (
        TailscaleIPsResult(None, "fd7a::1")
    )
    with pytest.raises(RemoteProtocolError, match='up result: "node_name" must be a string'):
        proto.decode_result(Method.UP, {"node_name": 1})


@pytest.mark.parametrize(
    "name", ["frobnicate", "register_fallback_tcp", "unregister_fallback_tcp", "", "Start"]
)
def test_unknown_methods(name: str) -> None:
    for call in (
        lambda: proto.decode_params(name, {}),
        lambda: proto.decode_result(name, {}),
        lambda: proto.encode_params(name, None),
        lambda: proto.encode_result(name, proto.Empty()),
        lambda: proto.method_spec(name),
    ):
        with pytest.raises(proto.UnknownMethodError) as info:
            call()
        assert str(info.value) == f'unknown method "{name}"' and info.value.method == name
        assert isinstance(info.value, RemoteProtocolError)


# --------------------------------------------------------------------------- addresses

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address

LISTEN_OK: list[tuple[str, str, ListenAddr]] = [
    ("tcp", ":8080", ListenAddr("tcp", None, 8080)),
    ("tcp", ":0", ListenAddr("tcp", None, 0)),
    ("tcp", "0.0.0.0:80", ListenAddr("tcp", None, 80)),
    ("tcp", "[::]:80", ListenAddr("tcp", None, 80)),
    ("tcp", "100.64.0.1:65535", ListenAddr("tcp", V4("100.64.0.1"), 65535)),
    ("tcp", "[fd7a:115c:a1e0::1]:443", ListenAddr("tcp", V6("fd7a:115c:a1e0::1"), 443)),
    ("tcp4", "100.64.0.1:1", ListenAddr("tcp4", V4("100.64.0.1"), 1)),
    ("tcp4", "0.0.0.0:1", ListenAddr("tcp4", None, 1)),
    ("tcp4", "[::ffff:100.64.0.1]:1", ListenAddr("tcp4", V4("100.64.0.1"), 1)),
    ("tcp6", "[::1]:80", ListenAddr("tcp6", V6("::1"), 80)),
    ("tcp6", ":80", ListenAddr("tcp6", None, 80)),
    ("tcp", "[1.2.3.4]:5", ListenAddr("tcp", V4("1.2.3.4"), 5)),
]


@pytest.mark.parametrize(("network", "addr", "expected"), LISTEN_OK)
def test_parse_listen_addr(network: str, addr: str, expected: ListenAddr) -> None:
    assert proto.parse_listen_addr(network, addr) == expected


LISTEN_BAD: list[tuple[str, str, str]] = [
    ("udp", ":53", 'unsupported network "udp"'),
    ("", ":80", "unsupported network"),
    ("tcp", "8080", "missing port"),
    ("tcp", ":http", "bad port"),
    ("tcp", ":65536", "bad port"),
    ("tcp", ":-1", "bad port"),
    ("tcp", ": 80", "bad port"),
    ("tcp", ":0x50", "bad port"),
    ("tcp", ":", "bad port"),
    ("tcp", ":\u0661\u0662", "bad port"),  # Arabic-Indic digits are not decimal ASCII
    ("tcp", "::1:80", "too many colons"),
    ("tcp", "[::1:80", "missing ']'"),
    ("tcp", "[::1]80", "missing port"),
    ("tcp", "localhost:80", "not an IP address"),
    ("tcp4", "[::1]:80", "tcp4 needs an IPv4 host"),
    ("tcp4", "[::]:80", "tcp4 needs an IPv4 host"),
    ("tcp6", "1.2.3.4:80", "tcp6 needs an IPv6 host"),
    ("tcp6", "0.0.0.0:80", "tcp6 needs an IPv6 host"),
]


@pytest.mark.parametrize(("network", "addr", "message"), LISTEN_BAD)
def test_parse_listen_addr_rejects(network: str, addr: str, message: str) -> None:
    with pytest.raises(WireAddressError, match=message) as info:
        proto.parse_listen_addr(network, addr)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, WireError)


def test_split_host_port_and_format_addr() -> None:
    assert proto.split_host_port("peer:8080") == ("peer", 8080)
    assert proto.split_host_port("peer.tail-scale.ts.net.:1") == ("peer.tail-scale.ts.net.", 1)
    assert proto.split_host_port("[fd7a:115c:a1e0::1]:80") == ("fd7a:115c:a1e0::1", 80)
    assert proto.split_host_port(":0") == ("", 0)
    for bad in ["peer", "peer:", "a:b:c", "[x]y:1", "peer:99999", "]:1"]:
        with pytest.raises(WireAddressError):
            proto.split_host_port(bad)
    assert proto.format_addr(V4("100.64.0.1"), 80) == "100.64.0.1:80"
    assert proto.format_addr("fd7a:115c:a1e0::1", 80) == "[fd7a:115c:a1e0::1]:80"
    assert proto.format_addr(V6("::1"), 0) == "[::1]:0"
    for host, port in [("1.2.3.4", 5), ("::1", 65535), ("fe80::1%eth0", 22)]:
        assert proto.split_host_port(proto.format_addr(host, port)) == (host, port)


def test_new_id() -> None:
    ids = {proto.new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(proto.ID_RE.fullmatch(i) for i in ids)


def test_go_time() -> None:
    import datetime as dt

    assert proto.go_time(None) == "0001-01-01T00:00:00Z"
    assert (
        proto.go_time(dt.datetime(2026, 5, 19, 16, 6, 10, 123450)) == "2026-05-19T16:06:10.12345Z"
    )
    tz = dt.timezone(dt.timedelta(hours=2))
    assert proto.go_time(dt.datetime(2026, 5, 19, 18, 6, 10, tzinfo=tz)) == "2026-05-19T16:06:10Z"
    assert proto.go_time_ns(1_779_206_770_000_000_001) == "2026-05-19T16:06:10.000000001Z"
    assert proto.go_time_ns(1_779_206_770_100_000_000) == "2026-05-19T16:06:10.1Z"
