"""Every LocalAPI request gets an HTTP answer: HEAD, 405 + Allow, 404, 400/413/431, 403.

A real ``LocalAPIConnection`` serves one end of a socketpair, with a real ``LocalAPI`` over a
real ``Backend`` in its initial state (no node, so no root needed); the test writes raw
HTTP bytes on the other end and parses what comes back. Answers that need a running node
(HEAD returning 200) are in tests/integration/test_localapi_methods.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tsnet2.daemon.backend import Backend, DeviceConfig, NodeState
from tsnet2.daemon.localapi import (
    MAX_REQUEST,
    LocalAPI,
    LocalAPIConnection,
    LocalAPIRequest,
    Reply,
)

HOST = b"Host: local-tailscaled.sock\r\n"


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        doc = json.loads(self.body)
        assert isinstance(doc, dict)
        return doc


@dataclasses.dataclass
class Session:
    answers: list[Answer]


def parse(data: bytes, heads: list[bool]) -> list[Answer]:
    """Split ``data`` into responses; ``heads[i]`` says response i answers a HEAD (no body)."""
    out: list[Answer] = []
    for head in heads:
        if not data:
            break
        top, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {top!r}"
        status_line, *lines = top.decode("latin-1").split("\r\n")
        version, code, _reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = 0 if head else int(headers.get("content-length", "0"))
        body, data = data[:size], data[size:]
        out.append(Answer(int(code), headers, body))
    assert not data, f"bytes after the expected responses: {data[:200]!r}"
    return out


def session(tmp_path: Path, raw: bytes, heads: list[bool], *, half_close: bool = True,
            setup: Callable[[LocalAPI], None] | None = None) -> Session:
    """Serve one connection that receives ``raw``; return the answers it wrote.

    With ``half_close`` the client shuts its write side after ``raw`` (so a keep-alive
    connection ends); without it, the server must close the connection by itself (else the
    test times out).
    """

    async def main() -> Session:
        loop = asyncio.get_running_loop()
        server_sock, client = socket.socketpair()
        server_sock.setblocking(False)
        client.setblocking(False)
        api = LocalAPI(Backend(tmp_path / "state", DeviceConfig()))
        if setup is not None:
            setup(api)
        serve = asyncio.ensure_future(LocalAPIConnection(api, server_sock).serve())

        async def write() -> None:
            with contextlib.suppress(OSError):  # the server may close before reading it all
                await loop.sock_sendall(client, raw)
                if half_close:
                    client.shutdown(socket.SHUT_WR)

        writer = asyncio.ensure_future(write())
        try:
            async with asyncio.timeout(10):
                await serve
                await writer
        finally:
            server_sock.close()
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := await loop.sock_recv(client, 65536):
                data += chunk
        client.close()
        return Session(parse(data, heads))

    return asyncio.run(main())


def request(method: str, path: str, *extra: bytes, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\n".encode() + HOST + b"".join(extra)
    if body:
        head += f"Content-Length: {len(body)}\r\n".encode()
    return head + b"\r\n" + body


def one(tmp_path: Path, raw: bytes, *, head: bool = False) -> Answer:
    answers = session(tmp_path, raw, [head]).answers
    assert len(answers) == 1, answers
    return answers[0]


# ---- HEAD ----------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["status", "whois?addr=100.64.0.1", "watch-ipn-bus"])
def test_head_on_a_read_endpoint_gets_the_get_headers_without_a_body(
        tmp_path: Path, endpoint: str) -> None:
    # The node is not started, so GET answers 503 (and closes); HEAD answers the same, bodiless.
    get = one(tmp_path, request("GET", f"/localapi/v0/{endpoint}"))
    head = one(tmp_path, request("HEAD", f"/localapi/v0/{endpoint}"), head=True)
    assert head.status == get.status == 503
    assert head.body == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert head.headers["connection"] == "close"


def test_head_answers_with_the_length_of_the_body_it_leaves_out(tmp_path: Path) -> None:
    # A HEAD whose GET would carry a body (a 404 here) used to kill the connection in an h11
    # LocalProtocolError with no answer. Pipelined: the next answers must still be framed.
    raw = (request("HEAD", "/localapi/v0/no-such-thing")
           + request("GET", "/localapi/v0/no-such-thing")
           + request("HEAD", "/elsewhere"))
    s = session(tmp_path, raw, [True, False, True])
    head, get, other = s.answers
    assert head.status == get.status == 404
    assert head.body == b""
    assert int(head.headers["content-length"]) == len(get.body) > 0
    assert "no such LocalAPI endpoint" in get.json()["error"]
    assert other.status == 404 and other.body == b""
    assert all("connection" not in a.headers for a in s.answers)  # keep-alive throughout


# ---- 405 with Allow ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
@pytest.mark.parametrize("endpoint", ["status", "whois?addr=100.64.0.1", "watch-ipn-bus"])
def test_other_methods_on_a_read_endpoint_are_405_with_allow(
        tmp_path: Path, method: str, endpoint: str) -> None:
    a = one(tmp_path, request(method, f"/localapi/v0/{endpoint}", body=b'{"x":1}'))
    assert a.status == 405
    assert a.headers["allow"] == "GET, HEAD"
    assert f"method {method} not allowed" in a.json()["error"]


def test_405_keeps_the_connection_usable(tmp_path: Path) -> None:
    raw = (request("POST", "/localapi/v0/status", body=b"hello")
           + request("DELETE", "/localapi/v0/whois")
           + request("GET", "/localapi/v0/nope"))
    s = session(tmp_path, raw, [False, False, False])
    assert [a.status for a in s.answers] == [405, 405, 404]
    assert all("connection" not in a.headers for a in s.answers)


# ---- 403 and 404 ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT"])
@pytest.mark.parametrize("endpoint", ["dial", "prefs", "start", "logout", "file-put/x/y"])
def test_endpoints_that_would_go_around_the_log_stay_403_for_every_method(
        tmp_path: Path, method: str, endpoint: str) -> None:
    a = one(tmp_path, request(method, f"/localapi/v0/{endpoint}"), head=method == "HEAD")
    assert a.status == 403
    if method != "HEAD":
        assert a.json()["error"].startswith(f"{endpoint}: ")


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
@pytest.mark.parametrize("path", ["/localapi/v0/nope", "/localapi/v0/", "/localapi/v0/status/",
                                  "/", "/metrics", "*"])
def test_unknown_paths_are_404(tmp_path: Path, method: str, path: str) -> None:
    a = one(tmp_path, request(method, path), head=method == "HEAD")
    assert a.status == 404


def test_referer_and_foreign_host_are_still_403(tmp_path: Path) -> None:
    a = one(tmp_path, request("HEAD", "/localapi/v0/status", b"Origin: http://evil\r\n"),
            head=True)
    assert a.status == 403
    raw = b"GET /localapi/v0/status HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    assert one(tmp_path, raw).status == 403


# ---- malformed and oversized requests: an answer, then the connection closes ---------


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"\x00\x01\x02\r\n\r\n",
    b"GET /localapi/v0/status HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /localapi/v0/status HTTP/1.1\r\n" + HOST + b"Content-Length: zz\r\n\r\n",
    b"GET /localapi/v0/status HTTP/1.1\r\n" + HOST + b"Bad Header\r\n\r\n",
    b"POST /localapi/v0/status HTTP/1.1\r\n" + HOST
    + b"Transfer-Encoding: chunked\r\n\r\nnot-hex\r\n",
], ids=["request-line", "binary", "no-host", "content-length", "header", "chunk"])
def test_malformed_requests_are_400_then_closed(tmp_path: Path, raw: bytes) -> None:
    s = session(tmp_path, raw, [False], half_close=False)
    (a,) = s.answers
    assert a.status == 400
    assert a.headers["connection"] == "close"
    assert a.json()["error"].startswith("bad request: ")


def test_oversized_headers_are_431(tmp_path: Path) -> None:
    raw = b"GET /localapi/v0/status HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * MAX_REQUEST
    s = session(tmp_path, raw, [False], half_close=False)
    assert [a.status for a in s.answers] == [431]


def test_a_declared_oversized_body_is_413_before_it_is_sent(tmp_path: Path) -> None:
    raw = (b"POST /localapi/v0/status HTTP/1.1\r\n" + HOST
           + f"Content-Length: {10**12}\r\n\r\n".encode())
    s = session(tmp_path, raw, [False], half_close=False)
    (a,) = s.answers
    assert a.status == 413
    assert a.headers["connection"] == "close"


def test_a_streamed_oversized_body_is_413_after_at_most_the_cap(tmp_path: Path) -> None:
    chunk = b"%x\r\n%s\r\n" % (16384, b"x" * 16384)
    raw = (b"POST /localapi/v0/status HTTP/1.1\r\n" + HOST
           + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * (MAX_REQUEST // 16384 + 8))
    s = session(tmp_path, raw, [False], half_close=False)
    assert [a.status for a in s.answers] == [413]


def test_a_body_within_the_cap_is_read_and_dropped(tmp_path: Path) -> None:
    raw = (request("POST", "/localapi/v0/status", body=b"x" * (MAX_REQUEST - 1))
           + request("GET", "/localapi/v0/nope"))
    s = session(tmp_path, raw, [False, False])
    assert [a.status for a in s.answers] == [405, 404]


def test_http10_request_is_answered_and_closed(tmp_path: Path) -> None:
    s = session(tmp_path, b"HEAD /localapi/v0/nope HTTP/1.0\r\n\r\n", [True], half_close=False)
    assert [a.status for a in s.answers] == [404]


def test_a_failing_handler_is_a_500_not_a_silent_close(tmp_path: Path) -> None:
    async def broken(req: LocalAPIRequest) -> Reply:
        raise RuntimeError("bug")

    def setup(api: LocalAPI) -> None:
        api.register("broken", read_only=True, handler=broken)
        api.backend.state = NodeState.RUNNING  # past the 503 gate; the handler reads nothing

    s = session(tmp_path, request("GET", "/localapi/v0/broken"), [False], half_close=False,
                setup=setup)
    (a,) = s.answers
    assert a.status == 500
    assert a.headers["connection"] == "close"
