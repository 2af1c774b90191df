"""tsnet2d's metrics/health HTTP port: real requests against HealthServer on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tsnet2.daemon.health import HealthServer
from tsnet2.daemon.metrics import Metrics, PeerSample


class Node:
    """Stands in for the daemon's view of its node: the checks read these fields."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.listening = False
        self.rx = 0

    def healthz(self) -> tuple[bool, str]:
        if self.addresses:
            return True, ""
        return False, "node has no tailnet addresses yet: waiting for the control server"

    def readyz(self) -> tuple[bool, str]:
        if not self.listening:
            return False, "socket /run/tsnet2/tsnet2.sock is not listening"
        return self.healthz()

    def peers(self) -> list[PeerSample]:
        return [PeerSample("web", self.rx, 10, 1_700_000_000.0)]


Served = tuple[str, aiohttp.ClientSession, Node, Metrics, HealthServer]


@asynccontextmanager
async def served(**checks: Callable[[], tuple[bool, str]]) -> AsyncIterator[Served]:
    node = Node()
    metrics = Metrics(peers=node.peers)
    server = HealthServer(metrics, healthz=checks.get("healthz", node.healthz),
                          readyz=checks.get("readyz", node.readyz))
    host, port = await server.start("127.0.0.1", 0)
    assert host == "127.0.0.1" and port > 0
    try:
        async with aiohttp.ClientSession() as http:
            yield f"http://{host}:{port}", http, node, metrics, server
    finally:
        await server.close()


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())  # type: ignore[arg-type]


async def get(http: aiohttp.ClientSession, url: str, method: str = "GET",
              **kw: Any) -> tuple[int, str, aiohttp.ClientResponse]:
    async with http.request(method, url, **kw) as r:
        return r.status, await r.text(), r


def raw_request(host: str, port: int, data: bytes) -> bytes:
    """Send bytes, read the whole answer (the server closes after it)."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_healthz_and_readyz_switch_from_503_with_reason_to_200() -> None:
    async def main() -> None:
        async with served() as (base, http, node, _m, _s):
            status, text, r = await get(http, base + "/healthz")
            assert status == 503
            assert text == "node has no tailnet addresses yet: waiting for the control server\n"
            assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
            status, text, _ = await get(http, base + "/readyz")
            assert (status, text) == (503, "socket /run/tsnet2/tsnet2.sock is not listening\n")

            node.listening = True
            status, text, _ = await get(http, base + "/readyz")
            assert status == 503 and "no tailnet addresses" in text

            node.addresses = ["100.64.0.1"]
            assert (await get(http, base + "/healthz"))[:2] == (200, "ok\n")
            assert (await get(http, base + "/readyz"))[:2] == (200, "ok\n")

            node.addresses = []  # the node went down again
            assert (await get(http, base + "/healthz"))[0] == 503
    run(main)


def test_metrics_endpoint_serves_fresh_exposition() -> None:
    async def main() -> None:
        async with served() as (base, http, node, metrics, _s):
            metrics.flow_opened("out")
            metrics.set_netmap_version(9)
            node.rx = 123
            status, text, r = await get(http, base + "/metrics")
            assert status == 200
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                      for f in text_string_to_metric_families(text) for s in f.samples}
            assert values[("tsnet2_flows_opened_total", (("direction", "out"),))] == 1
            assert values[("tsnet2_netmap_version", ())] == 9
            assert values[("tsnet2_peer_receive_bytes_total", (("peer", "web"),))] == 123

            node.rx = 456
            metrics.flow_closed("out", "ok", 1.5)
            _, text, _ = await get(http, base + "/metrics")
            assert 'tsnet2_peer_receive_bytes_total{peer="web"} 456.0' in text
            assert 'tsnet2_flows_closed_total{direction="out",result="ok"} 1.0' in text
            assert 'tsnet2_flows_active{direction="out"} 0.0' in text
    run(main)


def test_head_unknown_paths_methods_and_bodies() -> None:
    async def main() -> None:
        async with served() as (base, http, node, _m, _s):
            node.addresses = ["100.64.0.1"]
            status, text, r = await get(http, base + "/metrics", "HEAD")
            assert status == 200 and text == ""
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")

            for path in ("/", "/metrics/", "/health", "/healthz/x", "/../etc/passwd"):
                status, text, _ = await get(http, base + path)
                assert status == 404, path
                assert "try /metrics, /healthz or /readyz" in text
            assert (await get(http, base + "/nope", "POST"))[0] == 404

            for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
                status, text, r = await get(http, base + "/healthz", method)
                assert status == 405, method
                assert r.headers["Allow"] == "GET, HEAD"
                assert text == f"method {method} not allowed; use GET\n"

            status, text, _ = await get(http, base + "/healthz", data=b"x" * 100)
            assert (status, text) == (413, "request bodies are not accepted\n")
    run(main)


def test_get_with_a_body_is_refused_without_reading_it() -> None:
    async def main() -> None:
        async with served() as (base, _http, node, _m, _server):
            node.addresses = ["100.64.0.1"]
            host, port = base.removeprefix("http://").split(":")
            # Announces 1 GiB and sends a little: answered at once, connection closed.
            req = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n"
                   + b"y" * 1000)
            out = await asyncio.to_thread(raw_request, host, int(port), req)
            assert out.startswith(b"HTTP/1.1 413 ")
            assert out.endswith(b"\r\n\r\nrequest bodies are not accepted\n")
            chunked = (b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"5\r\nhello\r\n0\r\n\r\n")
            out = await asyncio.to_thread(raw_request, host, int(port), chunked)
            assert out.startswith(b"HTTP/1.1 413 ")
            # An explicit empty body is fine.
            ok = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                  b"Connection: close\r\n\r\n")
            out = await asyncio.to_thread(raw_request, host, int(port), ok)
            assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\nok\n")
            # Oversized header lines are refused by the HTTP parser, not buffered.
            huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
            out = await asyncio.to_thread(raw_request, host, int(port), huge)
            assert out.split(b" ", 2)[1] in (b"400", b"431")
    run(main)


def test_failing_checks_and_render_answer_without_crashing_the_server() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("backend lock poisoned")

    async def main() -> None:
        async with served(healthz=broken, readyz=lambda: (False, "")) as (base, http, _n, m, _s):
            status, text, _ = await get(http, base + "/healthz")
            assert (status, text) == (503, "check failed: RuntimeError: backend lock poisoned\n")
            assert (await get(http, base + "/readyz"))[:2] == (503, "not ok\n")

            def bad_render() -> bytes:
                raise ValueError("duplicate series")

            m.render = bad_render  # type: ignore[method-assign]
            status, text, _ = await get(http, base + "/metrics")
            assert (status, text) == (500, "internal error while rendering metrics\n")
            assert (await get(http, base + "/readyz"))[0] == 503  # still serving
    run(main)


def test_close_releases_the_port_and_start_errors_are_clear() -> None:
    async def main() -> None:
        m = Metrics()
        server = HealthServer(m, healthz=lambda: (True, ""), readyz=lambda: (True, ""))
        host, port = await server.start("127.0.0.1", 0)
        with pytest.raises(RuntimeError, match="already started"):
            await server.start("127.0.0.1", 0)

        other = HealthServer(m, healthz=lambda: (True, ""), readyz=lambda: (True, ""))
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await other.start("127.0.0.1", port)
        await other.close()

        async with aiohttp.ClientSession() as http:
            # A kept-alive connection must not hold the port after close().
            assert (await get(http, f"http://{host}:{port}/healthz"))[0] == 200
            await server.close()
            await server.close()  # idempotent
            with pytest.raises(aiohttp.ClientConnectionError):
                await get(http, f"http://{host}:{port}/healthz")

        # The port is free again: a new server binds it.
        again = HealthServer(m, healthz=lambda: (True, ""), readyz=lambda: (True, ""))
        assert await again.start("127.0.0.1", port) == (host, port)
        await again.close()
    run(main)
