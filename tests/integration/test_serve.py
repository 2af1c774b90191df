"""`tsnet2d --serve` in the lab: node A dials node B's served ports; B's daemon forwards to
targets inside B's network namespace (a stock `python3 -m http.server`, an echo-headers
server) or to Unix sockets, and logs every flow with via/target and the caller's WhoIs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tsnet2
from tsnet2.proto.proxyv2 import decode_proxy_v2

from .tailnet import TwoNodes, read_log, two_nodes, wait_for

pytestmark = pytest.mark.netns

ECHO_HEADERS = r"""
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"headers": list(self.headers.items()), "path": self.path,
                           "client": self.client_address[0]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
s.serve_forever()
"""


def _start_in_netns(n: TwoNodes, argv: list[str], ready: bytes) -> subprocess.Popen[bytes]:
    """Start a process in B's namespace; wait for `ready` on its stdout."""
    proc: subprocess.Popen[bytes] = n.lnet.lab.popen(
        n.db.node.netns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the server says it listens
    assert ready in line, line
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


class ProxyTarget:
    """A Unix socket server (in this process) that decodes the PROXY v2 header of each
    connection and answers with it as JSON, then echoes the first line after it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                got = None
                while got is None:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                    got = decode_proxy_v2(buf)
                if got is None:
                    continue
                hdr, used = got
                rest = buf[used:]
                while b"\n" not in rest:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    rest += chunk
                assert hdr.src is not None and hdr.dst is not None
                reply = {"src": [str(hdr.src[0]), hdr.src[1]],
                         "dst": [str(hdr.dst[0]), hdr.dst[1]],
                         "identity": hdr.identity(), "line": rest.decode()}
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)
        self.path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TwoNodes, Path]]:
    d = tmp_path_factory.mktemp("serve")
    www = d / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello from http.server\n")
    proxy_path = d / "proxy.sock"
    proxy_path.unlink(missing_ok=True)
    rules = ("--serve", "80=127.0.0.1:8080", "--serve", "81=127.0.0.1:9",
             "--serve", "82=http:127.0.0.1:8081", "--serve", f"83=proxy:unix:{proxy_path}",
             "--serve", "84=http:unix:/nonexistent/x.sock",
             # test_listen_socket_refusals: an unprivileged client (uid 4243) registers
             "--allow-uid", "4243", "--socket-mode", "0666")
    with two_nodes(("serve-a", "serve-b"), extra_b=rules) as n:
        # The rules are bound once B's node runs (a moment after up() returns).
        wait_for(lambda: n.db.log_text().count(": listening on :") >= 5,
                 what="B's serve rules bound")
        http_server = _start_in_netns(
            n, [sys.executable, "-u", "-m", "http.server", "8080", "--bind", "127.0.0.1",
                "--directory", str(www)], b"Serving HTTP")
        echo = _start_in_netns(n, [sys.executable, "-u", "-c", ECHO_HEADERS, "8081"], b"ready")
        proxy = ProxyTarget(proxy_path)
        try:
            yield n, d
        finally:
            proxy.close()
            _stop(echo)
            _stop(http_server)


def _request(n: TwoNodes, port: int, data: bytes, host: str = "serve-b") -> bytes:
    with n.a.dial("tcp", f"{host}:{port}", timeout=20) as conn:
        conn.sendall(data)
        out = b""
        while chunk := conn.recv(65536):
            out += chunk
        return out


def _records(n: TwoNodes, kind: str, port: int) -> list[dict[str, Any]]:
    return [r for r in read_log(n.db.traffic_log) if r.get("kind") == kind
            and r.get("local", "").endswith(f":{port}")]


def test_tcp_to_stock_http_server(served: tuple[TwoNodes, Path]) -> None:
    n, _ = served
    out = _request(n, 80, b"GET /hello.txt HTTP/1.0\r\nHost: serve-b\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 200 OK"), out[:200]
    assert out.endswith(b"hello from http.server\n")
    opens = wait_for(lambda: _records(n, "open", 80), what="open record")
    rec = opens[-1]
    assert rec["via"] == "serve" and rec["target"] == "127.0.0.1:8080"
    assert rec["dir"] == "in"
    assert rec["whois"]["node"].startswith("serve-a.")
    a_ip = str(n.a.tailscale_ips()[0])
    assert rec["remote"].startswith(a_ip + ":")
    closes = wait_for(lambda: [r for r in read_log(n.db.traffic_log)
                               if r.get("kind") == "close" and r["conn_id"] == rec["conn_id"]],
                      what="close record")
    assert closes[0]["bytes_in"] > 0 and closes[0]["bytes_out"] == len(out)


def test_http_mode_identity_and_spoofing(served: tuple[TwoNodes, Path]) -> None:
    n, _ = served
    req = (b"GET /who HTTP/1.1\r\nHost: serve-b\r\nTailscale-User-Login: mallory@evil\r\n"
           b"x-forwarded-for: 6.6.6.6\r\nTsnet2-Node-Name: fake\r\nConnection: close\r\n\r\n")
    out = _request(n, 82, req)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    got = json.loads(body)
    headers: dict[str, list[str]] = {}
    for k, v in got["headers"]:
        headers.setdefault(k.lower(), []).append(v)
    a_ip = str(n.a.tailscale_ips()[0])
    assert headers["x-forwarded-for"] == [a_ip]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["forwarded"] == [f"for={a_ip};proto=http"]
    assert headers["tsnet2-node-name"][0].startswith("serve-a.")
    assert len(headers["tsnet2-node-name"]) == 1
    assert "mallory@evil" not in json.dumps(got)
    # The lab's nodes registered with an auth key: its owner is the user.
    for name in ("tailscale-user-login",):
        assert headers.get(name, ["x"])[0] != "mallory@evil"
    rec = wait_for(lambda: _records(n, "open", 82), what="open record")[-1]
    assert rec["via"] == "serve" and rec["target"] == "127.0.0.1:8081"
    # The data record holds the caller's bytes as sent (before the rewrite).
    datas = wait_for(lambda: [r for r in read_log(n.db.traffic_log)
                              if r.get("kind") == "data" and r["conn_id"] == rec["conn_id"]
                              and r.get("dir") == "peer->app"], what="data record")
    assert datas


def test_http_mode_keepalive_pipelined(served: tuple[TwoNodes, Path]) -> None:
    n, _ = served
    one = b"GET /p%d HTTP/1.1\r\nHost: b\r\nX-Forwarded-For: 1.1.1.1\r\n\r\n"
    last = b"GET /p3 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    out = _request(n, 82, one % 1 + one % 2 + last)
    assert out.count(b"HTTP/1.1 200") == 3
    assert b"1.1.1.1" not in out
    for p in (b"/p1", b"/p2", b"/p3"):
        assert p in out


def test_proxy_mode_unix(served: tuple[TwoNodes, Path]) -> None:
    n, d = served
    out = _request(n, 83, b"hi there\n")
    got = json.loads(out)
    a_ip = str(n.a.tailscale_ips()[0])
    b_ip = str(n.b.tailscale_ips()[0])
    assert got["src"][0] == a_ip and got["dst"] == [b_ip, 83]
    assert got["identity"]["node_name"].startswith("serve-a.")
    assert got["identity"]["conn_id"]
    assert got["line"] == "hi there\n"
    rec = wait_for(lambda: _records(n, "open", 83), what="open record")[-1]
    assert rec["target"] == f"unix:{d / 'proxy.sock'}" and rec["via"] == "serve"
    assert rec["conn_id"] == got["identity"]["conn_id"]


@pytest.mark.parametrize("port", [81, 84])
def test_target_down_rejected_and_daemon_serves_on(served: tuple[TwoNodes, Path],
                                                   port: int) -> None:
    n, _ = served
    # B resets the tailnet connection: A's dial sees it as a failed connect when the reset
    # comes first, else the app's end of the flow ends without a byte (maybe before the
    # app's write, which then fails).
    got = b""
    with contextlib.suppress(tsnet2.DialError, BrokenPipeError, ConnectionResetError), \
            n.a.dial("tcp", f"serve-b:{port}", timeout=20) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while chunk := conn.recv(4096):
            got += chunk
    assert got == b""
    rej = wait_for(lambda: _records(n, "reject", port), what="reject record")[-1]
    assert rej["reason"] == "target_failed" and rej["via"] == "serve"
    assert rej["target"] in ("127.0.0.1:9", "unix:/nonexistent/x.sock")
    assert rej["whois"]["node"].startswith("serve-a.")
    assert not _records(n, "open", port)
    out = _request(n, 80, b"GET /hello.txt HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 200")


def test_library_listen_on_serve_port_refused(served: tuple[TwoNodes, Path]) -> None:
    n, _ = served
    with pytest.raises(tsnet2.AddressInUseError):
        n.b.listen("tcp", ":80")


def test_serve_bound_again_after_node_restart(tmp_path: Path) -> None:
    path = tmp_path / "target.sock"
    target = ProxyTarget(path)
    try:
        with two_nodes(("rs-a", "rs-b"), extra_b=("--serve", f"80=proxy:unix:{path}")) as n:
            wait_for(lambda: "--serve 80=proxy" in n.db.log_text(), what="the rule bound")
            assert json.loads(_request(n, 80, b"one\n", "rs-b"))["line"] == "one\n"
            n.b.close()  # the last hold: B's node goes down, its listeners with it
            wait_for(lambda: re.search(r"listener \w+ closed", n.db.log_text()),
                     what="B's node down (the serve listener closed)")
            with tsnet2.Server(socket_path=str(n.db.socket_path), hostname="rs-b") as b2:
                b2.up(timeout=30)
                wait_for(lambda: n.db.log_text().count("--serve 80=proxy") >= 2,
                         what="the rule bound again")
                assert json.loads(_request(n, 80, b"two\n", "rs-b"))["line"] == "two\n"
    finally:
        target.close()


# ---- Python servers on listen_socket --------------------------------------------------------

async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the framework's client address and the caller's identity."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    ident = tsnet2.identity_from_asgi_scope(scope)
    client = scope.get("client")
    body = json.dumps({"client": client[0] if client else None,
                       "identity": dataclasses.asdict(ident) if ident else None}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


WSGI_APP = '''
import dataclasses, json
import tsnet2

def app(environ, start_response):
    ident = tsnet2.identity_from_wsgi_environ(environ)
    body = json.dumps({"client": environ.get("REMOTE_ADDR"),
                       "identity": dataclasses.asdict(ident) if ident else None}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


def _ask_who(n: TwoNodes, port: int) -> dict[str, Any]:
    out = _request(n, port, b"GET /who HTTP/1.1\r\nHost: serve-b\r\nTailscale-User-Login: "
                   b"mallory\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], out[:300]
    got: dict[str, Any] = json.loads(body)
    return got


def _check_who(n: TwoNodes, got: dict[str, Any], ln: tsnet2.SocketListener) -> None:
    a_ip = str(n.a.tailscale_ips()[0])
    assert got["client"] == a_ip, got
    ident = got["identity"]
    assert ident["peer_ip"] == a_ip
    assert ident["node_name"].startswith("serve-a.")
    assert ident["node_id"]
    assert ident["user_login"] != "mallory"
    rec = wait_for(lambda: _records(n, "open", ln.port), what="open record")[-1]
    assert rec["via"] == "serve" and rec["target"] == f"unix:{ln.path}"
    assert rec["listener_id"] == ln.listener_id
    assert rec["whois"]["node"].startswith("serve-a.")


def test_listen_socket_uvicorn(served: tuple[TwoNodes, Path]) -> None:
    import uvicorn  # a test extra

    n, _ = served
    with n.b.listen_socket("tcp", ":0") as ln:
        assert ln.identity == "http" and ln.port > 0
        assert Path(ln.path).parent == n.db.socket_path.parent
        assert stat.S_IMODE(os.stat(ln.path).st_mode) == 0o600
        config = uvicorn.Config(asgi_app, fd=ln.fileno(), proxy_headers=True,
                                forwarded_allow_ips="*", log_level="warning")
        server = uvicorn.Server(config)
        t = threading.Thread(target=server.run)
        t.start()
        try:
            got = _ask_who(n, ln.port)
        finally:
            server.should_exit = True
            t.join(30)
        _check_who(n, got, ln)
    assert not Path(ln.path).exists()


def test_listen_socket_hypercorn(served: tuple[TwoNodes, Path]) -> None:
    import asyncio

    from hypercorn.asyncio import serve  # a test extra
    from hypercorn.config import Config
    from hypercorn.middleware import ProxyFixMiddleware

    n, _ = served
    with n.b.listen_socket("tcp", ":0", identity="http") as ln:
        config = Config()
        config.bind = [f"fd://{os.dup(ln.fileno())}"]  # hypercorn closes what it is given
        config.loglevel = "WARNING"
        app = ProxyFixMiddleware(asgi_app, mode="legacy", trusted_hops=1)
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        t = threading.Thread(target=lambda: loop.run_until_complete(
            serve(app, config, shutdown_trigger=stop.wait)))  # type: ignore[arg-type]
        t.start()
        try:
            got = _ask_who(n, ln.port)
        finally:
            loop.call_soon_threadsafe(stop.set)
            t.join(30)
            loop.close()
        _check_who(n, got, ln)


def test_listen_socket_gunicorn(served: tuple[TwoNodes, Path], tmp_path: Path) -> None:
    n, _ = served
    (tmp_path / "wsgiapp.py").write_text(WSGI_APP)
    with n.b.listen_socket("tcp", ":0", identity="http+proxy") as ln:
        fd = ln.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"fd://{fd}", "--proxy-protocol",
             "v2", "--workers", "1", "--chdir", str(tmp_path), "--log-level", "warning",
             "wsgiapp:app"], pass_fds=(fd,))
        try:
            got = _ask_who(n, ln.port)
        finally:
            proc.terminate()
            proc.wait(30)
        _check_who(n, got, ln)


def test_listen_socket_reregistered_after_daemon_restart() -> None:
    with two_nodes(("rr-a", "rr-b")) as n, \
            n.b.listen_socket("tcp", ":8090", identity="proxy") as ln:

        def serve_one() -> None:
            conn, _ = ln.socket.accept()
            with conn:
                buf = b""
                while (got := decode_proxy_v2(buf)) is None:
                    buf += conn.recv(4096)
                conn.sendall(json.dumps(got[0].identity()).encode())

        def ask() -> dict[str, str]:
            t = threading.Thread(target=serve_one)
            t.start()
            out: dict[str, str] = json.loads(_request(n, 8090, b"", "rr-b"))
            t.join(30)
            return out

        assert ask()["node_name"].startswith("rr-a.")
        old = ln.listener_id
        n.lnet.stop_daemon("rr-b")
        n.lnet.start_daemon("rr-b")
        # The watcher reconnects (the Server's start and up) and registers the socket.
        wait_for(lambda: ln.listener_id != old, timeout=30, what="the socket registered again")
        assert ask()["node_name"].startswith("rr-a.")


def test_listen_socket_refusals(served: tuple[TwoNodes, Path], tmp_path: Path) -> None:
    """The daemon's checks on a forward socket, through the raw control protocol."""
    from tsnet2.client._sync.server import REGISTER_LISTENER

    n, _ = served
    sock_dir = n.db.socket_path.parent
    outside = tmp_path / "out.sock"
    mine = sock_dir / "t-mine.sock"
    link = sock_dir / "t-link.sock"
    other = sock_dir / "t-other.sock"
    socks = []
    for p in (outside, mine, other):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.listen()
        socks.append(s)
    link.symlink_to(mine)
    os.chown(other, 4242, 4242)
    try:
        def register(path: Path, mode: str = "http") -> Any:
            params = tsnet2.proto.RegisterListenerParams("tcp", ":0", str(path), mode)
            return n.b._rpc("test", REGISTER_LISTENER, params, 10)

        with pytest.raises(tsnet2.DaemonError, match="not in the daemon's socket directory"):
            register(outside)
        with pytest.raises(tsnet2.DaemonError, match="symlink"):
            register(link)
        with pytest.raises(tsnet2.DaemonError, match="forward_mode 'bad_mode'"):
            register(mine, "bad_mode")
        with pytest.raises(tsnet2.DaemonError, match="No such file"):
            register(sock_dir / "t-missing.sock")
        # Root registers here (the test runs as root), so another uid's socket is allowed;
        # an unprivileged client is refused (checked by an unprivileged process below).
        res = register(other)
        n.b._unregister(res.listener_id)
        script = (
            "import sys, tsnet2\n"
            "from tsnet2.client._sync.server import REGISTER_LISTENER\n"
            f"s = tsnet2.Server(socket_path={str(n.db.socket_path)!r}, join=False)\n"
            "s.start()\n"
            "try:\n"
            f"    s._rpc('t', REGISTER_LISTENER, tsnet2.proto.RegisterListenerParams("
            f"'tcp', ':0', {str(mine)!r}, 'http'), 10)\n"
            "except tsnet2.Error as e:\n"
            "    print(type(e).__name__, e)\n"
            "s.close()\n")
        # Let uid 4243 reach the daemon's socket: search permission on its directories.
        modes = {d: stat.S_IMODE(os.stat(d).st_mode) for d in (sock_dir, sock_dir.parent)}
        for d, m in modes.items():
            os.chmod(d, m | 0o001)
        try:
            out = subprocess.run(
                ["setpriv", "--reuid=4243", "--regid=4243", "--clear-groups", sys.executable,
                 "-c", script], capture_output=True, text=True, timeout=60, check=False,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        finally:
            for d, m in modes.items():
                os.chmod(d, m)
        assert out.stdout.startswith("DaemonError "), (out.stdout, out.stderr)
        assert "belongs to uid 0, not to the registering client's uid 4243; refused" \
            in out.stdout
    finally:
        for s in socks:
            s.close()
        for p in (outside, mine, link, other):
            p.unlink(missing_ok=True)


def test_listen_socket_asyncio(served: tuple[TwoNodes, Path]) -> None:
    """The asyncio face: AsyncServer.listen_socket, served by asyncio's own Unix server."""
    import asyncio

    n, _ = served

    async def main() -> dict[str, Any]:
        async with tsnet2.AsyncServer(socket_path=str(n.db.socket_path),
                                      hostname="serve-b") as srv:
            ln = await srv.listen_socket("tcp", ":0", identity="http")
            async with ln:

                async def handle(reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
                    head = await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + head)
                    await writer.drain()
                    writer.close()
                    await writer.wait_closed()

                server = await asyncio.start_unix_server(handle, sock=ln.socket)
                try:
                    out = await asyncio.to_thread(
                        _request, n, ln.port, b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
                finally:
                    server.close()
                    await server.wait_closed()
                return {"out": out.decode(), "path": ln.path}

    got = asyncio.run(main())
    assert got["out"].startswith("HTTP/1.0 200 OK")
    assert f"X-Forwarded-For: {n.a.tailscale_ips()[0]}\r\n" in got["out"]
    assert not Path(got["path"]).exists()


def test_http_mode_refused_upgrade_keeps_rewriting(served: tuple[TwoNodes, Path]) -> None:
    """A target that ignores an Upgrade (http.server does) and keeps the connection: the
    caller's next request on it is still rewritten, not relayed raw."""
    n, _ = served
    req = (b"GET /up HTTP/1.1\r\nHost: b\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
           b"GET /spoof HTTP/1.1\r\nHost: b\r\nTailscale-User-Login: mallory@evil\r\n"
           b"X-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n")
    out = _request(n, 82, req)
    assert out.count(b"HTTP/1.1 200") == 2, out
    assert b"mallory" not in out and b"6.6.6.6" not in out
    assert b'"/spoof"' in out
