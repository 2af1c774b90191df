"""Reconnection: the pure shared logic in tsnet2.client._base, and both faces against a
scripted daemon peer that is replaced by a new one on the same socket path (a restart)."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path
from typing import Any

import pytest

import tsnet2
from tsnet2 import proto
from tsnet2.client import _base

from .test_client_wire import WirePeer


def test_backoff_doubles_to_the_cap() -> None:
    delays = list(itertools.islice(_base.backoff_delays(0.05, 0.25), 6))
    assert delays == [0.05, 0.1, 0.2, 0.25, 0.25, 0.25]
    assert max(itertools.islice(_base.backoff_delays(), 20)) <= 0.25  # poll <= 250 ms


def test_reconnect_timeout_field() -> None:
    assert tsnet2.Server().reconnect_timeout == 10.0
    assert tsnet2.Server(reconnect_timeout=0).reconnects is False
    assert tsnet2.AsyncServer(reconnect_timeout=1.5).reconnects is True
    with pytest.raises(ValueError, match="reconnect_timeout must be >= 0"):
        tsnet2.Server(socket_path="/nonexistent.sock", reconnect_timeout=-1).start()


def test_relisten_uses_the_bound_address() -> None:
    params = _base.relisten_params("tcp", ":41234")
    assert proto.encode_params(proto.Method.REGISTER_LISTENER, params) == {
        "network": "tcp", "addr": ":41234"}
    _base.check_relisten_addr(":41234", ":41234")
    _base.check_relisten_addr("100.64.0.1:80", "100.64.0.1:80")
    with pytest.raises(tsnet2.ProtocolError, match="bound"):
        _base.check_relisten_addr(":41234", ":41235")


def test_listener_binding_generations() -> None:
    b = _base.ListenerBinding("tcp", ":8080", "id-1", gen=0)
    assert not b.slots_stale() and b.lost is None
    b.rebind("id-2", ":8080", gen=1)
    assert b.listener_id == "id-2" and b.slots_stale()
    b.mark_slots_current()
    assert not b.slots_stale()
    b.lose("gone")
    assert b.lost == "gone"


def test_messages_say_what_happened_and_what_to_do() -> None:
    msg = _base.reconnect_failed_message("tsnet2.dial", "/s.sock", 1.0, OSError("ENOENT"))
    assert msg.startswith("tsnet2.dial: ") and "reconnect_timeout=1s" in msg
    assert "check that tsnet2d is running" in msg
    err = tsnet2.DaemonError("x", method="register_listener",
                             daemon_message="daemon: listener already registered")
    msg = _base.relisten_failed_message("/s.sock", ":8080", err)
    assert "listener :8080" in msg and "already registered" in msg and "listen again" in msg
    assert "reconnect_timeout is 0" in _base.gone_message("tsnet2.dial", "/s.sock")


def _restart(peer: WirePeer, path: Path) -> WirePeer:
    peer.close()
    path.unlink()
    return WirePeer(path)


def test_reconnects_to_a_restarted_peer(face: Any, tmp_path: Path) -> None:
    path = tmp_path / "tsnet2.sock"
    peer = WirePeer(path)
    logs: list[str] = []
    srv = face.Server(socket_path=str(path), hostname="n", logf=logs.append)
    try:
        ln = srv.listen("tcp", ":8080")
        peer.next_slot()
        peer.next_slot()
        peer = _restart(peer, path)
        peer.methods["register_listener"] = lambda p: {"listener_id": "aa" * 8, "addr": ":8080"}
        with pytest.raises(tsnet2.DeadlineExceededError):
            ln.accept(timeout=1.5)  # notices the restart, reconnects, re-parks
        assert peer.method_names()[:3] == ["start", "up", "register_listener"]
        assert peer.calls[2][1] == {"network": "tcp", "addr": ":8080"}
        assert ln.listener_id == "aa" * 8
        slot = peer.next_slot()
        assert slot.listener_id == "aa" * 8
        assert any("reconnected" in m for m in logs)
        # A listener the new daemon refuses is lost: accept() says so.
        peer = _restart(peer, path)
        peer.methods["register_listener"] = lambda p: (_ for _ in ()).throw(
            RuntimeError("daemon: listener already registered for {tcp 8080}"))
        assert srv.tailscale_ips()[0] is not None  # the call reconnects
        with pytest.raises(tsnet2.DaemonUnavailableError, match="could not be registered"):
            ln.accept(timeout=1)
        ln.close()
    finally:
        srv.close()
        peer.close()


def test_reconnect_timeout_zero_fails_loudly(face: Any, tmp_path: Path) -> None:
    path = tmp_path / "tsnet2.sock"
    peer = WirePeer(path)
    srv = face.Server(socket_path=str(path), reconnect_timeout=0)
    try:
        srv.start()
        peer.control_socks[0].shutdown(socket.SHUT_RDWR)
        with pytest.raises(tsnet2.DaemonUnavailableError, match="reconnect_timeout is 0"):
            srv.dial("tcp", "100.64.0.1:80", timeout=1)
    finally:
        srv.close()
        peer.close()
