"""ControlClient's own HTTP/1.1 (h11 on asyncio streams) against scripted servers on loopback.

The real coordination server is exercised in test_control_server.py; here a raw server sends
exactly the bytes a case needs (chunked, unframed, oversized, cut short, slow, TLS with SNI).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tsnet2.controlclient import AuthError, ControlClient, ControlError, ControlUnavailable
from tsnet2.controlclient import client as client_mod

Reply = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A one-reply-per-connection server; records each request head and whether the
    client closed its side afterwards."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.client_closed: list[bool] = []
        self.sni: list[str | None] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length) if length else b""
            self.requests.append(head + body)
            await self.reply(head, writer)
            self.client_closed.append(await asyncio.wait_for(reader.read(1), 5) == b"")
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.transport.abort()


@asynccontextmanager
async def scripted(reply: Reply, tls: ssl.SSLContext | None = None,
                   host: str = "127.0.0.1") -> AsyncIterator[tuple[Scripted, str]]:
    s = Scripted(reply)
    if tls is not None:
        tls.sni_callback = lambda sock, name, ctx: s.sni.append(name)
    server = await asyncio.start_server(s.handle, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield s, f"{'https' if tls else 'http'}://{host}:{port}"
    finally:
        server.close()
        await server.wait_closed()


def send(data: bytes) -> Reply:
    """Reply with ``data``, then end the server's side (TCP half-close)."""
    async def reply(_head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    return reply


def json_reply(status: int, obj: object, reason: str = "X") -> Reply:
    body = json.dumps(obj).encode()
    return send(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())  # type: ignore[arg-type]


async def until(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``seconds`` (generous: it only
    catches a hang, it does not time anything)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(0.01)


def test_chunked_netmap_and_the_request_it_answers() -> None:
    netmap = {"version": 7, "peers": [{"name": "p" * 5000}]}
    body = json.dumps(netmap).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                       for i in range(0, len(body), 1000)) + b"0\r\n\r\n"

    async def main() -> None:
        reply = send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        async with scripted(reply) as (srv, url), ControlClient(url + "/") as c:
            assert await c.netmap("cred-1", since=3, timeout=0.5) == netmap
            head = srv.requests[0].decode()
            assert head.startswith("GET /v1/netmap?since=3&timeout=0.5 HTTP/1.1\r\n")
            assert f"host: {url.removeprefix('http://')}\r\n" in head.lower()
            assert "authorization: bearer cred-1\r\n" in head.lower()
            assert "connection: close\r\n" in head.lower()
            await until(lambda: bool(srv.client_closed), "the server to see the client's close")
            assert srv.client_closed == [True]
    run(main)


def test_post_bodies_and_an_unframed_reply() -> None:
    async def main() -> None:
        reply = send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"version\": 12}")
        async with scripted(reply) as (srv, url), ControlClient(url) as c:
            assert await c.update_endpoints("k", ["1.2.3.4:41641"]) == 12
            req = srv.requests[0]
            assert req.startswith(b"POST /v1/endpoints HTTP/1.1\r\n")
            assert b"content-type: application/json\r\n" in req.lower()
            assert json.loads(req.split(b"\r\n\r\n", 1)[1]) == {"endpoints": ["1.2.3.4:41641"]}
            await c.deregister("k")
            assert srv.requests[1].startswith(b"POST /v1/deregister HTTP/1.1\r\n")
            assert b"content-length: 0\r\n" in srv.requests[1].lower()
    run(main)


def test_error_statuses_map_to_the_typed_errors() -> None:
    async def main() -> None:
        cases: list[tuple[Reply, type[ControlError], str, int]] = [
            (json_reply(401, {"error": "auth key expired"}), AuthError, "auth key expired", 401),
            (json_reply(403, {"error": "tag:x not permitted"}), AuthError, "tag:x", 403),
            (json_reply(503, {"error": "store down"}), ControlUnavailable, "store down", 503),
            (send(b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nboom!"), ControlError,
             "boom!", 500),
            (send(b"HTTP/1.1 404 Nope\r\nContent-Length: 0\r\n\r\n"), ControlError,
             "HTTP 404", 404),
            (json_reply(200, [1, 2]), ControlError, "invalid reply to /v1/netmap", 200),
            # A hostile server cannot make the daemon recurse or convert huge numbers.
            (send(b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n"
                  + b"[" * 10000 + b"]" * 10000), ControlError, "invalid reply", 200),
            (send(b"HTTP/1.1 200 OK\r\nContent-Length: 50013\r\n\r\n{\"version\": "
                  + b"9" * 50000 + b"}"), ControlError, "invalid reply", 200),
        ]
        for reply, exc_type, text, status in cases:
            async with scripted(reply) as (_srv, url), ControlClient(url) as c:
                with pytest.raises(exc_type, match=text) as ei:
                    await c.netmap("k")
                assert type(ei.value) is exc_type and ei.value.status == status
    run(main)


def test_health() -> None:
    async def main() -> None:
        ok = send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        async with scripted(ok) as (srv, url), ControlClient(url) as c:
            await c.health()
            assert srv.requests[0].startswith(b"GET /healthz HTTP/1.1\r\n")
        for bad in (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnope",
                    b"HTTP/1.1 500 X\r\nContent-Length: 3\r\n\r\nok\n"):
            async with scripted(send(bad)) as (_srv, url), ControlClient(url) as c:
                with pytest.raises(ControlUnavailable, match="not healthy"):
                    await c.health()
    run(main)


def test_bounded_reply_body_and_head() -> None:
    async def main() -> None:
        big = client_mod.MAX_RESPONSE_BODY + 1
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n".encode()
        async with scripted(send(head + b" " * big)) as (_srv, url), ControlClient(url) as c:
            with pytest.raises(ControlError, match="larger than 16777216 bytes") as ei:
                await c.netmap("k")
            assert type(ei.value) is ControlError
        huge_head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (client_mod.MAX_RESPONSE_HEAD + 10)
        async with scripted(send(huge_head)) as (_srv, url), ControlClient(url) as c:
            with pytest.raises(ControlUnavailable, match="bad HTTP reply"):
                await c.netmap("k")
        async with scripted(send(b"SSH-2.0-OpenSSH\r\n\r\n")) as (_srv, url), \
                ControlClient(url) as c:
            with pytest.raises(ControlUnavailable, match="bad HTTP reply"):
                await c.netmap("k")
    run(main)


def test_a_reply_cut_short_is_unavailable() -> None:
    async def main() -> None:
        for cut in (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"ver",
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",
                    b"HTTP/1.1 200 OK\r\nContent-Le",
                    b""):
            async with scripted(send(cut)) as (_srv, url), ControlClient(url) as c:
                with pytest.raises(ControlUnavailable, match="unreachable"):
                    await c.netmap("k")
    run(main)


def test_timeouts_and_the_long_poll_allowance() -> None:
    """The call timeout ends a call the server never answers; a long-poll gets its poll
    timeout on top, so an answer later than the call timeout (but within both) is taken."""
    answered: list[int] = []

    async def slow(_head: bytes, writer: asyncio.StreamWriter) -> None:
        if not answered:  # the first call: no answer at all, only the client's timeout ends it
            answered.append(0)
            await asyncio.sleep(30)
            return
        await asyncio.sleep(0.6)  # longer than the call timeout (0.3 s)
        answered.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"version\":1}")
        await writer.drain()

    async def main() -> None:
        async with scripted(slow) as (srv, url), ControlClient(url, timeout=0.3) as c:
            t0 = time.monotonic()
            with pytest.raises(ControlUnavailable, match="timed out on /v1/netmap"):
                await asyncio.wait_for(c.netmap("k", timeout=0), 20)
            # It waited for its timeout (a lower bound: load can only lengthen it) for a
            # request the server had received and was not going to answer.
            assert time.monotonic() - t0 >= 0.25
            assert len(srv.requests) == 1 and answered == [0]
            # A long-poll gets its poll timeout on top of the call timeout: 30.3 s here, and
            # the answer comes after 0.6 s, later than the call timeout alone allows.
            assert await c.netmap("k", timeout=30) == {"version": 1}
            assert answered == [0, 1]
    run(main)


def test_aclose_aborts_a_call_in_flight_and_refuses_new_ones() -> None:
    async def never(_head: bytes, _writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async def main() -> None:
        async with scripted(never) as (srv, url):
            c = ControlClient(url)
            poll = asyncio.create_task(c.netmap("k", timeout=30))
            await until(lambda: len(srv.requests) == 1, "the poll to reach the server")
            await c.aclose()
            with pytest.raises(ControlUnavailable, match="unreachable"):
                await asyncio.wait_for(poll, 2)
            with pytest.raises(RuntimeError, match="closed"):
                await c.netmap("k")
            await c.aclose()  # idempotent
            # Cancelling a call closes its connection too (no ResourceWarning).
            c2 = ControlClient(url)
            poll = asyncio.create_task(c2.netmap("k", timeout=30))
            await until(lambda: len(srv.requests) == 2, "the second poll to reach the server")
            poll.cancel()
            with pytest.raises(asyncio.CancelledError):
                await poll
            await c2.aclose()
    run(main)


def test_bad_urls_and_header_values() -> None:
    for url in ("ftp://x", "http://", "http://h:99999"):
        with pytest.raises(ValueError, match="control URL"):
            ControlClient(url)

    async def main() -> None:
        async with scripted(json_reply(200, {})) as (srv, url), ControlClient(url) as c:
            with pytest.raises(ControlError, match="cannot send request"):
                await c.netmap("bad\r\nX-Injected: 1")
            assert srv.requests == []
    run(main)


def make_cert(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_https_sends_sni_and_checks_the_hostname(tmp_path: Path) -> None:
    good, good_key = make_cert(tmp_path, "localhost")
    other, other_key = make_cert(tmp_path, "other.example")

    def server_ctx(cert: Path, key: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx

    async def main() -> None:
        ok = json_reply(200, {"version": 2})
        async with scripted(ok, server_ctx(good, good_key), host="localhost") as (srv, url):
            trusting = ssl.create_default_context(cafile=str(good))
            async with ControlClient(url, ssl_context=trusting) as c:
                assert await c.netmap("k") == {"version": 2}
            assert srv.sni == ["localhost"]
            async with ControlClient(url) as untrusting:  # system CAs: not this self-signed one
                with pytest.raises(ControlUnavailable, match=r"unreachable.*CERTIFICATE"):
                    await untrusting.netmap("k")
        async with scripted(ok, server_ctx(other, other_key), host="localhost") as (_s, url):
            trusting = ssl.create_default_context(cafile=str(other))
            async with ControlClient(url, ssl_context=trusting) as c:
                with pytest.raises(ControlUnavailable, match=r"[Hh]ostname mismatch"):
                    await c.netmap("k")
    run(main)


def test_cancelling_a_poll_loop_always_ends_it() -> None:
    # A cancellation arriving at any point of a call (including while the finished
    # connection closes) must end the task: 3.11's wait_for could swallow it there.
    async def main() -> None:
        reply = json_reply(200, {"version": 1})
        async with scripted(reply) as (_srv, url), ControlClient(url) as c:
            async def loop() -> None:
                while True:
                    await c.netmap("k")

            for i in range(150):
                task = asyncio.create_task(loop())
                await asyncio.sleep((i % 15) * 0.0003)
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=3)
                assert done, f"cancelled poll loop {i} did not end"
                assert task.cancelled()
    run(main)
