"""Issue 14: common Python HTTP clients reach a tailnet HTTP server by name, on public APIs.

Node B serves HTTP/1.1 on a tsnet2 Listener (``http.server``'s handler on each accepted
TailnetSocket, one thread per connection) and answers with JSON naming the caller as B
sees it: the flow's tailnet address and the identity from B's LocalAPI whois. Node A calls
``http://tsnet2-b:PORT/`` with httpx (sync, asyncio), requests, aiohttp, http.client and
``Server.http_client()``; every flow must be in A's traffic log (open and close).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import tsnet2
from tsnet2.lab.tailnet import LocalTailnet

from .tailnet import read_log, running_tailnet, wait_for

pytestmark = pytest.mark.netns

httpx = pytest.importorskip("httpx")
requests = pytest.importorskip("requests")
aiohttp = pytest.importorskip("aiohttp")

from tsnet2.integrations.aiohttp import TailnetConnector  # noqa: E402
from tsnet2.integrations.http_client import HTTPConnection, HTTPSConnection  # noqa: E402
from tsnet2.integrations.httpx import AsyncTailnetTransport, TailnetTransport  # noqa: E402
from tsnet2.integrations.requests import TailnetAdapter  # noqa: E402

TIMEOUT = 30


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with who called, as B sees it. ``?close=header`` answers with
    ``Connection: close``; ``?close=silent`` closes after the response without saying so
    (a keep-alive response on a connection the server then drops)."""

    protocol_version = "HTTP/1.1"
    server: HTTPOnTailnet  # type: ignore[assignment]

    def do_GET(self) -> None:
        if "hold" in self.path:  # answer once the test let go (test_read_timeout)
            assert self.server.hold.wait(TIMEOUT)
        ip, port = self.client_address  # the TailnetSocket's getpeername()
        who = self.server.srv.local_client().whois(f"{ip}:{port}")
        body = json.dumps({
            "path": self.path,
            "tls": isinstance(self.request, ssl.SSLSocket),
            "tailnet_remote": f"{ip}:{port}",
            "client_address": list(self.client_address),
            "node": who["Node"]["Name"],
            "login": who["UserProfile"]["LoginName"],
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.path.endswith("close=header"):
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        if "close=" in self.path:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class HTTPOnTailnet:
    """A threaded HTTP server on a tsnet2 Listener; ``callers`` are the tailnet
    addresses (``ip:port``) of the connections it accepted, in order."""

    srv: tsnet2.Server
    ln: tsnet2.Listener
    tls: ssl.SSLContext | None = None
    hold: threading.Event = field(default_factory=threading.Event)
    callers: list[str] = field(default_factory=list)
    finished: dict[str, threading.Event] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def serve(self) -> None:
        while True:
            try:
                conn = self.ln.accept()
            except tsnet2.ClosedError:
                return
            remote = conn.tailnet_remote
            assert remote is not None
            caller = f"{remote[0]}:{remote[1]}"
            self.finished[caller] = threading.Event()
            self.callers.append(caller)
            t = threading.Thread(target=self.handle, args=(conn, caller), daemon=True)
            self.threads.append(t)
            t.start()

    def handle(self, conn: tsnet2.TailnetSocket, caller: str) -> None:
        try:
            peer = conn.getpeername()
            conn.settimeout(TIMEOUT)
            sock: socket.socket = conn
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, ConnectionError):  # the client refused our certificate
                    conn.close()
                    return
            with sock:
                Handler(sock, peer, self)  # type: ignore[arg-type]
        except ConnectionError:  # the client went away first (test_read_timeout)
            pass
        except Exception as exc:  # reported by the fixture
            self.errors.append(exc)
        finally:
            self.finished[caller].set()

    def wait_closed(self, caller: str) -> None:
        """Wait until the server closed its end of ``caller``'s connection."""
        assert self.finished[caller].wait(TIMEOUT), f"{caller}'s connection is still open"


@dataclass
class Lab:
    net: LocalTailnet
    a: tsnet2.Server
    b: tsnet2.Server
    a_log: Any
    a_socket: str
    http: HTTPOnTailnet
    port: int
    a_ip: str
    a_login: str
    https: HTTPOnTailnet
    https_port: int
    ca: str

    @property
    def base(self) -> str:
        return f"http://tsnet2-b:{self.port}"

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for B's tailnet name (``tsnet2-b``)."""
    d: Path = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=tsnet2-b", "-addext", "subjectAltName=DNS:tsnet2-b",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True, timeout=60)
    return str(crt), str(key)


@pytest.fixture(scope="module")
def lab(cert: tuple[str, str]) -> Iterator[Lab]:
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(*cert)
    with running_tailnet() as net:
        key = net.authkey(reusable=True)
        da = net.add_daemon("tsnet2-a", auth_key=key)
        db = net.add_daemon("tsnet2-b", auth_key=key)
        a = tsnet2.Server(socket_path=str(da.socket_path), hostname="tsnet2-a")
        b = tsnet2.Server(socket_path=str(db.socket_path), hostname="tsnet2-b")
        try:
            a_ip = str(a.up(timeout=TIMEOUT).tailscale_ips[0])
            b.up(timeout=TIMEOUT)
            a_login = a.local_client().whois(a_ip)["UserProfile"]["LoginName"]
            with b.listen("tcp", ":0") as ln, b.listen("tcp", ":0") as tls_ln:
                plain, tls = HTTPOnTailnet(b, ln), HTTPOnTailnet(b, tls_ln, server_tls)
                loops = [threading.Thread(target=s.serve, daemon=True) for s in (plain, tls)]
                for t in loops:
                    t.start()
                yield Lab(net, a, b, da.traffic_log, str(da.socket_path), plain, ln.port,
                          a_ip, a_login, tls, tls_ln.port, cert[0])
            for server in (plain, tls):
                for t in [*loops, *server.threads]:
                    t.join(TIMEOUT)
                    assert not t.is_alive()
                assert not server.errors, server.errors
        finally:
            for srv in (a, b):
                if not srv.closed:
                    srv.close()


def check_answer(lab: Lab, data: dict[str, Any], path: str, *, tls: bool = False) -> str:
    """The handler saw A as the caller (its tailnet address and identity); returns the
    caller's ``ip:port``."""
    assert data["path"] == path and data["tls"] is tls
    ip, _, port = data["tailnet_remote"].rpartition(":")
    assert ip == lab.a_ip
    assert data["client_address"] == [ip, int(port)]  # getpeername() is the tailnet peer
    assert data["node"] == "tsnet2-a.tail-scale.ts.net."
    assert data["login"] == lab.a_login
    assert data["tailnet_remote"] in (lab.https if tls else lab.http).callers
    return str(data["tailnet_remote"])


def wait_logged(lab: Lab, callers: list[str]) -> None:
    """Every one of A's flows from ``callers`` (A's ``ip:port``) has an ``open`` (dir out)
    and a ``close`` record in A's traffic log."""
    missing: list[str] = []

    def done() -> bool:
        recs = read_log(lab.a_log)
        opened = {r["local"]: r["conn_id"] for r in recs
                  if r["kind"] == "open" and r["dir"] == "out"}
        closed = {r["conn_id"] for r in recs if r["kind"] == "close"}
        missing[:] = [f"{c} ({'no open' if c not in opened else 'no close'})"
                      for c in callers if c not in opened or opened[c] not in closed]
        return not missing
    try:
        wait_for(done, TIMEOUT, f"open and close records of {callers} in A's traffic log")
    except AssertionError as exc:
        servers = {c: s.finished[c].is_set() for s in (lab.http, lab.https) for c in callers
                   if c in s.finished}
        raise AssertionError(f"{exc}; missing: {missing}; B closed its end: {servers}") \
            from None


def test_httpx_sync(lab: Lab) -> None:
    with httpx.Client(transport=TailnetTransport(lab.a), timeout=TIMEOUT) as client:
        first = client.get(f"{lab.base}/one")
        second = client.get(f"{lab.base}/two")
    c1 = check_answer(lab, first.json(), "/one")
    c2 = check_answer(lab, second.json(), "/two")
    assert c1 == c2  # keep-alive: one flow for both
    wait_logged(lab, [c1])


def test_httpx_sync_reconnects_after_the_server_closed(lab: Lab) -> None:
    transport = TailnetTransport(lab.a)
    with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
        c1 = check_answer(lab, client.get(f"{lab.base}/x?close=silent").json(),
                          "/x?close=silent")
        lab.http.wait_closed(c1)  # B dropped the keep-alive connection without saying so
        wait_for(lambda: all(c.has_expired() for c in transport.pool.connections), TIMEOUT,
                 "the pooled connection to see the server's EOF")
        c2 = check_answer(lab, client.get(f"{lab.base}/y").json(), "/y")
    assert c1 != c2
    wait_logged(lab, [c1, c2])


def test_httpx_async(lab: Lab) -> None:
    async def main() -> list[dict[str, Any]]:
        async with tsnet2.AsyncServer(socket_path=lab.a_socket, hostname="tsnet2-a") as srv, \
                httpx.AsyncClient(transport=AsyncTailnetTransport(srv),
                                  timeout=TIMEOUT) as client:
            r1 = await client.get(f"{lab.base}/a?close=header")
            r2 = await client.get(f"{lab.base}/b")
            return [r1.json(), r2.json()]

    d1, d2 = asyncio.run(main())
    c1, c2 = check_answer(lab, d1, "/a?close=header"), check_answer(lab, d2, "/b")
    assert c1 != c2
    wait_logged(lab, [c1, c2])


def test_server_http_client(lab: Lab) -> None:
    with lab.a.http_client(timeout=TIMEOUT) as client:
        data = client.get(f"{lab.base}/sync").json()
    wait_logged(lab, [check_answer(lab, data, "/sync")])


def test_async_server_http_client(lab: Lab) -> None:
    async def main() -> dict[str, Any]:
        async with tsnet2.AsyncServer(socket_path=lab.a_socket, hostname="tsnet2-a") as srv, \
                srv.http_client(timeout=TIMEOUT) as client:
            r = await client.get(f"{lab.base}/async")
            return dict(r.json())

    wait_logged(lab, [check_answer(lab, asyncio.run(main()), "/async")])


def test_requests_reconnects_on_one_session(lab: Lab) -> None:
    with requests.Session() as session:
        session.mount("http://", TailnetAdapter(lab.a))
        d1 = session.get(f"{lab.base}/1?close=header", timeout=TIMEOUT).json()
        d2 = session.get(f"{lab.base}/2?close=silent", timeout=TIMEOUT).json()
        c1, c2 = check_answer(lab, d1, "/1?close=header"), check_answer(lab, d2, "/2?close=silent")
        lab.http.wait_closed(c2)  # B dropped the keep-alive connection without saying so
        pools = session.get_adapter(lab.base).poolmanager.pools  # the session's pool
        [pool] = [pools[k] for k in pools.keys() if k.key_port == lab.port]  # noqa: SIM118
        pooled = [c for c in pool.pool.queue if c is not None]  # type: ignore[attr-defined]
        assert len(pooled) == 1  # the keep-alive connection B dropped
        wait_for(lambda: not pooled[0].is_connected, TIMEOUT,
                 "the pooled connection to see the server's EOF")
        d3 = session.get(f"{lab.base}/3", timeout=TIMEOUT).json()
        d4 = session.get(f"{lab.base}/4", timeout=TIMEOUT).json()
    assert pool.pool is None and pooled[0].sock is None  # the session closed its flows
    c3, c4 = check_answer(lab, d3, "/3"), check_answer(lab, d4, "/4")
    assert len({c1, c2, c3}) == 3 and c3 == c4  # a new flow after each close, then reuse
    wait_logged(lab, [c1, c2, c3])


def test_aiohttp(lab: Lab) -> None:
    async def main() -> list[dict[str, Any]]:
        async with tsnet2.AsyncServer(socket_path=lab.a_socket, hostname="tsnet2-a") as srv, \
                aiohttp.ClientSession(connector=TailnetConnector(srv)) as session:
            out = []
            for path in ("/p?close=header", "/q"):
                async with session.get(f"{lab.base}{path}",
                                       timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as r:
                    out.append(await r.json())
            return out

    d1, d2 = asyncio.run(main())
    c1, c2 = check_answer(lab, d1, "/p?close=header"), check_answer(lab, d2, "/q")
    assert c1 != c2
    wait_logged(lab, [c1, c2])


def test_http_client_done_right(lab: Lab) -> None:
    # docs/client.md: an HTTPConnection whose connect() dials through tsnet2, so it
    # reconnects after the server closed the connection (no socket.gaierror).
    conn = HTTPConnection("tsnet2-b", lab.port, timeout=TIMEOUT, tsnet2_server=lab.a)
    try:
        answers = []
        for path in ("/h1?close=header", "/h2"):
            conn.request("GET", path)
            answers.append(json.loads(conn.getresponse().read()))
    finally:
        conn.close()
    c1, c2 = check_answer(lab, answers[0], "/h1?close=header"), check_answer(lab, answers[1], "/h2")
    assert c1 != c2
    wait_logged(lab, [c1, c2])


@pytest.mark.parametrize("client", ["httpx", "httpx-async", "requests", "aiohttp",
                                    "http.client"])
def test_https(lab: Lab, client: str) -> None:
    # TLS over the dialed flow, verified against the CA for B's tailnet name.
    url = f"https://tsnet2-b:{lab.https_port}/tls"
    data: Any
    if client == "httpx":
        with lab.a.http_client(verify=lab.client_tls(), timeout=TIMEOUT) as c:
            data = c.get(url).json()
    elif client == "httpx-async":
        async def go_httpx() -> Any:
            async with tsnet2.AsyncServer(socket_path=lab.a_socket, hostname="tsnet2-a") as s,\
                    s.http_client(verify=lab.client_tls(), timeout=TIMEOUT) as c:
                return (await c.get(url)).json()
        data = asyncio.run(go_httpx())
    elif client == "requests":
        with requests.Session() as session:
            session.mount("https://", TailnetAdapter(lab.a))
            data = session.get(url, verify=lab.ca, timeout=TIMEOUT).json()
    elif client == "aiohttp":
        async def go_aiohttp() -> Any:
            async with tsnet2.AsyncServer(socket_path=lab.a_socket, hostname="tsnet2-a") as s,\
                    aiohttp.ClientSession(connector=TailnetConnector(s)) as session, \
                    session.get(url, ssl=lab.client_tls(),
                                timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as r:
                return await r.json()
        data = asyncio.run(go_aiohttp())
    else:
        conn = HTTPSConnection("tsnet2-b", lab.https_port, tsnet2_server=lab.a,
                               context=lab.client_tls(), timeout=TIMEOUT)
        try:
            conn.request("GET", "/tls")
            data = json.loads(conn.getresponse().read())
        finally:
            conn.close()
    caller = check_answer(lab, data, "/tls", tls=True)
    wait_logged(lab, [caller])


@pytest.mark.parametrize("client", ["httpx", "requests"])
def test_https_checks_the_certificate(lab: Lab, client: str) -> None:
    # The default trust store does not know the lab's CA: the handshake fails as a
    # connect error of the library, as over TCP.
    url = f"https://tsnet2-b:{lab.https_port}/tls"
    if client == "httpx":
        with lab.a.http_client() as c, pytest.raises(httpx.ConnectError, match="CERTIFICATE"):
            c.get(url)
    else:
        with requests.Session() as session, pytest.raises(requests.exceptions.SSLError):
            session.mount("https://", TailnetAdapter(lab.a))
            session.get(url, timeout=TIMEOUT)


@pytest.mark.parametrize("client", ["httpx", "httpx-async", "requests", "aiohttp"])
def test_read_timeout(lab: Lab, client: str) -> None:
    # The server holds its answer: the client's read timeout fires, as over TCP, and the
    # abandoned flow is closed (and logged).
    lab.http.hold = threading.Event()
    seen = len(lab.http.callers)
    url = f"{lab.base}/hold"
    try:
        if client == "httpx":
            with lab.a.http_client(timeout=httpx.Timeout(TIMEOUT, read=0.3)) as c, \
                    pytest.raises(httpx.ReadTimeout):
                c.get(url)
        elif client == "httpx-async":
            async def go_httpx() -> None:
                async with tsnet2.AsyncServer(socket_path=lab.a_socket,
                                              hostname="tsnet2-a") as s, \
                        s.http_client(timeout=httpx.Timeout(TIMEOUT, read=0.3)) as c:
                    with pytest.raises(httpx.ReadTimeout):
                        await c.get(url)
            asyncio.run(go_httpx())
        elif client == "requests":
            with requests.Session() as session, pytest.raises(requests.ReadTimeout):
                session.mount("http://", TailnetAdapter(lab.a))
                session.get(url, timeout=(TIMEOUT, 0.3))
        else:
            async def go_aiohttp() -> None:
                async with tsnet2.AsyncServer(socket_path=lab.a_socket,
                                              hostname="tsnet2-a") as s, \
                        aiohttp.ClientSession(connector=TailnetConnector(s)) as session:
                    with pytest.raises(aiohttp.ServerTimeoutError):
                        await session.get(url, timeout=aiohttp.ClientTimeout(
                            total=TIMEOUT, sock_read=0.3))
            asyncio.run(go_aiohttp())
    finally:
        lab.http.hold.set()
    [caller] = lab.http.callers[seen:]
    lab.http.wait_closed(caller)
    wait_logged(lab, [caller])


@pytest.mark.parametrize("client", ["httpx", "httpx-async", "requests", "aiohttp"])
def test_unknown_name_is_the_librarys_connect_error(lab: Lab, client: str) -> None:
    url = f"http://no-such-node:{lab.port}/"

    def rejects() -> int:
        return len([r for r in read_log(lab.a_log) if r["kind"] == "reject"
                    and r["remote"] == f"no-such-node:{lab.port}"])

    before = rejects()
    if client == "httpx":
        with lab.a.http_client() as c, pytest.raises(httpx.ConnectError) as ei:
            c.get(url)
        exc: BaseException = ei.value
    elif client == "httpx-async":
        async def go() -> BaseException:
            async with tsnet2.AsyncServer(socket_path=lab.a_socket, hostname="tsnet2-a") as s,\
                    s.http_client() as c:
                with pytest.raises(httpx.ConnectError) as ei:
                    await c.get(url)
                return ei.value
        exc = asyncio.run(go())
    elif client == "requests":
        with requests.Session() as session, pytest.raises(requests.ConnectionError) as ei:
            session.mount("http://", TailnetAdapter(lab.a))
            session.get(url, timeout=TIMEOUT)
        exc = ei.value
    else:
        async def go() -> BaseException:
            async with tsnet2.AsyncServer(socket_path=lab.a_socket, hostname="tsnet2-a") as s,\
                    aiohttp.ClientSession(connector=TailnetConnector(s)) as session:
                with pytest.raises(aiohttp.ClientConnectorError) as ei:
                    await session.get(url)
                return ei.value
        exc = asyncio.run(go())
    message = str(exc)
    assert "no-such-node" in message and "tsnet2 status" in message, message
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, tsnet2.Error):
        cause = cause.__cause__ or cause.__context__
    assert isinstance(cause, tsnet2.NoSuchPeerError), repr(exc)
    wait_for(lambda: rejects() == before + 1, TIMEOUT, "the failed dial in A's traffic log")
