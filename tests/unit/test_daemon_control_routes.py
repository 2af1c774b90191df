"""tsnet2d's control methods: one handler per method of the schema (tsnet2.proto.methods)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from tsnet2 import proto
from tsnet2.daemon.server import Daemon, DaemonConfig, Session


def _daemon(tmp_path: Path) -> Daemon:
    return Daemon(DaemonConfig(socket_path=tmp_path / "s.sock", state_dir=tmp_path / "state",
                               traffic_log=str(tmp_path / "traffic.jsonl")))


def test_every_method_of_the_schema_has_a_handler(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    assert list(d.control_routes) == list(proto.METHODS)
    for name, route in d.control_routes.items():
        assert route.spec is proto.METHODS[name]
    with pytest.raises(ValueError, match="duplicate control method"):
        d.route(proto.methods.UP, d._up)


def _call(d: Daemon, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
    a, b = socket.socketpair()
    try:
        session = Session(a, proto.ControlServerCore())
        return asyncio.run(d._call(proto.ControlRequest(1, method, params), session))
    finally:
        a.close()
        b.close()


def test_calls_are_decoded_and_answered_through_the_schema(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    # Before any start: empty answers, params of methods that take none ignored.
    assert _call(d, "tailscale_ips", {"v4": 1}) == {}
    assert _call(d, "cert_domains", None) == {"domains": None}
    assert _call(d, "unregister_listener", {"listener_id": "0011223344556677"}) == {}
    with pytest.raises(proto.UnknownMethodError, match='unknown method "register_fallback_tcp"'):
        _call(d, "register_fallback_tcp", {})
    with pytest.raises(proto.RemoteProtocolError, match="parameter 'addr' must be a string"):
        _call(d, "register_listener", {"network": "tcp", "addr": 80})
    with pytest.raises(proto.RemoteProtocolError, match="advertise_tags must be a list"):
        _call(d, "start", {"advertise_tags": "tag:a"})
