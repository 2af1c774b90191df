"""The pure parts of tsnet2.integrations: dial targets, error messages and mappings, options,
and the network streams over real socket pairs (TLS included). The lab tests
(tests/integration/test_http_clients.py) run the libraries against a real tailnet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import tsnet2
from tsnet2.client._backend_async import make_conn
from tsnet2.client._backend_sync import TailnetSocket
from tsnet2.integrations._common import connect_error_message, dial_target

httpx = pytest.importorskip("httpx")
httpcore = pytest.importorskip("httpcore")
pytest.importorskip("requests")
pytest.importorskip("aiohttp")

from tsnet2.integrations import aiohttp as tail_aiohttp  # noqa: E402
from tsnet2.integrations import httpx as tail_httpx  # noqa: E402
from tsnet2.integrations import requests as tail_requests  # noqa: E402

LOCAL = (ipaddress.ip_address("100.64.0.1"), 41000)
REMOTE = (ipaddress.ip_address("100.64.0.2"), 443)


@pytest.mark.parametrize(("host", "port", "scheme", "want"), [
    ("web", 8080, "http", "web:8080"),
    ("web", None, "http", "web:80"),
    (b"web", None, "https", "web:443"),
    ("web.tail-scale.ts.net.", 80, "http", "web.tail-scale.ts.net.:80"),
    ("100.64.0.2", 80, "http", "100.64.0.2:80"),
    ("fd7a:115c:a1e0::1", 80, "http", "[fd7a:115c:a1e0::1]:80"),
    ("[fd7a:115c:a1e0::1]", None, "https", "[fd7a:115c:a1e0::1]:443"),
])
def test_dial_target(host: str | bytes, port: int | None, scheme: str, want: str) -> None:
    assert dial_target(host, port, scheme) == want


@pytest.mark.parametrize(("host", "port", "scheme"), [
    ("", 80, "http"), ("web", None, "ftp"), ("web", 0, "http"), ("web", 65536, "http"),
])
def test_dial_target_rejects(host: str, port: int | None, scheme: str) -> None:
    with pytest.raises(ValueError):
        dial_target(host, port, scheme)


@pytest.mark.parametrize(("exc", "hint"), [
    (tsnet2.NoSuchPeerError("tsnet2.dial: no tailnet node named 'db'"), "tsnet2 status"),
    (tsnet2.PeerOfflineError("tsnet2.dial: node 'db' is offline"), "offline"),
    (tsnet2.DeadlineExceededError("tsnet2.dial: no reply"), "connect timeout"),
    (tsnet2.NodeDownError("tsnet2.dial: node down"), "this node is not running"),
    (tsnet2.DaemonUnavailableError("tsnet2.dial: gone"), "tsnet2d is running"),
    (tsnet2.DialError("tsnet2.dial: connection refused"), "listens on that port"),
])
def test_connect_error_message_says_what_to_do(exc: tsnet2.Error, hint: str) -> None:
    message = connect_error_message(exc, "db:5432")
    assert message.startswith("cannot connect to db:5432 on the tailnet: tsnet2.dial: ")
    assert hint in message


def test_httpcore_errors_map_to_the_most_specific_httpx_error() -> None:
    for source, target in [
        (httpcore.ConnectError("x"), httpx.ConnectError),
        (httpcore.ConnectTimeout("x"), httpx.ConnectTimeout),
        (httpcore.ReadTimeout("x"), httpx.ReadTimeout),
        (httpcore.WriteError("x"), httpx.WriteError),
        (httpcore.RemoteProtocolError("x"), httpx.RemoteProtocolError),
        (httpcore.PoolTimeout("x"), httpx.PoolTimeout),
    ]:
        with pytest.raises(target) as ei, tail_httpx.map_httpcore_exceptions():
            raise source
        assert ei.value.__cause__ is source and type(ei.value) is target
    with pytest.raises(KeyError), tail_httpx.map_httpcore_exceptions():
        raise KeyError("not httpcore's")


def test_dial_errors_become_httpcore_connect_errors() -> None:
    err = tail_httpx.httpcore_connect_error(tsnet2.NoSuchPeerError("tsnet2.dial: no"), "x:1")
    assert type(err) is httpcore.ConnectError and "tsnet2 status" in str(err)
    err = tail_httpx.httpcore_connect_error(tsnet2.DeadlineExceededError("t"), "x:1")
    assert type(err) is httpcore.ConnectTimeout


def test_http_client_options_split() -> None:
    transport, client = tail_httpx.split_client_options(
        {"verify": False, "http2": False, "retries": 2, "timeout": 5, "base_url": "http://w/"})
    assert transport == {"verify": False, "http2": False, "retries": 2}
    assert client == {"timeout": 5, "base_url": "http://w/", "trust_env": False}
    with pytest.raises(TypeError, match="transport="):
        tail_httpx.split_client_options({"transport": object()})
    with pytest.raises(TypeError, match="proxy="):
        tail_httpx.split_client_options({"proxy": "http://proxy:3128"})


def test_http_client_builds_clients_on_the_tailnet_transport() -> None:
    srv = tsnet2.Server(socket_path="/nonexistent/tsnet2.sock")
    with srv.http_client(timeout=3) as client:
        assert isinstance(client, httpx.Client)
        assert client.timeout.connect == 3
    asrv = tsnet2.AsyncServer(socket_path="/nonexistent/tsnet2.sock")

    async def main() -> None:
        async with asrv.http_client() as client:
            assert isinstance(client, httpx.AsyncClient)
    asyncio.run(main())


def test_aiohttp_ssl_option() -> None:
    ctx = ssl.create_default_context()
    assert tail_aiohttp.ssl_context_for(ctx) is ctx
    assert tail_aiohttp.ssl_context_for(True).verify_mode == ssl.CERT_REQUIRED
    loose = tail_aiohttp.ssl_context_for(False)
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    with pytest.raises(ValueError, match="not supported"):
        tail_aiohttp.ssl_context_for(object())


def test_requests_adapter_uses_tailnet_pools() -> None:
    srv = tsnet2.Server(socket_path="/nonexistent/tsnet2.sock")
    adapter = tail_requests.TailnetAdapter(srv)
    try:
        pool = adapter.poolmanager.connection_from_url("http://web:8080/")
        assert isinstance(pool, tail_requests.TailnetHTTPConnectionPool)
        spool = adapter.poolmanager.connection_from_url("https://web/")
        assert isinstance(spool, tail_requests.TailnetHTTPSConnectionPool)
        assert pool.conn_kw["tsnet2_server"] is srv
    finally:
        adapter.close()


# -- the network streams over real sockets -------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=web", "-addext", "subjectAltName=DNS:web",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True)
    return str(crt), str(key)


def _tls_echo(b: socket.socket, crt: str, key: str, errors: list[BaseException]) -> \
        threading.Thread:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)

    def serve() -> None:
        try:
            with ctx.wrap_socket(b, server_side=True) as tb:
                tb.sendall(tb.recv(100).upper())
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    return t


def test_sync_stream_reads_writes_and_starts_tls(
    pair: tuple[socket.socket, socket.socket], cert: tuple[str, str], tmp_path: Path
) -> None:
    a, b = pair
    sock = TailnetSocket._adopt(a, LOCAL, REMOTE)
    stream = tail_httpx.TailnetNetworkStream(sock, sock)
    assert stream.get_extra_info("server_addr") == ("100.64.0.2", 443)
    assert stream.get_extra_info("client_addr") == ("100.64.0.1", 41000)
    assert stream.get_extra_info("is_readable") is False
    with pytest.raises(httpcore.ReadTimeout):
        stream.read(10, timeout=0.01)
    errors: list[BaseException] = []
    t = _tls_echo(b, *cert, errors)
    tls = stream.start_tls(ssl.create_default_context(cafile=cert[0]), "web", timeout=5)
    try:
        assert tls.get_extra_info("ssl_object") is not None
        assert tls.get_extra_info("server_addr") == ("100.64.0.2", 443)
        tls.write(b"secret", timeout=5)
        assert tls.read(100, timeout=5) == b"SECRET"
    finally:
        tls.close()
    t.join(5)
    assert not errors


def test_sync_stream_tls_failure_is_a_connect_error(
    pair: tuple[socket.socket, socket.socket], cert: tuple[str, str]
) -> None:
    a, b = pair
    sock = TailnetSocket._adopt(a, LOCAL, REMOTE)
    stream = tail_httpx.TailnetNetworkStream(sock, sock)
    errors: list[BaseException] = []
    t = _tls_echo(b, *cert, errors)
    with pytest.raises(httpcore.ConnectError, match="TLS handshake"):  # wrong host name
        stream.start_tls(ssl.create_default_context(cafile=cert[0]), "other", timeout=5)
    assert sock.fileno() == -1  # closed
    t.join(5)


def test_async_stream_reads_writes_and_starts_tls(
    pair: tuple[socket.socket, socket.socket], cert: tuple[str, str]
) -> None:
    a, b = pair
    errors: list[BaseException] = []

    async def main() -> bytes:
        conn = await make_conn(a, LOCAL, REMOTE)
        stream = tail_httpx.AsyncTailnetNetworkStream(conn)
        try:
            assert stream.get_extra_info("server_addr") == ("100.64.0.2", 443)
            assert stream.get_extra_info("client_addr") == ("100.64.0.1", 41000)
            assert stream.get_extra_info("is_readable") is False
            with pytest.raises(httpcore.ReadTimeout):
                await stream.read(10, timeout=0.01)
            t = _tls_echo(b, *cert, errors)
            tls = await stream.start_tls(ssl.create_default_context(cafile=cert[0]), "web",
                                         timeout=5)
            assert tls.get_extra_info("ssl_object") is not None
            await tls.write(b"secret", timeout=5)
            data = b""
            while len(data) < 6:
                data += await tls.read(100, timeout=5)
            await asyncio.to_thread(t.join, 5)
            return data
        finally:
            await stream.aclose()

    assert asyncio.run(main()) == b"SECRET"
    assert not errors


def test_async_stream_sees_the_peers_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair

    async def main() -> None:
        conn = await make_conn(a, LOCAL, REMOTE)
        stream = tail_httpx.AsyncTailnetNetworkStream(conn)
        try:
            b.shutdown(socket.SHUT_WR)
            assert await stream.read(10, timeout=5) == b""
            assert stream.get_extra_info("is_readable") is True
        finally:
            await stream.aclose()

    asyncio.run(main())


def test_every_public_name_has_a_docstring() -> None:
    import inspect

    from tsnet2.integrations import http_client
    for module in (tail_httpx, tail_requests, tail_aiohttp, http_client):
        assert inspect.getdoc(module), module.__name__
        for name in module.__all__:
            obj = getattr(module, name)
            assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
            for attr, value in vars(obj).items() if inspect.isclass(obj) else ():
                if not attr.startswith("_") and inspect.isfunction(value):
                    assert inspect.getdoc(value), f"{module.__name__}.{name}.{attr}"


def test_the_private_hooks_we_override_have_the_shape_we_expect() -> None:
    # The aiohttp connector overrides BaseConnector._create_connection and the requests
    # adapter urllib3's HTTPSConnection._new_conn (docs/client.md, "HTTP clients"): an
    # upgrade that changes them fails here before it fails in use.
    import inspect

    import aiohttp
    import urllib3.connection

    params = list(inspect.signature(aiohttp.BaseConnector._create_connection).parameters)
    assert params == ["self", "req", "traces", "timeout"]
    assert "_create_connection" in vars(aiohttp.UnixConnector)
    assert list(inspect.signature(urllib3.connection.HTTPSConnection._new_conn).parameters) \
        == ["self"]
    assert "self._new_conn()" in inspect.getsource(urllib3.connection.HTTPSConnection.connect)
