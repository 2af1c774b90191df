"""Regression: what a flow's first socket reads before the second one is attached.

`Splice.start` attaches the peer socket, then the app socket. A client sends its request
right after connecting, so the daemon's peer socket often has bytes (or EOF, or a reset)
before the app side is there. The splice used to stop the first transport with
``pause_reading()`` in ``connection_made()``, which CPython before 3.11.4 ignores
(gh-103607): the image's Python, Debian bookworm's 3.11.2, read the bytes anyway, the splice
hit an ``AssertionError`` (an empty message) and cut the flow -- docs/image.md known issue
#2: ``"error": "peer: "``, ``bytes_in: 0``, the client reads EOF, the server app gets EPIPE.

Every test runs twice: with this interpreter's asyncio transports, and with
``_SelectorTransport._add_reader`` as CPython 3.11.2 has it (the only line gh-103607
changed), so the 3.11.2 behaviour is tested whatever Python runs the tests. Real sockets
throughout: TCP over loopback for the peer, a Unix socket pair for the app, a real
traffic log. tests/image runs the first case on the image's own Python as well.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import struct
import threading
from asyncio import selector_events
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.tailnet import recv_exactly, relay_sockets
from tsnet2.daemon.splice import Splice
from tsnet2.traffic import TrafficLog

PING = b"ping from t2img-cli-0123456\n"  # 28 bytes, like the pod test's request
PONG = b"pong: " + PING
IO_TIMEOUT = 5.0


def _add_reader_3_11_2(self: Any, fd: int, callback: Callable[..., None], *args: Any) -> None:
    """``asyncio.selector_events._SelectorTransport._add_reader`` of CPython 3.11.2: starts
    reading even when ``pause_reading()`` was called in ``connection_made()``."""
    if self._closing:
        return
    self._loop._add_reader(fd, callback, *args)


@pytest.fixture(params=["this-python", "cpython-3.11.2"])
def transports(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which asyncio transport behaviour the test runs with."""
    if request.param == "cpython-3.11.2":
        transport_class = getattr(selector_events, "_SelectorTransport")  # noqa: B009
        monkeypatch.setattr(transport_class, "_add_reader", _add_reader_3_11_2)
    return str(request.param)


class Flow:
    """A spliced inbound flow: ``remote`` is the tailnet client, ``app`` the server app."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.remote, self.daemon_peer, self.daemon_app, self.app = relay_sockets(IO_TIMEOUT)

    def wait_queued(self) -> None:
        """Block until the daemon's peer socket has something to read (bytes, EOF, reset)."""
        readable, _, _ = select.select([self.daemon_peer], [], [], IO_TIMEOUT)
        assert readable, "nothing arrived at the daemon's peer socket"

    async def splice(self, log: TrafficLog) -> Splice:
        """Start the splice the way the daemon does (peer first, then app)."""
        flow = log.open_flow(direction="in", local="100.64.0.1:8080",
                             remote="100.64.0.2:40000", whois=None)
        sp = Splice(flow)
        await sp.start(self.daemon_app, self.daemon_peer)
        return sp

    def records(self) -> list[dict[str, Any]]:
        """The traffic log's records."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def close(self) -> None:
        """Close the test's ends (the splice owns and closes the daemon's)."""
        self.remote.close()
        self.app.close()


@pytest.fixture
def flow(tmp_path: Path) -> Iterator[Flow]:
    """A connected remote/daemon/app socket set; the test ends closing the outer ends."""
    f = Flow(tmp_path / "traffic.jsonl")
    try:
        yield f
    finally:
        f.close()
        # If the splice never started, its sockets are still ours.
        for s in (f.daemon_peer, f.daemon_app):
            if s.fileno() != -1:
                s.close()


def _recv_until_eof(sock: socket.socket, limit: int) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _close_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    closes = [r for r in records if r["kind"] == "close"]
    assert len(closes) == 1, records
    return closes[0]


def test_request_queued_before_attach_reaches_the_app(transports: str, flow: Flow) -> None:
    """The pod test's exchange: the client's request is already queued at the daemon's peer
    socket when the splice starts; the app gets it, the client gets the reply."""

    async def run() -> None:
        flow.remote.sendall(PING)
        flow.wait_queued()
        with TrafficLog(str(flow.log_path)) as log:
            sp = await flow.splice(log)
            assert await asyncio.to_thread(recv_exactly, flow.app, len(PING)) == PING
            await asyncio.to_thread(flow.app.sendall, PONG)
            assert await asyncio.to_thread(recv_exactly, flow.remote, len(PONG)) == PONG
            flow.app.close()
            flow.remote.close()
            await asyncio.wait_for(sp.done, IO_TIMEOUT)
            assert sp.error is None and sp.result == "ok"

    asyncio.run(run())
    records = flow.records()
    close = _close_record(records)
    assert "error" not in close, close
    assert (close["bytes_in"], close["bytes_out"]) == (len(PING), len(PONG)), close
    data = [(r["dir"], r["len"]) for r in records if r["kind"] == "data"]
    assert data == [("peer->app", len(PING)), ("app->peer", len(PONG))], records


def test_request_and_eof_queued_before_attach(transports: str, flow: Flow) -> None:
    """The client sent its request and shut down its write side before the splice started:
    the app reads the request, then EOF, and its reply still reaches the client."""

    async def run() -> None:
        flow.remote.sendall(PING)
        flow.remote.shutdown(socket.SHUT_WR)
        flow.wait_queued()
        with TrafficLog(str(flow.log_path)) as log:
            sp = await flow.splice(log)
            assert await asyncio.to_thread(_recv_until_eof, flow.app, 4096) == PING
            await asyncio.to_thread(flow.app.sendall, PONG)
            flow.app.shutdown(socket.SHUT_WR)
            assert await asyncio.to_thread(_recv_until_eof, flow.remote, 4096) == PONG
            await asyncio.wait_for(sp.done, IO_TIMEOUT)
            assert sp.result == "ok"

    asyncio.run(run())
    close = _close_record(flow.records())
    assert "error" not in close, close
    assert (close["bytes_in"], close["bytes_out"]) == (len(PING), len(PONG)), close


def test_reset_before_attach_is_passed_on_and_named(transports: str, flow: Flow) -> None:
    """The client reset the connection before the splice started: the flow still ends (the
    app side is reset too) and the close record names the error, never an empty string."""

    async def run() -> None:
        flow.remote.sendall(PING)
        flow.remote.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        flow.remote.close()  # RST
        flow.wait_queued()
        with TrafficLog(str(flow.log_path)) as log:
            sp = await flow.splice(log)
            await asyncio.wait_for(sp.done, IO_TIMEOUT)
            assert sp.result == "error"
        # The app side was ended: EOF (a Unix socket has no reset) after at most the request.
        got = await asyncio.to_thread(_recv_until_eof, flow.app, 4096)
        assert got in (b"", PING)

    asyncio.run(run())
    close = _close_record(flow.records())
    assert close.get("error") == "peer: ECONNRESET: Connection reset by peer", close
    assert close["bytes_out"] == 0, close


def test_bulk_bytes_before_attach_keep_order(transports: str, flow: Flow) -> None:
    """A client streaming before the splice starts: the first chunk is held, reading pauses,
    then everything reaches the app once, in order (flow control still works)."""
    total = 4 * 1024 * 1024
    blob = bytes(i % 251 for i in range(total))

    def send() -> None:
        flow.remote.sendall(blob)
        flow.remote.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)

    async def run() -> bytes:
        sender.start()
        flow.wait_queued()
        with TrafficLog(str(flow.log_path), mode="metadata") as log:
            sp = await flow.splice(log)
            got = await asyncio.to_thread(_recv_until_eof, flow.app, total + 1)
            flow.app.close()
            await asyncio.wait_for(sp.done, IO_TIMEOUT)
        return got

    try:
        got = asyncio.run(run())
    finally:
        sender.join(IO_TIMEOUT)
    assert len(got) == total and got == blob
    close = _close_record(flow.records())
    assert "error" not in close, close
    assert close["bytes_in"] == total, close
