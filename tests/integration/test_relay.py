"""Both flow relays, on both event loops, behave the same to the client, the app and the log.

`Splice` copies (every traffic-log mode); `PipeSplice` moves the bytes with splice(2) through
pipes (modes metadata and off). Each test runs with each relay on asyncio's loop and on
uvloop's, over real sockets: TCP over loopback for the tailnet peer, a Unix socket pair for
the app, a real traffic log (metadata mode, whose records both relays can write).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.tailnet import recv_exactly, relay_sockets
from tsnet2.daemon import zerocopy
from tsnet2.daemon.splice import Relay, Splice
from tsnet2.daemon.zerocopy import PipePool, PipeSplice
from tsnet2.traffic import Flow, TrafficLog, TrafficLogError

IO_TIMEOUT = 10.0
uvloop = pytest.importorskip("uvloop", reason="uvloop is part of tsnet2[daemon]")

pytestmark = pytest.mark.skipif(not zerocopy.available(), reason="os.splice is Linux-only")


@pytest.fixture(params=["copy", "splice", "splice-no-pipes"])
def relay(request: pytest.FixtureRequest) -> str:
    """Which relay: copying, splice(2), or splice(2) with an empty pool (copies per read)."""
    return str(request.param)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine on asyncio's or uvloop's event loop."""
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(coro)

    return runner


class Sockets:
    """``remote`` is the tailnet peer, ``app`` the app; the relay gets the middle two."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.remote, self.daemon_peer, self.daemon_app, self.app = relay_sockets(IO_TIMEOUT)
        self.pool: PipePool | None = None

    async def start(self, log: TrafficLog, relay: str,
                    pending: bytes = b"") -> Relay:
        """Start the relay the way the daemon does."""
        flow = log.open_flow(direction="out", local="100.64.0.2:40000",
                             remote="100.64.0.1:8080", whois=None)
        sp: Relay
        if relay == "copy":
            sp = Splice(flow)
        else:
            self.pool = PipePool(limit=0 if relay == "splice-no-pipes" else 16)
            sp = PipeSplice(flow, self.pool)
        await sp.start(self.daemon_app, self.daemon_peer, pending)
        return sp

    def records(self) -> list[dict[str, Any]]:
        """The traffic log's records."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def close_record(self) -> dict[str, Any]:
        """The one close record."""
        closes = [r for r in self.records() if r["kind"] == "close"]
        assert len(closes) == 1, closes
        return closes[0]

    def data_lengths(self, direction: str) -> int:
        """Bytes the data records of one direction account for."""
        return sum(r["len"] for r in self.records()
                   if r["kind"] == "data" and r["dir"] == direction)


@pytest.fixture
def socks(tmp_path: Path) -> Iterator[Sockets]:
    s = Sockets(tmp_path / "traffic.jsonl")
    try:
        yield s
    finally:
        for sock in (s.remote, s.app, s.daemon_peer, s.daemon_app):
            sock.close()
        if s.pool is not None:
            assert s.pool.in_use == 0, "a finished flow still holds a pipe"
            s.pool.clear()


def _recv_until_eof(sock: socket.socket, limit: int) -> bytes:
    data = bytearray()
    while len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_request_response_half_close(relay: str, run: Any, socks: Sockets) -> None:
    """Early bytes go first; a half-close passes on and the reply still comes back; both
    counts are in the close record and the data records."""
    early, rest, reply = b"GET / HTTP/1.0\r\n", b"\r\n", b"HTTP/1.0 200 OK\r\n\r\nhello"

    async def body() -> str:
        with TrafficLog(str(socks.log_path), mode="metadata") as log:
            sp = await socks.start(log, relay, pending=early)
            await asyncio.to_thread(socks.app.sendall, rest)
            socks.app.shutdown(socket.SHUT_WR)
            got = await asyncio.to_thread(_recv_until_eof, socks.remote, 4096)
            assert got == early + rest
            await asyncio.to_thread(socks.remote.sendall, reply)
            socks.remote.shutdown(socket.SHUT_WR)
            assert await asyncio.to_thread(_recv_until_eof, socks.app, 4096) == reply
            await asyncio.wait_for(sp.done, IO_TIMEOUT)
            return sp.result

    assert run(body()) == "ok"
    close = socks.close_record()
    assert "error" not in close, close
    assert (close["bytes_out"], close["bytes_in"]) == (len(early + rest), len(reply))
    assert socks.data_lengths("app->peer") == len(early + rest)
    assert socks.data_lengths("peer->app") == len(reply)


def test_ping_pong_keeps_order(relay: str, run: Any, socks: Sockets) -> None:
    """Many small round trips on one flow (a reader stays registered between them)."""

    async def body() -> None:
        with TrafficLog(str(socks.log_path), mode="metadata") as log:
            sp = await socks.start(log, relay)

            def pingpong() -> None:
                for i in range(300):
                    msg = b"%d" % i
                    socks.app.sendall(msg)
                    assert recv_exactly(socks.remote, len(msg)) == msg
                    socks.remote.sendall(msg[::-1])
                    assert recv_exactly(socks.app, len(msg)) == msg[::-1]

            await asyncio.to_thread(pingpong)
            socks.app.close()
            socks.remote.close()
            await asyncio.wait_for(sp.done, IO_TIMEOUT)
            if socks.pool is not None:
                assert socks.pool.in_use == 0 and socks.pool.kept <= 1

    run(body())
    total = sum(len(b"%d" % i) for i in range(300))
    close = socks.close_record()
    assert (close["bytes_out"], close["bytes_in"]) == (total, total), close


def test_bulk_both_ways_with_a_slow_reader(relay: str, run: Any, socks: Sockets) -> None:
    """8 MiB each way at once, the app reading slowly at first (the relay waits for a full
    destination, then goes on): every byte arrives once, in order, and is counted."""
    size = 8 * 1024 * 1024
    up = bytes(i % 253 for i in range(size))
    down = bytes(i % 241 for i in range(size))
    got: dict[str, bytes] = {}
    release = threading.Event()

    def send(sock: socket.socket, data: bytes) -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    def slow_app_reader() -> None:
        release.wait(IO_TIMEOUT)
        got["down"] = _recv_until_eof(socks.app, size + 1)

    threads = [threading.Thread(target=send, args=(socks.app, up)),
               threading.Thread(target=send, args=(socks.remote, down)),
               threading.Thread(target=slow_app_reader),
               threading.Thread(target=lambda: got.update(up=_recv_until_eof(socks.remote,
                                                                             size + 1)))]

    async def body() -> str:
        with TrafficLog(str(socks.log_path), mode="metadata") as log:
            sp = await socks.start(log, relay)
            for t in threads:
                t.start()
            await asyncio.sleep(0)  # the app's reader starts late: the relay must wait
            release.set()
            await asyncio.wait_for(sp.done, 60)
            return sp.result

    try:
        assert run(body()) == "ok"
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["down"]).digest() == hashlib.sha256(down).digest()
    close = socks.close_record()
    assert (close["bytes_out"], close["bytes_in"]) == (size, size), close
    assert socks.data_lengths("app->peer") == size and socks.data_lengths("peer->app") == size
    assert all(r["len"] <= 16384 for r in socks.records() if r["kind"] == "data")


def test_peer_reset_ends_the_flow_and_is_named(relay: str, run: Any, socks: Sockets) -> None:
    async def body() -> str:
        with TrafficLog(str(socks.log_path), mode="metadata") as log:
            sp = await socks.start(log, relay)
            await asyncio.to_thread(socks.app.sendall, b"x")
            assert await asyncio.to_thread(recv_exactly, socks.remote, 1) == b"x"
            socks.remote.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            socks.remote.close()  # RST
            await asyncio.wait_for(sp.done, IO_TIMEOUT)
            # The app side ends too: EOF (a Unix socket has no reset).
            assert await asyncio.to_thread(_recv_until_eof, socks.app, 10) == b""
            return sp.result

    assert run(body()) == "error"
    close = socks.close_record()
    assert close["error"] == "peer: ECONNRESET: Connection reset by peer", close
    assert close["bytes_out"] == 1


def test_abort_cuts_and_resets_the_peer(relay: str, run: Any, socks: Sockets) -> None:
    async def body() -> str:
        with TrafficLog(str(socks.log_path), mode="metadata") as log:
            sp = await socks.start(log, relay)
            await asyncio.to_thread(socks.remote.sendall, b"hello")
            assert await asyncio.to_thread(recv_exactly, socks.app, 5) == b"hello"
            sp.abort()
            await asyncio.wait_for(sp.done, IO_TIMEOUT)
            with pytest.raises(ConnectionResetError):
                await asyncio.to_thread(socks.remote.recv, 10)
            return sp.result

    assert run(body()) == "cut"
    close = socks.close_record()
    assert close["error"] == "daemon: flow cut by shutdown" and close["bytes_in"] == 5


def test_log_pause_stops_reading_until_resumed(relay: str, run: Any, socks: Sockets) -> None:
    async def body() -> None:
        with TrafficLog(str(socks.log_path), mode="metadata") as log:
            sp = await socks.start(log, relay)
            sp.pause_for_log(True)
            await asyncio.to_thread(socks.remote.sendall, b"held")
            # A round trip through the loop's other flow would not prove much; instead the
            # app must see nothing for a while, then everything once resumed.
            socks.app.settimeout(0.3)
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(socks.app.recv, 10)
            socks.app.settimeout(IO_TIMEOUT)
            assert socks.data_lengths("peer->app") == 0
            sp.pause_for_log(False)
            assert await asyncio.to_thread(recv_exactly, socks.app, 4) == b"held"
            sp.abort()
            await asyncio.wait_for(sp.done, IO_TIMEOUT)

    run(body())


def test_log_refusal_cuts_before_forwarding(relay: str, run: Any, socks: Sockets,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail-closed: bytes the log refuses to record never reach the other side."""

    def refuse(self: Flow, *args: Any) -> None:
        raise TrafficLogError("disk full (test)")

    async def body() -> str:
        with TrafficLog(str(socks.log_path), mode="metadata") as log:
            sp = await socks.start(log, relay)
            monkeypatch.setattr(Flow, "data", refuse)
            monkeypatch.setattr(Flow, "count", refuse)
            await asyncio.to_thread(socks.remote.sendall, b"secret")
            await asyncio.wait_for(sp.done, IO_TIMEOUT)
            assert await asyncio.to_thread(_recv_until_eof, socks.app, 10) == b""
            return sp.result

    assert run(body()) == "error"
    close = socks.close_record()
    assert close["error"].startswith("traffic log: "), close
    assert close["bytes_in"] == 0


def test_count_refuses_payload_mode(tmp_path: Path) -> None:
    with TrafficLog(str(tmp_path / "t.jsonl"), mode="payload") as log:
        flow = log.open_flow(direction="out", local="100.64.0.2:1", remote="100.64.0.1:2",
                             whois=None)
        with pytest.raises(ValueError, match=r"Flow\.data"):
            flow.count("app->peer", 10)
        flow.close()
