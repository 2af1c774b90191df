"""The daemon's TLS layer and relay (tsnet2/daemon/tls.py) over real sockets, on asyncio's
and uvloop's event loops: a Python ``ssl`` client or server on the other end of a loopback
TCP connection, the app on a Unix socket pair, a real traffic log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from tests.tlsca import TailnetCA
from tsnet2.daemon.tls import TLSHandshakeFailed, TLSSplice, client_handshake, server_handshake
from tsnet2.proto.tls import TLSInfo
from tsnet2.traffic import TrafficLog

NAME = "b.tailnet.test"
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def ca() -> TailnetCA:
    return TailnetCA.create()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine on a fresh loop of the parametrized kind."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(coro)
    return runner


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(outside, daemon side): a loopback TCP connection; the daemon's end non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        outside = socket.create_connection(lsock.getsockname(), timeout=TIMEOUT)
        inside, _ = lsock.accept()
    inside.setblocking(False)
    return outside, inside


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed to the test
            out.append(exc)
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


def test_terminated_flow_relays_and_logs_plaintext(ca: TailnetCA, tmp_path: Path,
                                                   run: Callable[..., Any]) -> None:
    """A verifying ssl client: handshake with SNI and ALPN, request/answer, the client's
    half-close (close_notify) reaches the app as EOF and the app's answer after it still
    reaches the client; the log holds the plaintext."""
    server_ctx = ca.server_context(NAME)
    client_ctx = ca.client_context()
    client_ctx.set_alpn_protocols(["h2", "x-test"])
    outside, inside = _tcp_pair()
    log_path = tmp_path / "t.jsonl"
    tlog = TrafficLog(str(log_path), mode="payload")
    tlog.open()

    def client() -> bytes:
        with client_ctx.wrap_socket(outside, server_hostname=NAME) as tls:
            assert tls.selected_alpn_protocol() == "x-test"
            tls.sendall(b"hello over tls")
            got = b""
            while not got.endswith(b"!"):
                chunk = tls.recv(100)
                assert chunk
                got += chunk
            return got

    async def main() -> TLSInfo:
        t, out = _in_thread(client)
        layer, info = await server_handshake(inside, server_ctx, ["x-test", "http/1.1"])
        flow = tlog.open_flow(direction="in", whois=None, local="100.64.0.2:443",
                              remote="100.64.0.1:40000", tls=info.to_json())
        daemon_app, app = socket.socketpair()
        daemon_app.setblocking(False)
        sp = TLSSplice(flow, layer)
        await sp.start(daemon_app, inside)
        loop = asyncio.get_running_loop()
        app.setblocking(False)
        got = b""
        while len(got) < 14:
            got += await loop.sock_recv(app, 100)
        assert got == b"hello over tls"
        await loop.sock_sendall(app, b"answer!")
        await asyncio.to_thread(t.join, TIMEOUT)
        app.close()
        await asyncio.wait_for(sp.done, TIMEOUT)
        assert out == [b"answer!"]
        return info

    info = run(main())
    outside.close()
    tlog.close()
    assert info.version in ("TLSv1.3", "TLSv1.2")
    assert info.cipher and info.sni == NAME and info.alpn == "x-test"
    assert info.peer_name == ""
    recs = _records(log_path)
    opened = next(r for r in recs if r["kind"] == "open")
    assert opened["tls"]["sni"] == NAME and opened["tls"]["alpn"] == "x-test"
    import base64
    data = {r["dir"]: base64.b64decode(r["payload_b64"]) for r in recs if r["kind"] == "data"}
    assert data == {"peer->app": b"hello over tls", "app->peer": b"answer!"}
    close = next(r for r in recs if r["kind"] == "close")
    assert (close["bytes_in"], close["bytes_out"]) == (14, 7)


def test_app_half_close_sends_close_notify_and_peer_may_answer(
        ca: TailnetCA, tmp_path: Path, run: Callable[..., Any]) -> None:
    """The app's shutdown(SHUT_WR) is a close_notify + FIN to the peer, which may still
    send: the daemon reads after sending its close_notify."""
    server_ctx = ca.server_context(NAME)
    client_ctx = ca.client_context()
    outside, inside = _tcp_pair()
    tlog = TrafficLog(str(tmp_path / "t.jsonl"), mode="payload")
    tlog.open()

    def client() -> bytes:
        tls = client_ctx.wrap_socket(outside, server_hostname=NAME)
        try:
            got = b""
            while chunk := tls.recv(100):  # until the app's half-close
                got += chunk
            tls.sendall(b"after your eof")
            return got
        finally:
            tls.close()

    async def main() -> bytes:
        t, out = _in_thread(client)
        layer, info = await server_handshake(inside, server_ctx, None)
        assert info.alpn == "" and info.sni == NAME
        flow = tlog.open_flow(direction="in", whois=None, local="100.64.0.2:443",
                              remote="100.64.0.1:40000", tls=info.to_json())
        daemon_app, app = socket.socketpair()
        daemon_app.setblocking(False)
        sp = TLSSplice(flow, layer)
        await sp.start(daemon_app, inside)
        loop = asyncio.get_running_loop()
        app.setblocking(False)
        await loop.sock_sendall(app, b"request")
        app.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := await loop.sock_recv(app, 100):
            got += chunk
        await asyncio.to_thread(t.join, TIMEOUT)
        app.close()
        await asyncio.wait_for(sp.done, TIMEOUT)
        assert out == [b"request"]
        return got

    assert run(main()) == b"after your eof"
    outside.close()
    tlog.close()


def test_handshake_garbage_fails_with_the_reason(ca: TailnetCA, run: Callable[..., Any]) -> None:
    server_ctx = ca.server_context(NAME)
    outside, inside = _tcp_pair()

    async def main() -> str:
        outside.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(TLSHandshakeFailed) as ei:
            await server_handshake(inside, server_ctx, None)
        return str(ei.value)

    text = run(main())
    outside.close()
    assert "http request" in text or "wrong version number" in text, text


def test_handshake_times_out(ca: TailnetCA, run: Callable[..., Any]) -> None:
    server_ctx = ca.server_context(NAME)
    outside, inside = _tcp_pair()

    async def main() -> str:
        with pytest.raises(TLSHandshakeFailed) as ei:
            await server_handshake(inside, server_ctx, None, timeout=0.2)
        return str(ei.value)

    assert "timed out" in run(main())
    outside.close()


def test_client_handshake_verifies_name_and_negotiates_alpn(
        ca: TailnetCA, tmp_path: Path, run: Callable[..., Any]) -> None:
    """Originating: the right name verifies (ALPN, SNI, peer_name); a wrong one fails with
    OpenSSL's verification message."""
    server_ctx = ca.server_context(NAME)
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])
    tlog = TrafficLog(str(tmp_path / "t.jsonl"), mode="payload")
    tlog.open()

    def server(sock: socket.socket, answer: bool) -> bytes:
        try:
            with server_ctx.wrap_socket(sock, server_side=True) as tls:
                data = b""
                while answer and len(data) < 11:
                    data += tls.recv(100)
                if answer:
                    tls.sendall(data.upper())
                return data
        except ssl.SSLError as exc:
            return repr(exc).encode()

    async def main() -> tuple[TLSInfo, str]:
        outside, inside = _tcp_pair()
        t, out = _in_thread(lambda: server(outside, True))
        layer, info = await client_handshake(inside, ca.client_context(), NAME,
                                             ["http/1.1"])
        flow = tlog.open_flow(direction="out", whois=None, local="100.64.0.1:40000",
                              remote="100.64.0.2:443", tls=info.to_json())
        daemon_app, app = socket.socketpair()
        daemon_app.setblocking(False)
        sp = TLSSplice(flow, layer)
        await sp.start(daemon_app, inside, b"early ")
        loop = asyncio.get_running_loop()
        app.setblocking(False)
        await loop.sock_sendall(app, b"bytes")
        got = b""
        while len(got) < 11:
            got += await loop.sock_recv(app, 100)
        assert got == b"EARLY BYTES"
        app.close()
        await asyncio.wait_for(sp.done, TIMEOUT)
        await asyncio.to_thread(t.join, TIMEOUT)
        assert out == [b"early bytes"]
        outside.close()

        outside, inside = _tcp_pair()
        t, _out = _in_thread(lambda: server(outside, False))
        with pytest.raises(TLSHandshakeFailed) as ei:
            await client_handshake(inside, ca.client_context(), "x.tailnet.test", None)
        await asyncio.to_thread(t.join, TIMEOUT)
        outside.close()
        return info, str(ei.value)

    info, err = run(main())
    tlog.close()
    assert info.alpn == "http/1.1" and info.peer_name == NAME and info.sni == NAME
    assert err.startswith("certificate verify failed: Hostname mismatch"), err
    assert "'x.tailnet.test'" in err


def test_no_alpn_listener_then_alpn_listener_on_one_context(
        ca: TailnetCA, run: Callable[..., Any]) -> None:
    """Two listeners share the node's server context: each handshake gets its own list."""
    server_ctx = ca.server_context(NAME)

    def client(sock: socket.socket) -> str | None:
        ctx = ca.client_context()
        ctx.set_alpn_protocols(["a", "b"])
        with ctx.wrap_socket(sock, server_hostname=NAME) as tls:
            return tls.selected_alpn_protocol()

    async def one(alpn: list[str] | None) -> tuple[str, Any]:
        outside, inside = _tcp_pair()
        t, out = _in_thread(lambda: client(outside))
        layer, info = await server_handshake(inside, server_ctx, alpn)
        layer.abort()
        await asyncio.to_thread(t.join, TIMEOUT)
        outside.close()
        return info.alpn, out[0]

    async def main() -> list[tuple[str, Any]]:
        return [await one(["b"]), await one(None), await one(["a", "b"])]

    assert run(main()) == [("b", "b"), ("", None), ("a", "a")]


def test_a_corrupt_record_ends_the_flow_with_a_tls_error(ca: TailnetCA, tmp_path: Path,
                                                        run: Callable[..., Any]) -> None:
    """Garbage after the handshake: both sides reset, the close record names the TLS
    error (not an errno)."""
    import os
    server_ctx = ca.server_context(NAME)
    client_ctx = ca.client_context()
    outside, inside = _tcp_pair()
    log_path = tmp_path / "t.jsonl"
    tlog = TrafficLog(str(log_path), mode="payload")
    tlog.open()

    def client() -> None:
        tls = client_ctx.wrap_socket(outside, server_hostname=NAME)
        tls.sendall(b"ok ")
        raw = socket.socket(fileno=os.dup(tls.fileno()))
        raw.sendall(b"\x17\x03\x03\x00\x20" + b"\xee" * 32)  # application data, bad MAC
        raw.close()
        with contextlib.suppress(OSError):
            tls.recv(10)
        tls.close()

    async def main() -> None:
        t, _out = _in_thread(client)
        layer, info = await server_handshake(inside, server_ctx, None)
        flow = tlog.open_flow(direction="in", whois=None, local="100.64.0.2:443",
                              remote="100.64.0.1:40000", tls=info.to_json())
        daemon_app, app = socket.socketpair()
        daemon_app.setblocking(False)
        sp = TLSSplice(flow, layer)
        await sp.start(daemon_app, inside)
        await asyncio.wait_for(sp.done, TIMEOUT)
        await asyncio.to_thread(t.join, TIMEOUT)
        assert sp.result == "error"
        app.close()

    run(main())
    outside.close()
    tlog.close()
    close = next(r for r in _records(log_path) if r["kind"] == "close")
    assert close["error"].startswith("peer: TLSSessionError: TLS: "), close
    assert "EPERM" not in close["error"]


def test_pause_for_log_stops_reading_and_abort_cuts(ca: TailnetCA, tmp_path: Path,
                                                    run: Callable[..., Any]) -> None:
    """The Relay contract on a TLS flow: pause_for_log stops reading the TLS peer (and the
    app), resuming delivers what waited; abort resets both sides and the close record says
    the flow was cut."""
    server_ctx = ca.server_context(NAME)
    client_ctx = ca.client_context()
    outside, inside = _tcp_pair()
    log_path = tmp_path / "t.jsonl"
    tlog = TrafficLog(str(log_path), mode="payload")
    tlog.open()
    sent = threading.Event()
    done = threading.Event()

    def client() -> None:
        with client_ctx.wrap_socket(outside, server_hostname=NAME) as tls:
            tls.sendall(b"while paused")
            sent.set()
            done.wait(TIMEOUT)

    async def main() -> str:
        t, _out = _in_thread(client)
        layer, info = await server_handshake(inside, server_ctx, None)
        flow = tlog.open_flow(direction="in", whois=None, local="100.64.0.2:443",
                              remote="100.64.0.1:40000", tls=info.to_json())
        daemon_app, app = socket.socketpair()
        daemon_app.setblocking(False)
        app.setblocking(False)
        sp = TLSSplice(flow, layer)
        sp.pause_for_log(True)  # before start, as Datapath._splice does while stalled
        await sp.start(daemon_app, inside)
        assert layer.paused and not layer.raw.is_reading()
        assert sp.app.transport is not None and not sp.app.transport.is_reading()
        await asyncio.to_thread(sent.wait, TIMEOUT)
        sp.pause_for_log(False)
        loop = asyncio.get_running_loop()
        got = b""
        while len(got) < 12:
            got += await asyncio.wait_for(loop.sock_recv(app, 100), TIMEOUT)
        assert got == b"while paused"
        sp.abort()
        await asyncio.wait_for(sp.done, TIMEOUT)
        done.set()
        await asyncio.to_thread(t.join, TIMEOUT)
        app.close()
        return sp.result

    assert run(main()) == "cut"
    outside.close()
    tlog.close()
    close = next(r for r in _records(log_path) if r["kind"] == "close")
    assert close["error"] == "daemon: flow cut by shutdown" and close["bytes_in"] == 12


def test_a_renewed_chain_loaded_into_the_shared_context_is_served(
        ca: TailnetCA, tmp_path: Path, run: Callable[..., Any]) -> None:
    """NodeCerts loads a renewal into the same server context: the next handshake serves
    the new certificate, with the listener's ALPN and the SNI still applied."""
    server_ctx = ca.server_context(NAME)

    def client(sock: socket.socket) -> tuple[bytes, str | None]:
        ctx = ca.client_context()
        ctx.set_alpn_protocols(["x"])
        with ctx.wrap_socket(sock, server_hostname=NAME) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der, tls.selected_alpn_protocol()

    async def one() -> tuple[tuple[bytes, str | None], TLSInfo]:
        outside, inside = _tcp_pair()
        t, out = _in_thread(lambda: client(outside))
        layer, info = await server_handshake(inside, server_ctx, ["x"])
        layer.abort()
        await asyncio.to_thread(t.join, TIMEOUT)
        outside.close()
        return out[0], info

    async def main() -> list[tuple[tuple[bytes, str | None], TLSInfo]]:
        first = await one()
        chain, key = ca.issue(NAME)
        (tmp_path / "c.pem").write_bytes(chain)
        (tmp_path / "k.pem").write_bytes(key)
        server_ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")  # a renewal
        return [first, await one()]

    [((cert_a, alpn_a), info_a), ((cert_b, alpn_b), info_b)] = run(main())
    assert alpn_a == "x" and info_a.sni == NAME
    assert cert_a != cert_b and alpn_b == "x" and info_b.sni == NAME and info_b.alpn == "x"
