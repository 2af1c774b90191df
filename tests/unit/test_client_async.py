"""What only the asyncio face has: task cancellation, no background tasks.

Everything both faces share runs against both in test_client_wire.py.
"""

from __future__ import annotations

import asyncio
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


def test_async_nothing_runs_in_the_background(peer: WirePeer) -> None:
    """Calls, a listener and close leave no task behind: nothing reads in the background."""

    async def main() -> None:
        before = asyncio.all_tasks()
        srv = tsnet2.AsyncServer(socket_path=peer.path)
        await srv.up(timeout=5)
        ln = await srv.listen("tcp", ":8080")
        assert asyncio.all_tasks() == before
        await ln.aclose()
        await srv.close()
        assert asyncio.all_tasks() == before

    asyncio.run(main())


def test_async_cancelled_call_leaves_the_channel_usable(peer: WirePeer) -> None:
    peer.methods["up"] = lambda p: HANG

    async def body(srv: tsnet2.AsyncServer) -> Any:
        await srv.start()
        up = asyncio.create_task(srv.up())
        while not peer.hung:
            await asyncio.sleep(0.01)
        up.cancel()  # the task was the channel's reader: the next call reads for itself
        with pytest.raises(asyncio.CancelledError):
            await up
        control = srv._control
        assert control is not None and not control._reading and control._core.pending == set()
        return await srv.tailscale_ips()

    assert run(body, peer) == (IPv4Address("100.64.0.7"), IPv6Address("fd7a:115c:a1e0::7"))


def _deliver(slot: Any, payload: bytes = b"") -> None:
    slot.sock.sendall(
        proto.encode_accept_header(slot.listener_id, "100.64.0.7:8080", "100.64.0.9:50000")
        + payload
    )


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
