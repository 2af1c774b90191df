"""The egress proxy (``--egress-listen``, ``--egress-socket``) with real curl in the netns lab.

Daemon A runs the proxy; node B serves HTTP on a tsnet2 Listener, answering with the
caller's tailnet address. curl runs in A's network namespace, as an app container without
tsnet2 would: through SOCKS5 (``--socks5-hostname``), an HTTP proxy (absolute-form and
CONNECT) and the proxy's Unix socket; every flow must be in A's traffic log with its ``via``,
and every refusal a ``reject`` record, with the daemon serving the next request after it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import tsnet2
from tests.require import needs
from tsnet2.lab.tailnet import DaemonProc, LocalTailnet
from tsnet2.traffic import load_schema

from .tailnet import read_log, running_tailnet, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("curl") is None,
                       reason=needs("netns", "curl is missing (scripts/setup installs it)")),
]

PORT = 1055
HTTP_PORT = 8080
METRICS_PORT = 9464
CURL = shutil.which("curl") or "curl"


@dataclass
class Egress:
    net: LocalTailnet
    da: DaemonProc
    db: DaemonProc
    a: tsnet2.Server
    b: tsnet2.Server
    a_ip: str
    b_ip: str
    sock: Path
    served: list[str]

    def curl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """curl in A's network namespace (as root: the nftables guard stops it all the
        same, it cannot mark its sockets)."""
        return self.net.lab.run(self.da.node.netns, [CURL, "-sS", "--max-time", "20", *args],
                                check=False, timeout=timeout)

    def records(self, kind: str, via: str | None = None) -> list[dict[str, Any]]:
        return [r for r in read_log(self.da.traffic_log)
                if r.get("kind") == kind and (via is None or r.get("via") == via)]

    def connect(self) -> socket.socket:
        """A TCP client of the proxy, in A's network namespace."""
        with self.net.lab.in_netns(self.da.node.netns):
            s = socket.create_connection(("127.0.0.1", PORT), timeout=15)
        return s


def _http_server(ln: tsnet2.Listener, served: list[str]) -> None:
    """Answer each request with the caller's tailnet address (one request per connection)
    until the listener is closed."""
    while True:
        try:
            conn = ln.accept()
        except tsnet2.Error:
            return
        with conn:
            head = b""
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
            served.append(head.decode(errors="replace"))
            body = f"hello {conn.tailnet_remote[0]}\n".encode()
            with contextlib.suppress(OSError):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\nConnection: close\r\n\r\n" + body)


@pytest.fixture(scope="module")
def eg() -> Iterator[Egress]:
    with running_tailnet() as net:
        key = net.authkey(reusable=True)
        sock = net.lab.dir / "egress" / "egress.sock"
        da = net.add_daemon("tsnet2-a", auth_key=key, extra_args=(
            "--egress-listen", f"127.0.0.1:{PORT}", "--egress-socket", str(sock),
            "--metrics-addr", f"127.0.0.1:{METRICS_PORT}"))
        db = net.add_daemon("tsnet2-b", auth_key=key)
        a = tsnet2.Server(socket_path=str(da.socket_path), hostname="tsnet2-a")
        b = tsnet2.Server(socket_path=str(db.socket_path), hostname="tsnet2-b")
        served: list[str] = []
        try:
            sa, sb = a.up(timeout=30), b.up(timeout=30)
            ln = b.listen("tcp", f":{HTTP_PORT}")
            t = threading.Thread(target=_http_server, args=(ln, served), daemon=True)
            t.start()
            try:
                yield Egress(net, da, db, a, b, str(sa.tailscale_ips[0]),
                             str(sb.tailscale_ips[0]), sock, served)
            finally:
                ln.close()
                t.join(10)
        finally:
            for s in (a, b):
                if not s.closed:
                    s.close()


def _flow_logged(eg: Egress, via: str, before: int) -> dict[str, Any]:
    """The newest `open` with `via` after the first `before` of them, once it is closed."""
    opens = wait_for(lambda: eg.records("open", via)[before:], what=f"open via {via}")
    rec = opens[-1]
    assert rec["dir"] == "out"
    assert rec["remote"] == f"{eg.b_ip}:{HTTP_PORT}"
    assert rec["whois"]["node"].startswith("tsnet2-b.")
    wait_for(lambda: any(c["conn_id"] == rec["conn_id"] for c in eg.records("close")),
             what="close record")
    return rec


def _ok(eg: Egress, proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"hello {eg.a_ip}\n"


def test_curl_socks5_hostname(eg: Egress) -> None:
    before = len(eg.records("open", "socks5"))
    _ok(eg, eg.curl("--socks5-hostname", f"127.0.0.1:{PORT}",
                    f"http://tsnet2-b:{HTTP_PORT}/socks"))
    _flow_logged(eg, "socks5", before)
    # The FQDN and the address work too (case and the trailing dot do not matter).
    fqdn = f"TSNET2-B.{eg.net.domain}."
    _ok(eg, eg.curl("--socks5-hostname", f"127.0.0.1:{PORT}", f"http://{fqdn}:{HTTP_PORT}/"))
    _ok(eg, eg.curl("--socks5", f"127.0.0.1:{PORT}", f"http://{eg.b_ip}:{HTTP_PORT}/"))


def test_curl_http_proxy_absolute_form(eg: Egress) -> None:
    before = len(eg.records("open", "http-proxy"))
    _ok(eg, eg.curl("-x", f"http://127.0.0.1:{PORT}", "-H", "Proxy-Authorization: x",
                    f"http://tsnet2-b:{HTTP_PORT}/abs?q=1"))
    rec = _flow_logged(eg, "http-proxy", before)
    head = eg.served[-1]
    assert head.startswith("GET /abs?q=1 HTTP/1.1\r\n"), head
    assert f"Host: tsnet2-b:{HTTP_PORT}\r\n" in head
    assert "Connection: close\r\n" in head
    assert "Proxy-" not in head
    assert rec["via"] == "http-proxy"


def test_curl_http_connect(eg: Egress) -> None:
    before = len(eg.records("open", "http-connect"))
    _ok(eg, eg.curl("-p", "-x", f"http://127.0.0.1:{PORT}",
                    f"http://tsnet2-b:{HTTP_PORT}/tunnel"))
    _flow_logged(eg, "http-connect", before)
    assert eg.served[-1].startswith("GET /tunnel HTTP/1.1\r\n")


def _curl_unix_socks() -> bool:
    # curl >= 7.84 takes a SOCKS proxy on a Unix socket as socks5h://localhost/PATH.
    out = subprocess.run([CURL, "--version"], capture_output=True, text=True, check=False)
    parts = out.stdout.split()[1].split(".") if out.returncode == 0 else ["0"]
    return tuple(int(p) for p in parts[:2] if p.isdigit()) >= (7, 84)


def _socks5_connect(s: socket.socket, host: str, port: int) -> bytes:
    """A minimal SOCKS5 client: greeting, CONNECT by name; returns the reply head."""
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    name = host.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
    return _recv_exact(s, 10)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_unix_socket(eg: Egress) -> None:
    before = len(eg.records("open", "socks5"))
    if _curl_unix_socks():
        _ok(eg, eg.curl("--proxy", f"socks5h://localhost{eg.sock}",
                        f"http://tsnet2-b:{HTTP_PORT}/unix"))
    else:  # an old curl: a stdlib SOCKS5 client on the Unix socket
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(15)
            s.connect(str(eg.sock))
            assert _socks5_connect(s, "tsnet2-b", HTTP_PORT)[:2] == b"\x05\x00"
            s.sendall(b"GET /unix HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).endswith(f"hello {eg.a_ip}\n".encode())
    _flow_logged(eg, "socks5", before)
    # HTTP on the same socket.
    before = len(eg.records("open", "http-proxy"))
    _ok(eg, eg.curl("--unix-socket", str(eg.sock), f"http://tsnet2-b:{HTTP_PORT}/u2",
                    "--request-target", f"http://tsnet2-b:{HTTP_PORT}/u2"))
    _flow_logged(eg, "http-proxy", before)


# ---- refusals ------------------------------------------------------------------------------


def _reject(eg: Egress, before: int, via: str | None, reason: str) -> dict[str, Any]:
    recs = wait_for(lambda: [r for r in eg.records("reject")[before:]
                             if r.get("via") == via], what=f"reject via {via}")
    rec = recs[-1]
    assert rec["reason"] == reason, rec
    assert rec["dir"] == "out"
    return rec


def _still_serves(eg: Egress) -> None:
    _ok(eg, eg.curl("--socks5-hostname", f"127.0.0.1:{PORT}",
                    f"http://tsnet2-b:{HTTP_PORT}/again"))


def test_malformed_socks_greeting(eg: Egress) -> None:
    before = len(eg.records("reject"))
    with eg.connect() as s:
        s.sendall(b"\x05\x00")  # no methods offered
        assert s.recv(2) == b"\x05\xff"
        assert s.recv(10) == b""
    _reject(eg, before, "socks5", "bad_request")
    before = len(eg.records("reject"))
    with eg.connect() as s:
        s.sendall(b"\x05\x01\x00\x05\x01\x00\x09junk")  # address type 9
        assert s.recv(2) == b"\x05\x00"
        assert _recv_exact(s, 10)[:2] == b"\x05\x08"
    _reject(eg, before, "socks5", "bad_request")
    _still_serves(eg)


def test_socks_bind_is_not_supported(eg: Egress) -> None:
    before = len(eg.records("reject"))
    with eg.connect() as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x02\x00\x01" + bytes([100, 64, 0, 1]) + struct.pack(">H", 80))
        assert _recv_exact(s, 10)[:2] == b"\x05\x07"
    _reject(eg, before, "socks5", "bad_request")
    _still_serves(eg)


def test_unknown_name(eg: Egress) -> None:
    before = len(eg.records("reject"))
    with eg.connect() as s:
        assert _socks5_connect(s, "no-such-peer", 80)[:2] == b"\x05\x04"
    rec = _reject(eg, before, "socks5", "not_tailnet")
    assert "no-such-peer" in rec["error"] and "NO_PROXY" in rec["error"]
    before = len(eg.records("reject"))
    proc = eg.curl("-x", f"http://127.0.0.1:{PORT}", "-w", "%{http_code}",
                   "http://example.com/")
    assert proc.stdout.endswith("404"), proc
    assert "no tailnet node named 'example.com'" in proc.stdout
    _reject(eg, before, "http-proxy", "not_tailnet")
    _still_serves(eg)


def test_non_tailnet_address_is_not_dialled(eg: Egress) -> None:
    before = len(eg.records("reject"))
    proc = eg.curl("-p", "-x", f"http://127.0.0.1:{PORT}", "http://1.1.1.1/")
    assert proc.returncode != 0
    assert "403" in proc.stderr, proc.stderr
    rec = _reject(eg, before, "http-connect", "not_tailnet")
    assert rec["remote"] == "1.1.1.1:80"
    before = len(eg.records("reject"))
    with eg.connect() as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + bytes([1, 1, 1, 1]) + struct.pack(">H", 80))
        assert _recv_exact(s, 10)[:2] == b"\x05\x02"
    _reject(eg, before, "socks5", "not_tailnet")
    # Nothing left for 1.1.1.1: no open record, no daemon log line of a dial.
    assert not [r for r in eg.records("open") if r["remote"].startswith("1.1.1.1")]
    assert "dial 1.1.1.1" not in eg.da.log_text()
    _still_serves(eg)


def test_oversized_http_head(eg: Egress) -> None:
    before = len(eg.records("reject"))
    with eg.connect() as s:
        s.sendall(b"GET http://tsnet2-b:8080/ HTTP/1.1\r\n" + b"X-Big: " + b"a" * 20000)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(4096):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    _reject(eg, before, "http-proxy", "bad_request")
    before = len(eg.records("reject"))
    proc = eg.curl("-x", f"http://127.0.0.1:{PORT}", "-w", "%{http_code}",
                   "-H", "X-Pad: " + "b" * 17000, f"http://tsnet2-b:{HTTP_PORT}/")
    assert proc.stdout.endswith("431"), proc
    _reject(eg, before, "http-proxy", "bad_request")
    _still_serves(eg)


def test_slow_client(eg: Egress) -> None:
    """A head that never ends is refused after HEADER_TIMEOUT (10 s) with a 408; meanwhile
    other clients are served."""
    before = len(eg.records("reject"))
    with eg.connect() as s:
        s.settimeout(30)
        s.sendall(b"GET http://tsnet2-b:8080/ HTTP/1.1\r\nHost: tsnet2-b\r\n")
        t0 = time.monotonic()
        _still_serves(eg)
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert 5 < time.monotonic() - t0 < 20
    rec = _reject(eg, before, "http-proxy", "bad_request")
    assert "not received within" in rec["error"]
    # The same for SOCKS5: a greeting and nothing more.
    before = len(eg.records("reject"))
    with eg.connect() as s:
        s.settimeout(30)
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        assert _recv_exact(s, 10)[:2] == b"\x05\x01"
    _reject(eg, before, "socks5", "bad_request")


def test_dial_failure(eg: Egress) -> None:
    """A peer port nobody listens on: the guard on B resets the SYN; 502 / SOCKS 0x05."""
    before = len(eg.records("reject"))
    proc = eg.curl("-x", f"http://127.0.0.1:{PORT}", "-w", "%{http_code}",
                   "http://tsnet2-b:9/")
    assert proc.stdout.endswith("502"), proc
    _reject(eg, before, "http-proxy", "dial_failed")
    _still_serves(eg)


def test_guard_still_blocks_direct_curl(eg: Egress) -> None:
    """The proxy is the way out: a direct curl to B's tailnet address from A's namespace,
    as an unprivileged process, is stopped by the nftables guard."""
    ipaddress.ip_address(eg.b_ip)
    proc = eg.net.lab.run(
        eg.da.node.netns,
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", CURL, "-sS",
         "--max-time", "5", f"http://{eg.b_ip}:{HTTP_PORT}/direct"], check=False)
    assert proc.returncode != 0, proc.stdout
    assert not any("/direct" in h for h in eg.served)


def test_metrics_count_egress(eg: Egress) -> None:
    _still_serves(eg)
    text = eg.curl(f"http://127.0.0.1:{METRICS_PORT}/metrics").stdout
    ok = [ln for ln in text.splitlines()
          if ln.startswith('tsnet2_egress_requests_total{proto="socks5",result="ok"}')]
    assert ok and float(ok[0].split()[-1]) >= 1, ok
    assert 'tsnet2_flows_opened_total{direction="out"}' in text


def test_the_log_is_valid(eg: Egress) -> None:
    """Last: every record the tests above made is valid against the schema, and every
    egress record says how it came."""
    schema = load_schema()
    recs = read_log(eg.da.traffic_log)
    for r in recs:
        jsonschema.validate(r, schema)
    assert {r.get("via") for r in recs if r["kind"] in ("open", "reject")} <= {
        "socks5", "http-connect", "http-proxy"}
    assert {r["kind"] for r in recs} >= {"open", "data", "close", "reject"}
