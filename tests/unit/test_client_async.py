"""The asyncio face against the scripted daemon peer (see test_client_wire.WirePeer)."""

from __future__ import annotations

import asyncio
import queue
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any, TypeVar

import pytest

import tsnet2
from tsnet2 import proto

from .test_client_wire import HANG, WirePeer

T = TypeVar("T")


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[WirePeer]:
    p = WirePeer(tmp_path / "tsnet2.sock")
    try:
        yield p
    finally:
        p.close()


def run(fn: Callable[[tsnet2.AsyncServer], Awaitable[T]], peer: WirePeer, **kw: Any) -> T:
    """Run ``fn(server)`` in a fresh loop; the server is closed afterwards."""

    async def main() -> T:
        async with tsnet2.AsyncServer(socket_path=peer.path, connect_timeout=2, **kw) as srv:
            return await fn(srv)

    return asyncio.run(main())


def test_zero_async_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TSNET2_SOCKET", raising=False)

    async def main() -> None:
        srv = tsnet2.AsyncServer()
        for coro in (srv.start(), srv.local_client(), srv.listen("tcp", ":0"),
                     srv.dial("tcp", "100.64.0.1:1")):  # fmt: skip
            with pytest.raises(NotImplementedError):
                await coro
        assert await srv.tailscale_ips() == (None, None)
        assert await srv.cert_domains() is None
        assert srv.get_root_path() == ""
        await srv.aclose()
        with pytest.raises(tsnet2.ClosedError):
            await srv.close()

    asyncio.run(main())


def test_async_connect_timeout(tmp_path: Path) -> None:
    """Nothing ever listens: start() gives up after its connect timeout (a hang check only;
    how close to 0.5 s it stays is the benchmark's business)."""

    async def main() -> float:
        srv = tsnet2.AsyncServer(socket_path=str(tmp_path / "none.sock"), connect_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(tsnet2.DaemonUnavailableError):
            await asyncio.wait_for(srv.start(), 10)
        return time.monotonic() - t0

    assert asyncio.run(main()) >= 0.45


def test_async_up_and_queries(peer: WirePeer) -> None:
    async def body(srv: tsnet2.AsyncServer) -> Any:
        st = await srv.up(timeout=5)
        return st, await srv.tailscale_ips(), await srv.cert_domains()

    st, ips, domains = run(body, peer, hostname="node-a")
    assert st.tailscale_ips == [IPv4Address("100.64.0.7"), IPv6Address("fd7a:115c:a1e0::7")]
    assert st.backend_state == "Running" and st.node_name == "node-a"
    assert ips == (IPv4Address("100.64.0.7"), IPv6Address("fd7a:115c:a1e0::7"))
    assert domains == ["node-a.tail.example"]
    assert peer.calls[0][1] is not None and peer.calls[0][1]["hostname"] == "node-a"
    assert peer.method_names()[-1] == "close"


def test_async_reader_task_is_owned(peer: WirePeer) -> None:
    async def main() -> None:
        before = asyncio.all_tasks()
        srv = tsnet2.AsyncServer(socket_path=peer.path)
        await srv.start()
        control = srv._control
        assert control is not None
        task = control._task
        assert task in asyncio.all_tasks() and not task.done()
        await srv.close()
        assert task.done()
        assert asyncio.all_tasks() == before  # nothing left running

    asyncio.run(main())


def test_async_rpc_timeout_and_late_reply(peer: WirePeer) -> None:
    peer.methods["up"] = lambda p: HANG

    async def body(srv: tsnet2.AsyncServer) -> Any:
        await srv.start()
        with pytest.raises(tsnet2.DeadlineExceededError):
            await srv.up(timeout=0.3)
        control = srv._control
        assert control is not None
        assert control._core.pending == frozenset() and control._pending == {}
        sock, late_id = peer.hung[0]
        sock.sendall(proto.ControlServerCore().reply(late_id, {}))
        return await srv.tailscale_ips()

    assert run(body, peer) == (IPv4Address("100.64.0.7"), IPv6Address("fd7a:115c:a1e0::7"))


def test_async_pending_fails_when_daemon_goes(peer: WirePeer) -> None:
    peer.methods["up"] = lambda p: HANG

    async def body(srv: tsnet2.AsyncServer) -> None:
        await srv.start()
        up = asyncio.create_task(srv.up())
        deadline = time.monotonic() + 10
        while len(peer.hung) < 1:  # the up call reaches the daemon (which never answers)
            assert time.monotonic() < deadline, "the up call never reached the daemon"
            await asyncio.sleep(0.01)
        peer.control_socks[0].shutdown(socket.SHUT_RDWR)
        with pytest.raises(tsnet2.DaemonUnavailableError, match="closed"):
            await up
        with pytest.raises(tsnet2.DaemonUnavailableError):
            await srv.cert_domains()

    run(body, peer, reconnect_timeout=0)


def test_async_dial(peer: WirePeer) -> None:
    async def body(srv: tsnet2.AsyncServer) -> Any:
        async with await srv.dial("tcp", "100.64.0.1:8080", timeout=5) as conn:
            conn.writer.write(b"hello tsnet2")
            conn.writer.write_eof()
            data = await conn.reader.read()
            return conn.tailnet_local, conn.tailnet_remote, data

    local, remote, data = run(body, peer)
    assert local == (IPv4Address("100.64.0.7"), 41000)
    assert remote == (IPv4Address("100.64.0.1"), 8080)
    assert data == b"hello tsnet2"


def test_async_dial_refused_and_timeout(peer: WirePeer) -> None:
    async def body(srv: tsnet2.AsyncServer) -> None:
        peer.on_dial = lambda sock, req: sock.sendall(
            proto.encode_dial_reply(False, err="no tailnet node named ghost")
        )
        with pytest.raises(tsnet2.DialError, match=r"tsnet2\.dial: no tailnet node named ghost"):
            await srv.dial("tcp", "ghost:80")
        peer.on_dial = lambda sock, req: peer.stopping.wait()  # never replies
        t0 = time.monotonic()
        with pytest.raises(tsnet2.DeadlineExceededError):
            await srv.dial("tcp", "100.64.0.1:80", timeout=0.3)  # only the timeout ends it
        assert time.monotonic() - t0 >= 0.25

    run(body, peer)


def _deliver(slot: Any, payload: bytes = b"") -> None:
    slot.sock.sendall(
        proto.encode_accept_header(slot.listener_id, "100.64.0.7:8080", "100.64.0.9:50000")
        + payload
    )


def test_async_listen_accept_slots(peer: WirePeer) -> None:
    async def body(srv: tsnet2.AsyncServer) -> None:
        ln = await srv.listen("tcp", ":8080")
        parked = [peer.next_slot(), peer.next_slot()]
        # Two flows arrive at once: neither header is lost.
        _deliver(parked[0], b"one")
        _deliver(parked[1], b"two")
        got = set()
        for _ in range(2):
            conn = await ln.accept(timeout=5)
            async with conn:
                assert conn.tailnet_remote == (IPv4Address("100.64.0.9"), 50000)
                got.add(await conn.reader.read(3))
        assert got == {b"one", b"two"}
        await asyncio.sleep(0.1)
        fresh = [peer.next_slot(), peer.next_slot()]
        with pytest.raises(queue.Empty):
            peer.next_slot(timeout=0.05)  # still exactly K slots
        with pytest.raises(tsnet2.DeadlineExceededError):
            await ln.accept(timeout=0.2)
        await ln.close()
        assert all(s.closed_by_client() for s in fresh)
        with pytest.raises(tsnet2.ClosedError):
            await ln.accept()

    run(body, peer)
    assert ("unregister_listener", {"listener_id": "00112233445566ff"}) in peer.calls


def test_async_accept_cancellation_keeps_slots(peer: WirePeer) -> None:
    async def body(srv: tsnet2.AsyncServer) -> None:
        async with await srv.listen("tcp", ":8080") as ln:
            slot = peer.next_slot()
            peer.next_slot()
            task = asyncio.create_task(ln.accept())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            _deliver(slot, b"after-cancel")
            async with await ln.accept(timeout=5) as conn:
                assert await conn.reader.read(12) == b"after-cancel"

    run(body, peer)


def test_async_close_wakes_accept_and_iteration(peer: WirePeer) -> None:
    async def body(srv: tsnet2.AsyncServer) -> None:
        ln = await srv.listen("tcp", ":8080")
        _deliver(peer.next_slot())
        seen = []
        async for conn in ln:
            async with conn:
                seen.append(conn.tailnet_remote)
            asyncio.get_running_loop().call_later(0.1, asyncio.ensure_future, ln.close())
        assert len(seen) == 1

    run(body, peer)


def test_async_accept_fails_loudly_when_daemon_goes(peer: WirePeer) -> None:
    async def body(srv: tsnet2.AsyncServer) -> None:
        ln = await srv.listen("tcp", ":8080")
        peer.next_slot()
        peer.next_slot()
        peer.control_socks[0].shutdown(socket.SHUT_RDWR)
        with pytest.raises(tsnet2.DaemonUnavailableError, match="went away"):
            await ln.accept(timeout=5)
        await ln.close()

    run(body, peer, reconnect_timeout=0)


def test_async_local_client(peer: WirePeer) -> None:
    def stream(sock: socket.socket, head: bytes) -> None:
        if b"watch-ipn-bus" in head:
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            sock.sendall(b'{"State":6}\n\n{"NetMap":{}}\n')
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")

    async def body(srv: tsnet2.AsyncServer) -> Any:
        lc = await srv.local_client()
        async with await lc.watch_ipn_bus() as watch:
            notes = [n async for n in watch]
        with pytest.raises(tsnet2.LocalAPIError) as ei:
            await lc.whois("100.64.0.1")
        return notes, ei.value.status

    peer.localapi = stream
    assert run(body, peer) == ([{"State": 6}, {"NetMap": {}}], 503)
