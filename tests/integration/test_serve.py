"""`tsnet2d --serve` in the lab: node A dials node B's served ports; B's daemon forwards to
targets inside B's network namespace (a stock `python3 -m http.server`, an echo-headers
server) or to Unix sockets, and logs every flow with via/target and the caller's WhoIs."""

from __future__ import annotations

import contextlib
import json
import socket
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
    d = Path("/tmp") / f"ts2serve-{tmp_path_factory.getbasetemp().name}"
    d.mkdir(exist_ok=True)
    www = d / "www"
    www.mkdir(exist_ok=True)
    (www / "hello.txt").write_text("hello from http.server\n")
    proxy_path = d / "proxy.sock"
    proxy_path.unlink(missing_ok=True)
    rules = ("--serve", "80=127.0.0.1:8080", "--serve", "81=127.0.0.1:9",
             "--serve", "82=http:127.0.0.1:8081", "--serve", f"83=proxy:unix:{proxy_path}",
             "--serve", "84=http:unix:/nonexistent/x.sock")
    with two_nodes(("serve-a", "serve-b"), extra_b=rules) as n:
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


def _request(n: TwoNodes, port: int, data: bytes) -> bytes:
    with n.a.dial("tcp", f"serve-b:{port}", timeout=20) as conn:
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
    with n.a.dial("tcp", f"serve-b:{port}", timeout=20) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        # The tailnet connection is reset; the app's end of the flow ends without a byte
        # (A's daemon passes the loss on as it does for any reset flow).
        got = b""
        with contextlib.suppress(ConnectionResetError):
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
