"""Unit tests of the pure parts of tsnet2.control: names, ipam, API validation, tokens."""

from __future__ import annotations

import base64
import os
from ipaddress import IPv4Address, IPv6Address

import pytest

from tsnet2.control import api, ipam
from tsnet2.control.names import (
    name_candidates,
    parse_tags,
    sanitize_hostname,
    validate_domain,
)
from tsnet2.control.tokens import (
    hash_secret,
    new_auth_key,
    new_node_credential,
    validate_public_key,
)
from tsnet2.controlclient import boundedjson


def _pub() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("web", "web"),
        ("Web Server!", "web-server"),
        ("my.host.example.com", "my"),
        ("--a__b--", "a-b"),
        ("ÄBC", "bc"),
        ("x" * 100, "x" * 63),
        ("a" * 62 + "-b", "a" * 62),
    ],
)
def test_sanitize_hostname(raw: str, want: str) -> None:
    assert sanitize_hostname(raw) == want


@pytest.mark.parametrize("raw", ["", "---", "...", "!!!"])
def test_sanitize_hostname_rejects_empty(raw: str) -> None:
    with pytest.raises(ValueError, match="no letters or digits"):
        sanitize_hostname(raw)


def test_name_candidates_fit_a_label() -> None:
    it = name_candidates("a" * 63)
    first = [next(it) for _ in range(12)]
    assert first[0] == "a" * 63
    assert first[1] == "a" * 61 + "-1"
    assert first[11] == "a" * 60 + "-11"
    assert all(len(n) <= 63 for n in first)
    assert len(set(first)) == len(first)


def test_tags_and_domain() -> None:
    assert parse_tags(["tag:b", "tag:a", "tag:b"]) == ("tag:a", "tag:b")
    for bad in ["a", "tag:", "tag:a b", "tag:-x"]:
        with pytest.raises(ValueError, match="invalid tag"):
            parse_tags([bad])
    assert validate_domain("Example.COM.") == "example.com"
    with pytest.raises(ValueError):
        validate_domain("bad_domain")


def test_ipam_skips_reserved_and_mirrors_ipv6() -> None:
    assert ipam.addresses(1) == (IPv4Address("100.64.0.1"), IPv6Address("fd7a:115c:a1e0::1"))
    assert not ipam.is_usable(0)
    assert not ipam.is_usable(255)
    assert not ipam.is_usable(256)
    reserved = ipam.offset_of(IPv4Address("100.100.100.100"))
    assert not ipam.is_usable(reserved)
    assert not ipam.is_usable(ipam.V4_POOL.num_addresses - 1)
    assert ipam.first_free([]) == 1
    assert ipam.first_free(range(1, 255)) == 257
    assert ipam.first_free([1, 2, 4]) == 3
    assert ipam.first_free(range(1, reserved)) == reserved + 1
    v4, v6 = ipam.addresses(reserved + 1)
    assert str(v4) == "100.100.100.101"
    assert int(v6) - int(ipam.V6_POOL.network_address) == reserved + 1
    with pytest.raises(ValueError):
        ipam.addresses(256)


def test_tokens() -> None:
    key, cred = new_auth_key(), new_node_credential()
    assert key.startswith("tskey-auth-") and len(key) == 11 + 48
    assert cred.startswith("tsnet2-node-")
    assert new_auth_key() != key
    assert hash_secret(key) != key and len(hash_secret(key)) == 64
    pub = _pub()
    assert validate_public_key(pub) == pub
    for bad in ["", "abc", base64.b64encode(b"x" * 31).decode(), "!" * 44, "é" * 44]:
        with pytest.raises(ValueError, match="public_key"):
            validate_public_key(bad)


def test_parse_register_defaults_and_errors() -> None:
    pub = _pub()
    req = api.parse_register({"public_key": pub, "hostname": "Node One", "extra": 1})
    assert req.hostname == "node-one"
    assert req.endpoints == () and req.tags == () and req.ephemeral is False
    assert req.auth_key is None and req.node_credential is None
    bad_bodies: list[tuple[dict[str, object], str]] = [
        ({"hostname": "a"}, "public_key is required"),
        ({"public_key": "short", "hostname": "a"}, "public_key"),
        ({"public_key": pub}, "hostname is required"),
        ({"public_key": pub, "hostname": 5}, "hostname is required"),
        ({"public_key": pub, "hostname": "a", "ephemeral": "yes"}, "ephemeral"),
        ({"public_key": pub, "hostname": "a", "tags": "tag:a"}, "tags must be a list"),
        ({"public_key": pub, "hostname": "a", "tags": ["nope"]}, "invalid tag"),
        ({"public_key": pub, "hostname": "a", "endpoints": "1.2.3.4:5"}, "endpoints must"),
        ({"public_key": pub, "hostname": "a", "endpoints": ["1.2.3.4"]}, "ip:port"),
        ({"public_key": pub, "hostname": "a", "auth_key": 7}, "auth_key must be a string"),
    ]
    for body, message in bad_bodies:
        with pytest.raises(api.BadRequest, match=message):
            api.parse_register(body)


@pytest.mark.parametrize("ep", ["1.2.3.4:41641", "[fd00::1]:1", "[::1]:65535"])
def test_valid_endpoints(ep: str) -> None:
    assert api.validate_endpoint(ep) == ep


@pytest.mark.parametrize(
    "ep", ["1.2.3.4", "1.2.3.4:0", "1.2.3.4:65536", "fd00::1:80", "host:80", "[1.2.3.4]x:1", 5]
)
def test_invalid_endpoints(ep: object) -> None:
    with pytest.raises(api.BadRequest):
        api.validate_endpoint(ep)


def test_parse_poll_query() -> None:
    assert api.parse_poll_query(None, None, 60) == (0, 0.0)
    assert api.parse_poll_query("5", "100", 60) == (5, 60.0)
    for since, timeout in [("x", "1"), ("-1", "1"), ("1", "x"), ("1", "-2"), ("1", "inf")]:
        with pytest.raises(api.BadRequest):
            api.parse_poll_query(since, timeout, 60)
    with pytest.raises(api.BadRequest, match="not valid JSON"):
        api.parse_json_object(b"{nope")
    with pytest.raises(api.BadRequest, match="JSON object"):
        api.parse_json_object(b"[1]")


def test_rfc3339() -> None:
    assert api.rfc3339(0) == "1970-01-01T00:00:00Z"


# -- issue 9: bounded input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", ["web\n", "web\r", "\nweb", "we\x00b", "web\t", "web\x7f", "web\x85"]
)
def test_sanitize_hostname_refuses_control_characters(raw: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        sanitize_hostname(raw)


@pytest.mark.parametrize("tag", ["tag:web\n", "tag:web\r\n", "tag:a\n", "\ntag:a", "tag:é"])
def test_tags_are_matched_whole(tag: str) -> None:
    with pytest.raises(ValueError, match="invalid tag"):
        parse_tags([tag])


def test_register_refuses_newline_in_hostname_and_tags() -> None:
    pub = _pub()
    with pytest.raises(api.BadRequest, match="control character"):
        api.parse_register({"public_key": pub, "hostname": "web\n"})
    with pytest.raises(api.BadRequest, match="invalid tag"):
        api.parse_register({"public_key": pub, "hostname": "web", "tags": ["tag:web\n"]})


def test_public_key_must_be_canonical() -> None:
    raw = bytes(32)
    canonical = base64.b64encode(raw).decode()
    assert canonical.endswith("A=")
    # 'B' instead of the last 'A' sets padding bits: b64decode gives the same 32 bytes.
    other = canonical[:-2] + "B="
    assert base64.b64decode(other) == raw
    with pytest.raises(ValueError, match="canonical"):
        validate_public_key(other)
    with pytest.raises(ValueError, match="public_key"):
        validate_public_key(canonical + "\n")


@pytest.mark.parametrize(
    "ep",
    [
        "[fe80::1%eth0]:51820",
        "[fe80::1%a\nb]:1",
        "[1.2.3.4]:1",
        "1.2.3.4:\u0664\u0661",  # Arabic-Indic digits: int() takes them, we do not
        "1.2.3.4:1\n",
        "1.2.3.4:000001",
    ],
)
def test_endpoint_strictness(ep: str) -> None:
    with pytest.raises(api.BadRequest):
        api.validate_endpoint(ep)


def test_poll_query_is_bounded() -> None:
    assert api.parse_poll_query("9" * 19, "1", 60) == (int("9" * 19), 1.0)
    for since in ["9" * 20, "9" * 50_000, " 5", "5\n", "1_000", "\u0664", "+5"]:
        with pytest.raises(api.BadRequest, match="since"):
            api.parse_poll_query(since, None, 60)
    with pytest.raises(api.BadRequest, match="since must be >= 0"):
        api.parse_poll_query("-3", None, 60)
    with pytest.raises(api.BadRequest, match="timeout"):
        api.parse_poll_query("1", "1" * 50_000, 60)


def test_json_depth_is_checked_before_parsing() -> None:
    ok = "[" * boundedjson.MAX_JSON_DEPTH + "]" * boundedjson.MAX_JSON_DEPTH
    assert not boundedjson.json_too_deep(ok)
    assert boundedjson.json_too_deep("[" + ok + "]")
    # Brackets inside strings (escaped quotes too) do not count.
    assert not boundedjson.json_too_deep('["' + "[" * 100 + '\\"' + "{" * 100 + '"]')
    # Siblings are not nesting.
    assert not boundedjson.json_too_deep("[" + "[[]]," * 1000 + "[]]")
    # Linear time on hostile input: an unterminated string of escaped quotes.
    assert not boundedjson.json_too_deep('"' + '\\"' * 30_000)
    for body in [b"[" * 60_000, b'{"a":' * 13_000 + b"1" + b"}" * 13_000]:
        with pytest.raises(api.BadRequest, match="deeper than 32"):
            api.parse_json_object(body)
    value: list[object] = []
    for _ in range(30):
        value = [value]
    nested = b'{"a":' + b"[" * 31 + b"]" * 31 + b"}"  # 32 levels: the limit
    assert api.parse_json_object(nested) == {"a": value}


@pytest.mark.parametrize(
    "body",
    [
        b'{"n": ' + b"9" * 50_000 + b"}",
        b'{"n": -' + b"9" * 101 + b"}",
        b'{"n": 1.' + b"0" * 200 + b"}",
        b'{"n": 1e' + b"9" * 200 + b"}",
    ],
)
def test_long_numbers_are_refused(body: bytes) -> None:
    with pytest.raises(api.BadRequest, match="at most 100"):
        api.parse_json_object(body)


def test_json_edge_cases_are_400_not_500() -> None:
    assert api.parse_json_object(b'{"n": ' + b"9" * 100 + b"}")["n"] == int("9" * 100)
    for body, message in [
        (b'{"n": NaN}', "NaN"),
        (b'{"n": -Infinity}', "Infinity"),
        (b"\xff{}", "UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b'{"a": "\\ud800"', "not valid JSON"),
    ]:
        with pytest.raises(api.BadRequest, match=message):
            api.parse_json_object(body)
