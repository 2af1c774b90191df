"""Endpoint strings: canonical form and rejection of anything that is not IP:PORT."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from tsnet2.node import NodeError, parse_endpoint, split_endpoint


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("10.0.0.1:41641", "10.0.0.1:41641"),
        ("[fd00::1]:1", "[fd00::1]:1"),
        ("[FD00:0::1]:65535", "[fd00::1]:65535"),
    ],
)
def test_parse_endpoint_canonical(text: str, canonical: str) -> None:
    assert parse_endpoint(text) == canonical
    ep = split_endpoint(text)
    assert ep.ip == ip_address(canonical.rsplit(":", 1)[0].strip("[]")) and str(ep) == canonical


@pytest.mark.parametrize(
    "text",
    ["", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4:-1", "host:80", "fd00::1:80",
     "[fd00::1]80", "[1.2.3.4]:80x", ":80", "1.2.3.4: 80", "x" * 100],
)  # fmt: skip
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(NodeError, match="endpoint"):
        parse_endpoint(text)
