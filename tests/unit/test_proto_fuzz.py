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


# ---- the method table (tsnet2.proto.methods): the daemon's decode path -----------------

str_lists = st.none() | st.lists(st.text(max_size=12), max_size=4).map(tuple)
PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "start": st.builds(
        proto.StartParams,
        st.text(max_size=20),
        st.text(max_size=20),
        st.text(max_size=20),
        st.booleans(),
        str_lists,
    ),
    "register_listener": st.builds(
        proto.RegisterListenerParams, st.text(max_size=8), st.text(max_size=20)
    ),
    "unregister_listener": st.builds(proto.UnregisterListenerParams, st.text(max_size=20)),
}
RESULTS: dict[str, st.SearchStrategy[Any]] = {
    "up": st.builds(proto.UpResult, str_lists, st.text(max_size=20), str_lists),
    "tailscale_ips": st.builds(
        proto.TailscaleIPsResult,
        st.none() | st.text(min_size=1, max_size=15),
        st.none() | st.text(min_size=1, max_size=40),
    ),
    "cert_domains": st.builds(proto.CertDomainsResult, str_lists),
    "register_listener": st.builds(
        proto.RegisterListenerResult, st.text(max_size=16), st.text(max_size=20)
    ),
}
PARAM_KEYS = [
    "hostname",
    "control_url",
    "auth_key",
    "ephemeral",
    "advertise_tags",
    "network",
    "addr",
    "listener_id",
    "v4",
    "v6",
    "domains",
    "tailscale_ips",
    "node_name",
    "cert_domains",
]
method_names = st.sampled_from([str(m) for m in proto.Method]) | st.text(max_size=12)
# Params documents near the schema: its own keys with any JSON values, plus noise keys.
near_docs = (
    st.none() | json_objects | st.dictionaries(st.sampled_from(PARAM_KEYS), json_values, max_size=6)
)


def _empty_or(strategies: dict[str, st.SearchStrategy[Any]], method: str) -> Any:
    return strategies.get(method, st.just(proto.Empty()))


@given(st.data(), st.sampled_from(list(proto.METHODS)), st.integers(1, 2**64 - 1))
def test_params_round_trip_through_a_request_frame(
    data: st.DataObject, method: proto.Method, id_: int
) -> None:
    params = data.draw(_empty_or(PARAMS, method))
    doc = proto.encode_params(method, params)
    req = proto.decode_frame(proto.encode_request(ControlRequest(id_, method, doc)))
    assert isinstance(req, ControlRequest) and req.method == method
    assert proto.decode_params(req.method, req.params) == params


@given(st.data(), st.sampled_from(list(proto.METHODS)), st.integers(1, 2**64 - 1))
def test_results_round_trip_through_a_reply_frame(
    data: st.DataObject, method: proto.Method, id_: int
) -> None:
    result = data.draw(_empty_or(RESULTS, method))
    line = ControlServerCore().reply(id_, proto.encode_result(method, result))
    resp = proto.decode_frame(line)
    assert isinstance(resp, Response) and resp.ok
    assert proto.decode_result(method, resp.result) == result


@given(method_names, near_docs)
def test_decode_params_and_results_raise_only_remote_protocol_errors(
    method: str, doc: dict[str, Any] | None
) -> None:
    for decode in (proto.decode_params, proto.decode_result):
        try:
            value = decode(method, doc)
        except RemoteProtocolError:
            continue
        assert method in proto.METHODS
        # What decoded encodes again (a document of the same method, Go-ordered keys).
        assert isinstance(value.to_json(), dict)


# Request frames for the table's methods with near-miss params, nested or base64.
method_frames = st.builds(
    lambda i, m, d, nested: json.dumps(
        {
            "id": i,
            "method": m,
            "params": d if nested else base64.b64encode(json.dumps(d).encode()).decode(),
        }
    ).encode(),
    st.integers(0, 2**64 - 1),
    method_names,
    near_docs,
    st.booleans(),
)
daemon_streams = st.lists(method_frames | frame_lines, max_size=8).map(
    lambda ls: b"\n".join(ls) + b"\n"
)


@given(chunked(daemon_streams | streams))
def test_daemon_decode_path_only_remote_protocol_errors(case: tuple[bytes, list[bytes]]) -> None:
    """Frames off the socket, then their params through the table, as tsnet2d does."""
    _, parts = case
    core = ControlServerCore()
    try:
        for part in [*parts, b""]:
            for item in core.receive_data(part):
                if isinstance(item, ControlRequest):
                    with contextlib.suppress(RemoteProtocolError):
                        proto.decode_params(item.method, item.params)
    except WireError:
        pass


@given(
    st.sampled_from(list(proto.METHODS)),
    st.dictionaries(
        st.sampled_from(PARAM_KEYS),
        json_values,
        max_size=6,
    ),
)
def test_bad_params_messages_name_the_key(method: str, doc: dict[str, Any]) -> None:
    """A params error is one of tsnet2d's messages, naming a key the document holds."""
    try:
        proto.decode_params(method, doc)
    except RemoteProtocolError as e:
        msg = str(e)
        key = msg.split("'")[1] if msg.startswith("parameter '") else msg.split()[0]
        assert key in doc, msg
        assert msg in (
            f"parameter '{key}' must be a string",
            f"parameter '{key}' must be a boolean",
            f"{key} must be a list of strings",
        ), msg
