"""Property tests: the protocol core never fails with anything but WireError, stays
bounded in memory, and its encoders and decoders round-trip."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsnet2 import proto
from tsnet2.proto import (
    MAX_HEADER_LINE,
    ControlClientCore,
    ControlRequest,
    ControlServerCore,
    LineReader,
    LineTooLong,
    RemoteProtocolError,
    Response,
    WireAddressError,
    WireError,
)

settings.register_profile(
    "proto", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("proto")

# JSON values as json.loads returns them (no NaN/Infinity, no lone surrogates).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


@st.composite
def split_points(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut into consecutive chunks at arbitrary points."""
    if not data:
        return []
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=12)))
    out, prev = [], 0
    for c in [*cuts, len(data)]:
        if c > prev:
            out.append(data[prev:c])
            prev = c
    return out


def chunked(
    data_strategy: st.SearchStrategy[bytes],
) -> st.SearchStrategy[tuple[bytes, list[bytes]]]:
    return data_strategy.flatmap(lambda d: st.tuples(st.just(d), split_points(d)))


# Lines that look a lot like protocol traffic, plus noise.
frame_lines = st.one_of(
    st.builds(
        lambda i, m, p: proto.encode_request(ControlRequest(i, m, p)).rstrip(b"\n"),
        st.integers(0, 2**64 - 1),
        st.text(min_size=1, max_size=10),
        st.none() | json_objects,
    ),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(
        lambda v, k: json.dumps(
            {"id": 1, k: base64.b64encode(json.dumps(v).encode()).decode()}
        ).encode(),
        json_values,
        st.sampled_from(["params", "result"]),
    ),
    st.builds(lambda d: json.dumps({"id": 1, "method": "m", **d}).encode(), json_objects),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
)
streams = st.lists(frame_lines, max_size=8).map(lambda ls: b"\n".join(ls) + b"\n") | st.binary(
    max_size=300
)


def reference_lines(
    data: bytes, max_line: int, eof: bool
) -> tuple[list[bytes], type[Exception] | None]:
    """What a correct bounded line reader returns for ``data`` (and which error ends it)."""
    *complete, tail = data.split(b"\n")
    out = []
    for line in complete:
        if len(line) > max_line:
            return out, LineTooLong
        out.append(line)
    if len(tail) > max_line:
        return out, LineTooLong
    if eof and tail:
        return out, RemoteProtocolError
    return out, None


@given(chunked(st.binary(max_size=200) | streams), st.integers(1, 40), st.booleans())
def test_line_reader_matches_reference_and_stays_bounded(
    case: tuple[bytes, list[bytes]], max_line: int, eof: bool
) -> None:
    data, parts = case
    r = LineReader(max_line)
    got: list[bytes] = []
    error: type[Exception] | None = None
    try:
        for part in parts + ([b""] if eof else []):
            r.feed(part)
            assert r.buffered <= max_line + len(part) + max_line  # remainder + this chunk
            while (line := r.next_line()) is not None:
                got.append(line)
            assert r.buffered <= max_line  # drained: at most one partial line remains
    except WireError as e:
        error = type(e)
    expected, expected_error = reference_lines(data, max_line, eof)
    assert got == expected
    assert error is expected_error
    if error is None and eof:
        assert r.eof


@given(chunked(streams))
def test_server_core_only_protocol_errors(case: tuple[bytes, list[bytes]]) -> None:
    _, parts = case
    core = ControlServerCore()
    try:
        for part in [*parts, b""]:
            for item in core.receive_data(part):
                assert isinstance(item, ControlRequest | RemoteProtocolError)
                if isinstance(item, ControlRequest):
                    assert item.params is None or isinstance(item.params, dict)
            assert core.buffered <= proto.MAX_CONTROL_LINE
    except WireError:
        pass


@given(chunked(streams), st.integers(0, 5))
def test_client_core_only_protocol_errors(case: tuple[bytes, list[bytes]], n_requests: int) -> None:
    _, parts = case
    core = ControlClientCore()
    ids = {core.request("m")[0] for _ in range(n_requests)}
    seen: set[int] = set()
    try:
        for part in parts:
            for resp in core.receive_data(part):
                assert isinstance(resp, Response)
                assert resp.id in ids and resp.id not in seen
                seen.add(resp.id)
    except WireError:
        pass
    assert core.pending | seen == ids


DECODERS: list[Callable[[bytes], object]] = [
    proto.decode_frame,
    proto.decode_dial_request,
    proto.decode_dial_reply,
    proto.decode_accept_request,
    proto.decode_accept_header,
]


@given(st.sampled_from(DECODERS), st.binary(max_size=200) | frame_lines)
def test_decoders_raise_only_remote_protocol_errors(
    decode: Callable[[bytes], object], line: bytes
) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode(line)


@given(
    st.sampled_from(DECODERS),
    st.dictionaries(
        st.sampled_from(
            [
                "id",
                "method",
                "params",
                "result",
                "error",
                "op",
                "network",
                "addr",
                "ok",
                "err",
                "listener_id",
                "local",
                "remote",
            ]
        ),
        json_values,
        max_size=5,
    ),
)
def test_decoders_on_near_miss_objects(
    decode: Callable[[bytes], object], obj: dict[str, Any]
) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode(json.dumps(obj).encode())


@given(st.integers(0, 2**64 - 1), st.text(min_size=1, max_size=30), st.none() | json_objects)
def test_request_round_trip(id_: int, method: str, params: dict[str, Any] | None) -> None:
    line = proto.encode_request(ControlRequest(id_, method, params))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert proto.decode_frame(line) == ControlRequest(id_, method, params)
    # The same frame with the document nested instead of base64 decodes the same way.
    frame = json.loads(line)
    if "params" in frame:
        frame["params"] = params
    assert proto.decode_frame(json.dumps(frame).encode()) == ControlRequest(id_, method, params)


@given(st.integers(1, 2**64 - 1), json_objects | st.text(min_size=1, max_size=30))
def test_response_round_trip(id_: int, payload: dict[str, Any] | str) -> None:
    resp = Response(id_, None, payload) if isinstance(payload, str) else Response(id_, payload)
    client = ControlClientCore()
    client._next_id = id_  # the reply must match a pending request id
    client.request("m")
    assert client.receive_data(proto.encode_response(resp)) == [resp]


header_text = st.text(max_size=60)


@given(header_text, header_text)
def test_dial_request_round_trip(network: str, addr: str) -> None:
    assert proto.decode_dial_request(proto.encode_dial_request(network, addr)) == proto.DialRequest(
        "dial", network, addr
    )


@given(st.booleans(), header_text, header_text, header_text)
def test_dial_reply_round_trip(ok: bool, err: str, local: str, remote: str) -> None:
    if not ok and not err:
        err = "failed"
    line = proto.encode_dial_reply(ok, err, local, remote)
    assert proto.decode_dial_reply(line) == proto.DialReply(ok, err, local, remote)


@given(header_text.filter(bool), header_text, header_text)
def test_accept_round_trip(listener_id: str, local: str, remote: str) -> None:
    assert proto.decode_accept_request(proto.encode_accept_request(listener_id)) == listener_id
    header = proto.encode_accept_header(listener_id, local, remote)
    assert len(header) <= MAX_HEADER_LINE + 1
    assert proto.decode_accept_header(header) == proto.AcceptHeader(listener_id, local, remote)


@given(st.ip_addresses(), st.integers(0, 65535))
def test_addr_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    text = proto.format_addr(ip, port)
    host, parsed_port = proto.split_host_port(text)
    assert (ipaddress.ip_address(host), parsed_port) == (ip, port)
    # Like Go, an IPv4-mapped IPv6 address counts as IPv4 (tcp4 accepts it, tcp6 does not).
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    family = 4 if mapped is not None else ip.version
    parsed = proto.parse_listen_addr(f"tcp{family}", text)
    assert parsed.port == port
    any_family = proto.parse_listen_addr("tcp", text)
    assert (any_family.host, any_family.port) == (parsed.host, parsed.port)
    if (mapped or ip).is_unspecified:
        assert parsed.host is None
    else:
        assert parsed.host == (mapped or ip)
    other = 6 if family == 4 else 4
    try:
        proto.parse_listen_addr(f"tcp{other}", text)
    except WireAddressError:
        pass
    else:
        raise AssertionError(f"tcp{other} accepted {text}")


@given(st.sampled_from(["tcp", "tcp4", "tcp6", "udp", ""]), st.text(max_size=40))
def test_parse_listen_addr_only_address_errors(network: str, addr: str) -> None:
    try:
        result = proto.parse_listen_addr(network, addr)
    except WireAddressError:
        return
    assert 0 <= result.port <= 65535


@given(json_values)
def test_go_json_is_valid_json_and_html_safe(value: Any) -> None:
    data = proto.go_json(value)
    assert json.loads(data) == value
    assert not any(c in data for c in (b"<", b">", b"&", b"\n", "\u2028".encode()))
