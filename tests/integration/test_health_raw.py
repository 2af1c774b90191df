"""The health port's own HTTP handling (h11 on asyncio streams), byte for byte on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from tsnet2.daemon import health as health_mod
from tsnet2.daemon.health import HealthServer
from tsnet2.daemon.metrics import Metrics

GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@asynccontextmanager
async def served() -> AsyncIterator[tuple[str, int, HealthServer]]:
    server = HealthServer(Metrics(), healthz=lambda: (True, ""),
                          readyz=lambda: (False, "r" * 5000))
    host, port = await server.start("127.0.0.1", 0)
    try:
        yield host, port, server
    finally:
        await server.close()


def exchange(host: str, port: int, data: bytes, *, half_close: bool = False) -> bytes:
    """Send bytes (then our FIN if ``half_close``), read until the server closes."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


async def ask(host: str, port: int, data: bytes) -> tuple[bytes, dict[str, str], bytes]:
    out = await asyncio.to_thread(exchange, host, port, data)
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return lines[0].encode(), headers, body


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())  # type: ignore[arg-type]


def test_replies_are_framed_and_close_the_connection() -> None:
    async def main() -> None:
        async with served() as (host, port, _s):
            status, headers, body = await ask(host, port, GET_HEALTHZ)
            assert status == b"HTTP/1.1 200 OK"
            assert headers["content-length"] == "3" and body == b"ok\n"
            assert headers["connection"] == "close"
            # HEAD: the GET reply's length, no body.
            get_len = (await ask(host, port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))[1]
            status, headers, body = await ask(host, port,
                                              b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == b"HTTP/1.1 200 OK" and body == b""
            assert int(headers["content-length"]) > 0
            assert abs(int(headers["content-length"]) - int(get_len["content-length"])) < 64
            # Query strings are ignored; a reason is cut to MAX_REASON characters.
            status, _h, body = await ask(host, port, b"GET /readyz?x=1 HTTP/1.0\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 503 ") and body == b"r" * 1024 + b"\n"
            # A pipelined second request is not answered: one request per connection.
            two = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2
            out = await asyncio.to_thread(exchange, host, port, two)
            assert out.count(b"HTTP/1.1 200") == 1
    run(main)


def test_malformed_requests_get_400_and_the_server_keeps_serving() -> None:
    async def main() -> None:
        async with served() as (host, port, _s):
            for bad in (b"NOT HTTP\r\n\r\n", b"GET /healthz HTTP/1.1\r\nNo colon\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\n\r\n"):  # HTTP/1.1 without Host
                status, headers, body = await ask(host, port, bad)
                assert status.startswith(b"HTTP/1.1 400 "), bad
                assert body.startswith(b"bad request: ")
                assert headers["content-type"] == "text/plain; charset=utf-8"
            # A client that connects and closes without a request gets nothing.
            assert await asyncio.to_thread(exchange, host, port, b"", half_close=True) == b""
            status, _h, _b = await ask(host, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == b"HTTP/1.1 200 OK"
    run(main)


def test_a_slow_request_head_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health_mod, "REQUEST_TIMEOUT", 0.3)

    async def main() -> None:
        async with served() as (host, port, _s):
            t0 = time.monotonic()
            out = await asyncio.to_thread(exchange, host, port, b"GET /healthz HTTP/1.1\r\n")
            assert out == b"" and 0.25 < time.monotonic() - t0 < 3
    run(main)


def test_close_ends_idle_connections_at_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with served() as (host, port, server):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /heal")  # a request that never completes
            await writer.drain()
            deadline = time.monotonic() + 10
            while not server._conns:  # the server has taken the connection
                assert time.monotonic() < deadline, "the server never took the connection"
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            await server.close()
            # At once: not after the request timeout (15 s) the connection still had.
            assert time.monotonic() - t0 < health_mod.REQUEST_TIMEOUT / 2
            # Ended: a FIN, or a reset when the server had not yet read our bytes (the kernel
            # resets a socket closed with unread data): ended all the same.
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            with contextlib.suppress(ConnectionResetError):
                await writer.wait_closed()
            with pytest.raises(OSError):
                await asyncio.open_connection(host, port)
    run(main)
    # Ending a connection is not an error (asyncio logs a handler task that ends cancelled).
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
