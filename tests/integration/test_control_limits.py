"""Issue 9, "bounded everything", for the coordination server, over real sockets on 127.0.0.1.

- Idle connections beyond the cap neither lock out /healthz nor register, and the server's
  descriptors stay within ``baseline + max_connections + one accept burst`` (a real
  ``tsnet2 control serve`` process, counted in /proc/PID/fd); with a small open-files limit
  the cap is lowered so that the process never runs out of descriptors.
- A connection that sends half a request head, or nothing, is closed after the header
  timeout; an idle keep-alive one after the idle timeout; a stalled body gets 408.
  Long-polls longer than all of those still work.
- When every connection is busy, a new one gets 503.
- Deeply nested JSON, 50,000-digit numbers and control characters in names are 400.

Every load here is bounded (at most 1,100 connections) and stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from tsnet2.control.limits import ACCEPT_SLACK, ServerLimits
from tsnet2.control.server import ControlServer
from tsnet2.control.sqlite_store import SQLiteStore
from tsnet2.controlclient import ControlClient, ControlUnavailable

ROOT = Path(__file__).resolve().parents[2]
CTL = (sys.executable, "-m", "tsnet2.control")
TIMEOUT = 30.0
"""Upper bound for anything that should take well under a second (a loaded 2-core box)."""


def pub() -> str:
    return base64.b64encode(os.urandom(32)).decode()


# -- a real `tsnet2 control serve` process ----------------------------------------------------


class ServeProcess:
    """``python -m tsnet2.control serve`` on 127.0.0.1:0; stderr is drained by a thread."""

    def __init__(self, db: Path, *extra: str, nofile: int | None = None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

        def limit_fds() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [*CTL, "serve", "--listen", "127.0.0.1:0", "--db", str(db), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=limit_fds,
        )
        self.lines: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        if not self._ready.wait(TIMEOUT) or not self.port:
            self.stop()
            raise AssertionError(f"serve did not start: {self.log}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)$", line.strip())
            if m:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(TIMEOUT)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


@contextlib.contextmanager
def serving(db: Path, *extra: str, nofile: int | None = None) -> Iterator[ServeProcess]:
    server = ServeProcess(db, *extra, nofile=nofile)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log


def authkey(db: Path) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run(
        [*CTL, "authkey", "create", "--db", str(db), "--reusable"],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        check=True,
    )
    return res.stdout.strip()


def http_get(port: int, path: str) -> bytes:
    """One ``GET`` with ``Connection: close``; the whole reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def flood_and_check(server: ServeProcess, key: str, count: int, cap: int) -> dict[str, float]:
    """Open ``count`` idle connections; /healthz and register must still work."""
    baseline = server.fds()
    peak = baseline
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        for i in range(count):
            stack.enter_context(socket.create_connection(("127.0.0.1", server.port)))
            if i % 10 == 0:
                peak = max(peak, server.fds())
        flood_s = time.monotonic() - t0
        # Queued behind every idle connection: answered once all of them were accepted.
        t0 = time.monotonic()
        reply = http_get(server.port, "/healthz")
        health_s = time.monotonic() - t0
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\nok"), reply
        settled = server.fds()
        peak = max(peak, settled)

        async def register() -> dict[str, Any]:
            async with ControlClient(server.url, timeout=TIMEOUT) as client:
                res = await client.register(pub(), "flooded", ["127.0.0.1:1"], auth_key=key)
                await client.health()
                return res.node

        t0 = time.monotonic()
        node = asyncio.run(register())
        register_s = time.monotonic() - t0
        assert node["name"].startswith("flooded")
        after = server.fds()
    # The stated bound: the cap plus ACCEPT_SLACK; settled: the cap (+ a straggler).
    assert peak <= baseline + cap + ACCEPT_SLACK, (baseline, peak)
    assert settled <= baseline + cap + 2, (baseline, settled)
    assert after <= baseline + cap + 2, (baseline, after)
    return {
        "baseline_fds": baseline,
        "peak_fds": peak,
        "settled_fds": settled,
        "flood_s": flood_s,
        "healthz_s": health_s,
        "register_s": register_s,
    }


def test_idle_connections_beyond_the_cap_do_not_lock_out_requests(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    key = authkey(db)
    # The header timeout (default 10 s) does not help here: eviction at the cap does.
    with serving(db, "--max-connections", "32") as server:
        numbers = flood_and_check(server, key, count=300, cap=32)
    print(f"\n300 idle connections, cap 32: {numbers}")
    pressure = [line for line in server.lines if "at the connection limit (32)" in line]
    assert 1 <= len(pressure) <= 2 + int(numbers["flood_s"] / 10), pressure
    assert "Traceback" not in server.log


def test_1100_idle_connections_with_a_small_fd_limit(tmp_path: Path) -> None:
    """The reported fault: 1,100 idle connections used to exhaust the descriptors."""
    db = tmp_path / "c.db"
    key = authkey(db)
    nofile = 512
    with serving(db, nofile=nofile) as server:
        m = re.search(r"leaves room for (\d+) connections only, not 1024", server.log)
        assert m, server.log
        cap = int(m.group(1))
        assert 64 <= cap < nofile
        numbers = flood_and_check(server, key, count=1100, cap=cap)
        assert numbers["peak_fds"] < nofile
    print(f"\n1100 idle connections, RLIMIT_NOFILE {nofile}, cap {cap}: {numbers}")
    assert "Too many open files" not in server.log
    assert "out of system resource" not in server.log
    assert "Traceback" not in server.log


def test_help_states_the_limits() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run(
        [*CTL, "serve", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        check=True,
    )
    text = " ".join(res.stdout.split())
    for flag, default in [
        ("--max-connections", "default 1024"),
        ("--header-timeout", "default 10"),
        ("--idle-timeout", "default 30"),
        ("--body-timeout", "default 10"),
    ]:
        assert flag in text
        assert default in text.split(flag, 2)[2][:400], flag


# -- in-process server with short timeouts -----------------------------------------------------

FAST = ServerLimits(max_connections=8, header_timeout=0.5, idle_timeout=0.5, body_timeout=0.5)


@contextlib.asynccontextmanager
async def control(
    db: Path,
    limits: ServerLimits = FAST,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> AsyncIterator[ControlServer]:
    async with SQLiteStore(db) as store:
        server = ControlServer(store, limits=limits)
        await server.start(tls_cert=tls_cert, tls_key=tls_key)
        try:
            yield server
        finally:
            await server.close()


def port_of(server: ControlServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def raw_connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def until_closed(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    t0 = time.monotonic()
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
            data += chunk
    return data, time.monotonic() - t0


def test_half_head_idle_and_slow_body_are_closed_in_time(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db") as server:
            port = port_of(server)
            assert server.guard is not None
            stats = server.guard.stats
            # Half a head: 408 after the header timeout, then closed.
            async with raw_connection(port) as (reader, writer):
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                data, took = await until_closed(reader)
            assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
            assert b"request head not received within 0.5 s" in data
            assert 0.4 <= took < TIMEOUT
            assert stats.header_timeouts == 1
            # A byte at a time is no way around it: the deadline runs from the first byte.
            async with raw_connection(port) as (reader, writer):
                t0 = time.monotonic()
                closed = asyncio.ensure_future(until_closed(reader))
                for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
                    if closed.done():
                        break
                    with contextlib.suppress(ConnectionError):
                        writer.write(bytes([byte]))
                        await writer.drain()
                    await asyncio.wait([closed], timeout=0.05)
                data, _ = await closed
                took = time.monotonic() - t0
            assert data.startswith(b"HTTP/1.1 408") and took < TIMEOUT
            # Nothing at all: closed after the header timeout, without a reply.
            async with raw_connection(port) as (reader, _writer):
                data, took = await until_closed(reader)
            assert data == b"" and 0.4 <= took < TIMEOUT
            assert stats.header_timeouts == 3
            # A kept-alive connection: one request, then closed after the idle timeout.
            async with raw_connection(port) as (reader, writer):
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                data, took = await until_closed(reader)
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok"), data
            assert 0.4 <= took < TIMEOUT and stats.idle_timeouts == 1
            # The head in time but the body stalls: 408 after the body timeout, closed.
            async with raw_connection(port) as (reader, writer):
                writer.write(
                    b"POST /v1/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                    b'\r\nContent-Length: 100\r\n\r\n{"public_key"'
                )
                data, took = await until_closed(reader)
            assert data.startswith(b"HTTP/1.1 408"), data
            assert b"request body not received within 0.5 s" in data
            assert 0.4 <= took < TIMEOUT
            # After all that, the server still answers.
            async with ControlClient(server.url, timeout=TIMEOUT) as client:
                await client.health()
            assert server.guard.open_connections <= 1

    asyncio.run(main())


def test_long_poll_outlives_the_short_timeouts(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db") as server:
            key = await server.create_auth_key()
            async with ControlClient(server.url, timeout=TIMEOUT) as client:
                res = await client.register(pub(), "poller", auth_key=key)
                first = await client.netmap(res.node_credential, 0, 0)
                settled = await client.netmap(res.node_credential, first["version"], 0.2)
                t0 = time.monotonic()
                # 4x the header, idle and body timeouts: a poll is busy, not idle.
                same = await client.netmap(res.node_credential, settled["version"], 2.0)
                assert time.monotonic() - t0 >= 1.9
                assert same["version"] == settled["version"]

    asyncio.run(main())


def test_new_connection_gets_503_when_every_one_is_busy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ServerLimits(max_connections=2, header_timeout=5, idle_timeout=5, body_timeout=5)

    async def main() -> None:
        async with control(tmp_path / "c.db", limits) as server:
            assert server.guard is not None
            key = await server.create_auth_key(reusable=True)
            async with ControlClient(server.url, timeout=TIMEOUT) as client:
                creds = [
                    (await client.register(pub(), f"n{i}", auth_key=key)).node_credential
                    for i in range(2)
                ]
                versions = [(await client.netmap(c, 0, 0))["version"] for c in creds]
                version = max(versions)
                versions = [(await client.netmap(c, version, 0.1))["version"] for c in creds]
                polls = [asyncio.ensure_future(client.netmap(c, max(versions), 30)) for c in creds]
                deadline = time.monotonic() + TIMEOUT
                while server.guard.idle_connections or server.guard.open_connections < 2:
                    assert time.monotonic() < deadline and not any(p.done() for p in polls)
                    await asyncio.sleep(0.01)
                async with raw_connection(port_of(server)) as (reader, writer):
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    data, _ = await until_closed(reader)
                assert data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), data
                assert b"connection limit (2)" in data
                with pytest.raises(ControlUnavailable):
                    await client.health()
                assert server.guard.stats.refused == 2
                # The polls' clients go away: their connections are freed, there is room again.
                for poll in polls:
                    poll.cancel()
                await asyncio.gather(*polls, return_exceptions=True)
                while server.guard.open_connections:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                await client.health()
        warnings = [r for r in caplog.records if "at the connection limit" in r.getMessage()]
        assert len(warnings) == 1  # rate-limited: one line for both refusals

    asyncio.run(main())


def test_tls_connections_count_from_accept(tmp_path: Path) -> None:
    cert, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key_file), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    limits = ServerLimits(max_connections=4, header_timeout=2, idle_timeout=5, body_timeout=5)

    async def main() -> None:
        async with control(
            tmp_path / "c.db", limits, tls_cert=str(cert), tls_key=str(key_file)
        ) as server:
            assert server.guard is not None and server.url.startswith("https://")
            ctx = ssl.create_default_context(cafile=str(cert))
            async with contextlib.AsyncExitStack() as stack:
                # TCP connections that never start the handshake, beyond the cap.
                silent = [
                    await stack.enter_async_context(raw_connection(port_of(server)))
                    for _ in range(10)
                ]
                async with ControlClient(server.url, ssl_context=ctx, timeout=TIMEOUT) as c:
                    await c.health()
                assert server.guard.stats.evicted >= 6
                # The last ones (not evicted) are closed after the header timeout.
                data, took = await until_closed(silent[-1][0])
                assert data == b"" and took < TIMEOUT
            assert server.guard.stats.header_timeouts >= 1

    asyncio.run(main())


# -- bounded JSON and names -------------------------------------------------------------------


def test_hostile_json_and_names_are_400(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db", ServerLimits()) as server:
            key = await server.create_auth_key(reusable=True)
            url = server.url
            async with aiohttp.ClientSession() as http:

                async def post(path: str, body: bytes, **kw: Any) -> tuple[int, str]:
                    async with http.post(url + path, data=body, **kw) as r:
                        return r.status, (await r.json(content_type=None)).get("error", "")

                good = {"public_key": pub(), "hostname": "good", "auth_key": key}
                status, _ = await post("/v1/register", json.dumps(good).encode())
                assert status == 200
                async with http.post(url + "/v1/register", json=good | {"public_key": pub()}) as r:
                    cred = (await r.json())["node_credential"]
                auth = {"Authorization": f"Bearer {cred}"}
                reg = json.dumps({"public_key": pub(), "hostname": "h", "auth_key": key})
                cases: list[tuple[str, bytes, dict[str, Any], str]] = [
                    ("/v1/register", b"[" * 30_000 + b"]" * 30_000, {}, "deeper than 32"),
                    ("/v1/register", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, {}, "deeper"),
                    ("/v1/register", b"[" * 60_000, {}, "deeper than 32"),
                    ("/v1/register", b'{"n": ' + b"9" * 50_000 + b"}", {}, "at most 100"),
                    (
                        "/v1/register",
                        reg[:-1].encode() + b', "n": 1e' + b"9" * 500 + b"}",
                        {},
                        "at most 100",
                    ),
                    ("/v1/register", b'{"n": NaN}', {}, "NaN"),
                    (
                        "/v1/endpoints",
                        b'{"endpoints": ' + b"[" * 40 + b"]" * 40 + b"}",
                        {"headers": auth},
                        "deeper than 32",
                    ),
                    (
                        "/v1/endpoints",
                        b'{"endpoints": [], "x": -' + b"1" * 20_000 + b"}",
                        {"headers": auth},
                        "at most 100",
                    ),
                    (
                        "/v1/endpoints",
                        b'{"endpoints": ["[fe80::1%a\\nb]:1"]}',
                        {"headers": auth},
                        "ip:port",
                    ),
                ]
                for name in ["web\n", "web\r\n", "we\x00b"]:
                    doc: dict[str, Any] = {"public_key": pub(), "hostname": name, "auth_key": key}
                    cases.append(("/v1/register", json.dumps(doc).encode(), {}, "control char"))
                for tag in ["tag:web\n", "tag:a\r"]:
                    doc = {"public_key": pub(), "hostname": "t", "auth_key": key, "tags": [tag]}
                    cases.append(("/v1/register", json.dumps(doc).encode(), {}, "invalid tag"))
                for path, raw, kw, message in cases:
                    status, error = await post(path, raw, **kw)
                    assert (status, path) == (400, path), (error, raw[:80])
                    assert message in error, (error, raw[:80])
                for query in ["since=1%0A", "since=%D9%A4", "since=" + "9" * 20]:
                    target = yarl.URL(url + "/v1/netmap?" + query, encoded=True)
                    async with http.get(target, headers=auth) as r:
                        assert r.status == 400, query
                        assert "since" in (await r.json())["error"]
                async with http.get(url + "/healthz") as r:
                    assert r.status == 200
            async with ControlClient(url) as client:
                nm = await client.netmap(cred, 0, 0)
            assert sorted([nm["self"]["name"]] + [p["name"] for p in nm["peers"]]) == [
                "good",
                "good-1",
            ]

    asyncio.run(main())


def test_malformed_requests_are_400_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp logs every malformed request with a traceback; here: one line per 10 s."""
    secret = "tsnet2-node-" + "ab" * 32

    async def main() -> None:
        async with control(tmp_path / "c.db", ServerLimits()) as server:
            port = port_of(server)
            bad = [
                b"GET /v1/netmap?since=" + b"9" * 50_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nAuthorization: Bearer "
                + secret.encode()
                + b"x" * 9000
                + b"\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n",
                b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n",
            ] * 5
            for request in bad:
                async with raw_connection(port) as (reader, writer):
                    writer.write(request)
                    data, _ = await until_closed(reader)
                assert re.match(rb"HTTP/1\.[01] 400 ", data), data[:100]
            async with ControlClient(server.url, timeout=TIMEOUT) as client:
                await client.health()

    asyncio.run(main())
    records = [r for r in caplog.records if r.name.startswith(("aiohttp", "tsnet2"))]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelname == "WARNING" and records[0].exc_info is None
    assert "malformed HTTP requests" in records[0].getMessage()
    assert secret not in caplog.text and "Traceback" not in caplog.text
