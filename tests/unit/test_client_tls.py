"""listen_tls / dial_tls on both client faces against a scripted daemon (tests/unit/
test_client_wire.py's WirePeer): what goes on the wire, the ``tls`` the app is handed, the
typed errors, an old daemon that ignores ``tls``, and re-registration keeping TLS."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tsnet2
from tsnet2 import proto

from .test_client_wire import Coded, WirePeer


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[WirePeer]:
    p = WirePeer(tmp_path / "tsnet2.sock")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def srv(face: Any, peer: WirePeer) -> Iterator[Any]:
    s = face.Server(socket_path=peer.path, hostname="node-a", connect_timeout=2)
    try:
        yield s
    finally:
        if not s.closed:
            s.close()

INFO = proto.TLSInfo(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256",
                     sni="node-a.tail.example", alpn="h2")


def _tls_result(p: Any) -> dict[str, Any]:
    return {"listener_id": "00112233445566ff", "addr": ":443", "tls": bool(p.get("tls"))}


def test_listen_tls_registers_with_tls_and_alpn_and_accepts_with_the_session(
        srv: Any, peer: WirePeer) -> None:
    peer.methods["register_listener"] = _tls_result
    with srv.listen_tls("tcp", ":443", alpn=["h2", "http/1.1"]) as ln:
        assert ln.tls is True
        assert peer.calls[-1] == ("register_listener", {
            "network": "tcp", "addr": ":443", "tls": True, "alpn": ["h2", "http/1.1"]})
        slot = peer.next_slot()
        slot.sock.sendall(proto.encode_accept_header(
            slot.listener_id, "100.64.0.7:443", "100.64.0.9:50000", tls=INFO) + b"GET /")
        with ln.accept(timeout=5) as conn:
            assert conn.tls == INFO
            assert conn.recv(100) == b"GET /"


def test_plain_listener_and_dial_have_no_tls(srv: Any, peer: WirePeer) -> None:
    with srv.listen("tcp", ":8080") as ln:
        assert ln.tls is False
        slot = peer.next_slot()
        slot.sock.sendall(proto.encode_accept_header(slot.listener_id, "100.64.0.7:8080",
                                                     "100.64.0.9:50000"))
        with ln.accept(timeout=5) as conn:
            assert conn.tls is None
    with srv.dial("tcp", "100.64.0.1:80", timeout=5) as conn:
        assert conn.tls is None


def test_listen_tls_on_a_daemon_that_does_not_echo_tls(srv: Any, peer: WirePeer) -> None:
    with pytest.raises(tsnet2.NotSupportedError, match="does not terminate TLS") as ei:
        srv.listen_tls("tcp", ":8080")
    assert isinstance(ei.value, NotImplementedError)
    assert peer.calls[-1] == ("unregister_listener", {"listener_id": "00112233445566ff"})


def test_listen_tls_without_a_certificate(srv: Any, peer: WirePeer) -> None:
    def fail(p: Any) -> Any:
        raise Coded("daemon: cannot listen with TLS: no certificate yet",
                    proto.ErrorCode.NO_CERTIFICATE)
    peer.methods["register_listener"] = fail
    with pytest.raises(tsnet2.NoCertificateError, match="no certificate yet") as ei:
        srv.listen_tls("tcp", ":443")
    assert isinstance(ei.value, tsnet2.DaemonError)


def test_listen_tls_checks_alpn_before_the_daemon(srv: Any, peer: WirePeer) -> None:
    with pytest.raises(tsnet2.AddressError, match="list of protocol names"):
        srv.listen_tls("tcp", ":443", alpn="h2")
    with pytest.raises(tsnet2.AddressError, match="bad ALPN protocol"):
        srv.listen_tls("tcp", ":443", alpn=[""])
    with pytest.raises(tsnet2.AddressError, match="at most 16"):
        srv.listen_tls("tcp", ":443", alpn=[f"p{i}" for i in range(17)])
    assert "register_listener" not in peer.method_names()


def test_dial_tls_sends_options_and_returns_the_session(srv: Any, peer: WirePeer) -> None:
    seen: list[proto.DialRequest] = []
    info = proto.TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384",
                         sni="db.tail.example", alpn="x", peer_name="db.tail.example")

    def reply(sock: socket.socket, req: proto.DialRequest) -> None:
        seen.append(req)
        sock.sendall(proto.encode_dial_reply(True, local="100.64.0.7:41000",
                                             remote="100.64.0.3:5432", tls=info))
        while data := sock.recv(65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    peer.on_dial = reply
    with srv.dial_tls("tcp", "db:5432", server_name="db.tail.example", alpn=["x"],
                      timeout=5) as conn:
        assert conn.tls == info
        conn.sendall(b"plain")
        assert conn.recv(100) == b"plain"
    assert seen[0].tls == proto.TLSDialOptions(server_name="db.tail.example", alpn=("x",))
    with srv.dial_tls("tcp", "db:5432", timeout=5):
        pass
    assert seen[1].tls == proto.TLSDialOptions()


def test_dial_tls_failure_is_a_tls_error(srv: Any, peer: WirePeer) -> None:
    msg = ("daemon: dial db:443: TLS: certificate verify failed: Hostname mismatch, "
           "certificate is not valid for 'x'")
    peer.on_dial = lambda sock, req: sock.sendall(
        proto.encode_dial_reply(False, err=msg, code=proto.ErrorCode.TLS_FAILED))
    with pytest.raises(tsnet2.TLSError) as ei:
        srv.dial_tls("tcp", "db:443", server_name="x", timeout=5)
    assert str(ei.value) == f"tsnet2.dial_tls: {msg}"
    assert isinstance(ei.value, tsnet2.DialError)


def test_dial_tls_on_a_daemon_that_ignores_tls(srv: Any, peer: WirePeer) -> None:
    """An old daemon connects in plain TCP and answers without ``tls``: refused."""
    with pytest.raises(tsnet2.NotSupportedError, match="does not originate TLS"):
        srv.dial_tls("tcp", "100.64.0.1:443", timeout=5)


def test_dial_tls_checks_server_name(srv: Any, peer: WirePeer) -> None:
    with pytest.raises(tsnet2.AddressError, match="bad server_name"):
        srv.dial_tls("tcp", "db:443", server_name="db:443")
    assert proto.ChannelKind.DIAL not in peer.kinds


def test_relisten_after_restart_keeps_tls(face: Any, tmp_path: Path) -> None:
    """A daemon restart: the listener is registered again with tls and its ALPN list."""
    first = WirePeer(tmp_path / "tsnet2.sock")
    first.methods["register_listener"] = _tls_result
    s = face.Server(socket_path=first.path, connect_timeout=2, reconnect_timeout=10)
    try:
        ln = s.listen_tls("tcp", ":443", alpn=["h2"])
        first.next_slot()
        first.next_slot()
        first.close()
        (tmp_path / "tsnet2.sock").unlink()
        second = WirePeer(tmp_path / "tsnet2.sock")
        second.methods["register_listener"] = _tls_result
        try:
            with pytest.raises(tsnet2.DeadlineExceededError):
                ln.accept(timeout=1.5)
            registered = [p for m, p in second.calls if m == "register_listener"]
            assert registered == [{"network": "tcp", "addr": ":443", "tls": True,
                                   "alpn": ["h2"]}]
            assert ln.tls
            ln.close()
        finally:
            second.close()
    finally:
        if not s.closed:
            s.close()
