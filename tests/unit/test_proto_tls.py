"""The ``tls`` objects of the wire (tsnet2/proto/tls.py) and where they travel: dial request,
dial reply, accept header, register_listener. Round trips, bounds, and decoders that fail
only with RemoteProtocolError (property tests, as in test_proto_fuzz.py)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsnet2 import proto
from tsnet2.proto import LocalProtocolError, RemoteProtocolError
from tsnet2.proto.tls import MAX_ALPN, MAX_ALPN_PROTOCOLS, MAX_SERVER_NAME

# A decorator, not a loaded profile: loading one would change every module's settings.
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
server_names = st.just("") | st.lists(label, min_size=1, max_size=5).map(".".join)
alpn_names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                     min_size=1, max_size=30)
alpn_lists = st.none() | st.lists(alpn_names, min_size=1, max_size=MAX_ALPN_PROTOCOLS).map(
    tuple)
info_text = st.text(max_size=40)
infos = st.builds(proto.TLSInfo, version=info_text, cipher=info_text, sni=info_text,
                  alpn=info_text, peer_name=info_text)


@FUZZ
@given(server_names, alpn_lists)
def test_dial_request_with_tls_round_trips(name: str, alpn: tuple[str, ...] | None) -> None:
    opts = proto.TLSDialOptions(server_name=name, alpn=alpn)
    line = proto.encode_dial_request("tcp", "web:443", opts)
    req = proto.decode_dial_request(line)
    assert req.tls == opts
    assert (req.network, req.addr) == ("tcp", "web:443")
    doc = json.loads(line)["tls"]
    assert ("server_name" in doc) == bool(name) and ("alpn" in doc) == bool(alpn)


def test_a_plain_dial_request_has_no_tls() -> None:
    line = proto.encode_dial_request("tcp", "web:80")
    assert b"tls" not in line and proto.decode_dial_request(line).tls is None
    empty = proto.decode_dial_request(b'{"op":"dial","addr":"web:443","tls":{}}\n')
    assert empty.tls == proto.TLSDialOptions()


@FUZZ
@given(infos, st.booleans())
def test_dial_reply_and_accept_header_carry_tls_info(info: proto.TLSInfo, ok: bool) -> None:
    reply = proto.decode_dial_reply(proto.encode_dial_reply(
        ok, "" if ok else "daemon: TLS failed", "100.64.0.1:1", "100.64.0.2:443", tls=info,
        code=None if ok else proto.ErrorCode.TLS_FAILED))
    if ok:
        assert reply.tls == info
    else:  # a failed reply never carries a session
        assert reply.tls is None and reply.code == proto.ErrorCode.TLS_FAILED
    header = proto.decode_accept_header(proto.encode_accept_header(
        "00112233445566ff", "100.64.0.1:443", "100.64.0.2:5000", tls=info))
    assert header.tls == info


@FUZZ
@given(infos)
def test_tls_info_json_is_sorted_and_leaves_empty_keys_out(info: proto.TLSInfo) -> None:
    doc = info.to_json()
    assert list(doc) == sorted(doc)
    assert all(doc.values())
    assert proto.TLSInfo.from_json(doc) == info


@pytest.mark.parametrize("name", [
    "web:443", "we b", "x" * (MAX_SERVER_NAME + 1), "wéb.example", "[::1]", "a/b", "u@h",
])
def test_bad_server_names_are_refused(name: str) -> None:
    with pytest.raises(LocalProtocolError, match="server_name"):
        proto.TLSDialOptions(server_name=name)
    line = json.dumps({"op": "dial", "addr": "w:1", "tls": {"server_name": name}}).encode()
    with pytest.raises(RemoteProtocolError, match="server_name"):
        proto.decode_dial_request(line)


@pytest.mark.parametrize("alpn", [
    ("",), ("x" * (MAX_ALPN + 1),), ("é",), tuple(f"p{i}" for i in range(MAX_ALPN_PROTOCOLS + 1)),
])
def test_bad_alpn_lists_are_refused(alpn: tuple[str, ...]) -> None:
    with pytest.raises(LocalProtocolError, match="ALPN"):
        proto.TLSDialOptions(alpn=alpn)
    params = {"network": "tcp", "addr": ":443", "tls": True, "alpn": list(alpn)}
    with pytest.raises(RemoteProtocolError, match="ALPN"):
        proto.RegisterListenerParams.from_json(params)


@FUZZ
@given(alpn_lists)
def test_register_listener_tls_round_trips(alpn: tuple[str, ...] | None) -> None:
    params = proto.RegisterListenerParams("tcp", ":443", tls=True, alpn=alpn)
    doc = params.to_json()
    assert doc["tls"] is True and ("alpn" in doc) == bool(alpn)
    assert proto.RegisterListenerParams.from_json(json.loads(json.dumps(doc))) == params
    result = proto.RegisterListenerResult("00112233445566ff", ":443", tls=True)
    assert proto.RegisterListenerResult.from_json(result.to_json()).tls is True
    plain = proto.RegisterListenerParams("tcp", ":80", alpn=alpn)
    assert "tls" not in plain.to_json() and "alpn" not in plain.to_json()


tls_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(
        st.sampled_from(["server_name", "alpn", "version", "cipher", "sni", "peer_name", "x"]),
        c, max_size=4),
    max_leaves=10,
)


@FUZZ
@given(tls_values)
def test_decoders_with_any_tls_value_raise_only_protocol_errors(value: Any) -> None:
    lines = [
        {"op": "dial", "network": "tcp", "addr": "w:1", "tls": value},
        {"ok": True, "tls": value},
        {"listener_id": "00112233445566ff", "local": "", "remote": "", "tls": value},
    ]
    for decode, doc in zip((proto.decode_dial_request, proto.decode_dial_reply,
                            proto.decode_accept_header), lines, strict=True):
        with contextlib.suppress(RemoteProtocolError):
            decode(json.dumps(doc).encode())
    for doc in ({"network": "tcp", "addr": ":1", "tls": value},
                {"network": "tcp", "addr": ":1", "tls": True, "alpn": value}):
        with contextlib.suppress(RemoteProtocolError):
            proto.RegisterListenerParams.from_json(doc)
