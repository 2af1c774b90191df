"""Socket-level behaviour of the client: connect retry, exact header reads, TailnetSocket.

Everything here runs over real kernel sockets (socketpair / Unix sockets); the far end
is played by the test with the real protocol encoders from tsnet2.proto.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import selectors
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tsnet2
from tsnet2 import proto
from tsnet2.client._backend_sync import TailnetSocket
from tsnet2.client._sync.channel import HeaderEOF, read_header_line


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)  # the client's side: its channels are non-blocking
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _adopt(sock: socket.socket) -> TailnetSocket:
    local = (ipaddress.ip_address("100.64.0.2"), 40000)
    remote = (ipaddress.ip_address("fd7a:115c:a1e0::1"), 8080)
    return TailnetSocket._adopt(sock, local, remote)


# -- connect retry --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "not-listening"])
def test_start_gives_up_after_connect_timeout(face: Any, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "tsnet2.sock"
    stale = None
    if kind == "not-listening":  # a socket file nobody accepts on: ECONNREFUSED
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
    try:
        srv = face.Server(socket_path=str(path), connect_timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(tsnet2.DaemonUnavailableError) as ei:
            srv.start()
        elapsed = time.monotonic() - t0
    finally:
        if stale is not None:
            stale.close()
    assert 0.9 <= elapsed < 10, elapsed  # waited for connect_timeout; 10: a hang check
    assert str(path) in str(ei.value)
    assert str(ei.value).startswith("tsnet2.start: ")
    assert isinstance(ei.value, ConnectionError)
    srv.close()  # never started: fine


def test_connect_retries_until_daemon_appears(tmp_path: Path) -> None:
    """The daemon's socket shows up 0.4 s late: start()'s connect keeps retrying."""
    path = tmp_path / "late.sock"
    got: list[bytes] = []

    def late_daemon() -> None:
        time.sleep(0.4)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ls:
            ls.bind(str(path))
            ls.listen(1)
            conn, _ = ls.accept()
            with conn:
                got.append(conn.recv(1))

    t = threading.Thread(target=late_daemon)
    t.start()
    from tsnet2.client._sync.channel import connect_channel

    sock = connect_channel(str(path), 1, "test", time.monotonic() + 5)
    sock.close()
    t.join(5)
    assert got == [b"\x01"]


# -- exact header reads --------------------------------------------------------------------


def test_header_read_leaves_following_bytes(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(
        proto.encode_dial_reply(True, local="100.64.0.2:1", remote="100.64.0.1:2") + b"PAYLOAD"
    )
    line = read_header_line(a, "test", time.monotonic() + 2)
    assert proto.decode_dial_reply(line).ok
    assert a.recv(100) == b"PAYLOAD"


def test_header_read_in_pieces(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    header = proto.encode_accept_header("0123456789abcdef", "100.64.0.1:80", "100.64.0.2:5555")

    def dribble() -> None:
        for i in range(len(header)):
            b.sendall(header[i : i + 1])
            time.sleep(0.001)
        b.sendall(b"rest")

    t = threading.Thread(target=dribble)
    t.start()
    line = read_header_line(a, "test", time.monotonic() + 5)
    t.join()
    assert line + b"\n" == header
    assert a.recv(100) == b"rest"


def test_header_read_eof_before_any_byte(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.shutdown(socket.SHUT_WR)
    with pytest.raises(HeaderEOF):
        read_header_line(a, "test", time.monotonic() + 2)


def test_header_read_eof_mid_line(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(b'{"ok":')
    b.shutdown(socket.SHUT_WR)
    with pytest.raises(tsnet2.ProtocolError, match="mid-header"):
        read_header_line(a, "test", time.monotonic() + 2)


def test_header_read_is_bounded(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(b"x" * (proto.MAX_HEADER_LINE + 10))
    with pytest.raises(tsnet2.ProtocolError, match="longer than"):
        read_header_line(a, "test", time.monotonic() + 2)
    # A line of exactly the limit is fine.
    c, d = socket.socketpair()
    with c, d:
        d.sendall(b"y" * proto.MAX_HEADER_LINE + b"\nz")
        assert read_header_line(c, "test", None) == b"y" * proto.MAX_HEADER_LINE
        assert c.recv(10) == b"z"


def test_header_read_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(b'{"ok"')  # never finished
    t0 = time.monotonic()
    with pytest.raises(tsnet2.DeadlineExceededError):
        read_header_line(a, "test", time.monotonic() + 0.3)  # only the deadline can end it
    assert time.monotonic() - t0 >= 0.25


# -- TailnetSocket -------------------------------------------------------------------


def test_tailnet_socket_attributes(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    s = _adopt(a)
    with s:
        assert isinstance(s, socket.socket)
        assert a.fileno() == -1  # the descriptor moved
        assert s.gettimeout() is None
        assert s.tailnet_local == (ipaddress.IPv4Address("100.64.0.2"), 40000)
        assert s.tailnet_remote == (ipaddress.IPv6Address("fd7a:115c:a1e0::1"), 8080)
        assert not hasattr(s, "__dict__")  # __slots__: no per-instance dict
        assert "tailnet_remote" in repr(s)
        b.sendall(b"ping")
        assert s.recv(4) == b"ping"
        dup = s.dup()  # socket.dup builds the same class
        with dup:
            assert isinstance(dup, TailnetSocket)


def test_tailnet_socket_names_are_the_tailnet_ends(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # What http.server, WSGI servers and urllib3 read as the client/server address: the
    # tailnet peer and this node, not the daemon's socket path.
    a, b = pair
    with _adopt(a) as s:
        assert s.getpeername() == ("fd7a:115c:a1e0::1", 8080)
        assert s.getsockname() == ("100.64.0.2", 40000)
        assert "laddr=('100.64.0.2', 40000)" in repr(s)
    with TailnetSocket._adopt(b, None, None) as old:  # an old daemon said nothing
        assert old.getpeername() == old.getsockname() == ""  # the Unix socket's own


def test_async_conn_extra_info_is_the_tailnet_ends(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    from tsnet2.client._backend_async import make_conn

    a, _ = pair
    local = (ipaddress.ip_address("100.64.0.2"), 40000)
    remote = (ipaddress.ip_address("100.64.0.3"), 80)

    async def main() -> None:
        conn = await make_conn(a, local, remote)
        async with conn:
            assert conn.get_extra_info("peername") == ("100.64.0.3", 80)
            assert conn.writer.get_extra_info("sockname") == ("100.64.0.2", 40000)
            assert conn.get_extra_info("ssl_object") is None
            assert conn.get_extra_info("nothing", "default") == "default"

    asyncio.run(main())


def test_async_conn_start_tls(
    pair: tuple[socket.socket, socket.socket], cert: tuple[str, str]
) -> None:
    from tsnet2.client._backend_async import make_conn

    a, b = pair
    crt, key = cert
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(crt, key)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True) as tb:
                tb.sendall(tb.recv(100).upper())
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    async def main() -> bytes:
        conn = await make_conn(a, None, None)
        async with conn:
            await conn.start_tls(ssl.create_default_context(cafile=crt),
                                 server_hostname="peer.tailnet", timeout=5)
            assert conn.get_extra_info("ssl_object") is not None
            conn.writer.write(b"secret")
            return await conn.reader.readexactly(6)

    t = threading.Thread(target=serve)
    t.start()
    assert asyncio.run(main()) == b"SECRET"
    t.join(5)
    assert not errors


def test_tailnet_socket_half_close(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with _adopt(a) as s:
        s.sendall(b"request")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := b.recv(100):
            data += chunk
        assert data == b"request"  # the peer saw EOF
        b.sendall(b"reply")  # ...and can still answer
        b.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"reply"
        assert s.recv(100) == b""


def test_tailnet_socket_with_selectors(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with _adopt(a) as s, selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_READ)
        assert sel.select(0.05) == []
        b.sendall(b"x")
        events = sel.select(2)
        assert [key.fileobj for key, _ in events] == [s]


def test_tailnet_socket_with_http_client(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair

    def serve() -> None:
        req = b""
        while b"\r\n\r\n" not in req:
            req += b.recv(1024)
        assert req.startswith(b"GET /hello HTTP/1.1\r\n")
        b.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nworld")

    t = threading.Thread(target=serve)
    t.start()
    with _adopt(a) as s:
        conn = http.client.HTTPConnection("peer.tailnet")
        conn.sock = s
        conn.request("GET", "/hello")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"world")
        conn.close()
    t.join(5)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=peer.tailnet", "-keyout", str(key), "-out", str(crt)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(crt), str(key)


def test_tailnet_socket_with_ssl(
    pair: tuple[socket.socket, socket.socket], cert: tuple[str, str]
) -> None:
    a, b = pair
    crt, key = cert
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(crt, key)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True) as tb:
                tb.sendall(tb.recv(100).upper())
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    client_ctx = ssl.create_default_context(cafile=crt)
    with client_ctx.wrap_socket(_adopt(a), server_hostname="peer.tailnet") as tls:
        tls.sendall(b"secret")
        assert tls.recv(100) == b"SECRET"
    t.join(5)
    assert not errors


def test_tailnet_socket_with_asyncio(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    s = _adopt(a)

    async def main() -> bytes:
        reader, writer = await asyncio.open_connection(sock=s)
        writer.write(b"hi")
        await writer.drain()
        data = await reader.readexactly(3)
        writer.close()
        await writer.wait_closed()
        return data

    def peer() -> None:
        assert b.recv(2) == b"hi"
        b.sendall(b"yo!")

    t = threading.Thread(target=peer)
    t.start()
    assert asyncio.run(main()) == b"yo!"
    t.join(5)
