"""Apps that do not import tsnet2, on both ends, through their sidecars alone (issue 14).

Two daemons run as an injected sidecar would (``--up``, no library client ever connects):
B forwards tailnet port 80 to a stock ``python3 -m http.server`` in its namespace and port
81, in ``http`` mode, to a server that echoes the headers it got; A offers the egress proxy
and the DNS responder. From A's namespace, real curl reaches B by tailnet name through
SOCKS5, the HTTP proxy and CONNECT, and glibc resolves B's name through the responder.
Each request is one ``open``/``close`` pair in both daemons' logs: ``via`` the egress
protocol on A, ``via: serve`` with the target and A's identity on B.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tsnet2.lab.tailnet import DaemonProc, LocalTailnet

from .tailnet import read_log, running_tailnet, wait_for
from .test_serve import ECHO_HEADERS

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is missing "
                       "(scripts/setup installs it)"),
]

EGRESS = 1055
CURL = shutil.which("curl") or "curl"


# An ASGI app run by uvicorn with its defaults (proxy headers trusted from 127.0.0.1): what
# the docs tell a Kubernetes user to do instead of listen_socket.
WHO_APP = """
import json
import tsnet2

async def app(scope, receive, send):
    ident = tsnet2.identity_from_asgi_scope(scope)
    body = json.dumps({"client": scope["client"][0],
                       "node": ident.node_name if ident else None,
                       "user": ident.user_login if ident else None}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
"""


@dataclass
class Apps:
    net: LocalTailnet
    da: DaemonProc
    db: DaemonProc

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """curl in A's namespace; fails the test on a non-zero exit."""
        return self.net.lab.run(self.da.node.netns,
                                [CURL, "-sS", "--max-time", "20", *args])

    def flow(self, d: DaemonProc, via: str, before: int) -> dict[str, Any]:
        """The open record with ``via`` past the first ``before`` of them, once closed,
        with its close record under ``"close"``."""
        def closed() -> dict[str, Any] | None:
            recs = read_log(d.traffic_log)
            opens = [r for r in recs if r["kind"] == "open" and r.get("via") == via]
            if len(opens) <= before:
                return None
            rec = opens[before]
            close = [r for r in recs if r["kind"] == "close" and r["conn_id"] == rec["conn_id"]]
            return {**rec, "close": close[0]} if close else None
        return wait_for(closed, timeout=20, what=f"a closed {via} flow in {d.name}'s log")

    def count(self, d: DaemonProc, via: str) -> int:
        return sum(1 for r in read_log(d.traffic_log)
                   if r["kind"] == "open" and r.get("via") == via)


def _start(net: LocalTailnet, netns: str, argv: list[str], ready: bytes
           ) -> subprocess.Popen[bytes]:
    proc: subprocess.Popen[bytes] = net.lab.popen(
        netns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = b""
    for _ in range(20):  # the server says it listens, after a few lines at most
        line = proc.stdout.readline()
        seen += line
        if ready in line or not line:
            break
    assert ready in seen, seen
    return proc


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apps]:
    root = tmp_path_factory.mktemp("www")
    (root / "hello.txt").write_text("hello from an unmodified http.server\n")
    procs: list[subprocess.Popen[bytes]] = []
    with running_tailnet() as net:
        key = net.authkey(reusable=True)
        da = net.add_daemon("app-a", auth_key=key, extra_args=(
            "--up", "--hostname", "app-a", "--egress-listen", f"127.0.0.1:{EGRESS}",
            "--dns-listen", "127.0.0.1:53", "--dns-upstream", "127.0.0.1:9"))
        db = net.add_daemon("app-b", auth_key=key, extra_args=(
            "--up", "--hostname", "app-b", "--serve", "80=127.0.0.1:8080",
            "--serve", "81=http:127.0.0.1:8081", "--serve", "82=http:127.0.0.1:8000"))
        etc = Path("/etc/netns") / da.node.netns
        try:
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:3 attempts:1\n")
            procs.append(_start(net, db.node.netns, [
                sys.executable, "-u", "-m", "http.server", "8080", "--bind", "127.0.0.1",
                "--directory", str(root)], b"Serving HTTP"))
            procs.append(_start(net, db.node.netns, [sys.executable, "-u", "-c",
                                                     ECHO_HEADERS, "8081"], b"ready"))
            (root / "whoapp.py").write_text(WHO_APP)
            procs.append(_start(net, db.node.netns, [
                sys.executable, "-u", "-m", "uvicorn", "whoapp:app", "--app-dir", str(root),
                "--host", "127.0.0.1", "--port", "8000"], b"Uvicorn running"))
            # Both rules bound on B's tailnet address (the node came up by itself: --up).
            wait_for(lambda: sum("--serve" in line and "listening on" in line
                                 for line in db.log_text().splitlines()) >= 3,
                     timeout=60, what="B's --serve rules bound")
            # A knows B: its responder answers B's name from the netmap.
            wait_for(lambda: net.lab.run(da.node.netns, ["getent", "ahostsv4", "app-b"],
                                         check=False).returncode == 0,
                     timeout=60, what="app-b in A's netmap")
            yield Apps(net, da, db)
        finally:
            shutil.rmtree(etc, ignore_errors=True)
            with contextlib.suppress(OSError):
                Path("/etc/netns").rmdir()  # only if empty: others may use it
            for p in procs:
                p.terminate()
                p.wait(10)
                if p.stdout is not None:
                    p.stdout.close()


@pytest.mark.parametrize(("how", "via"), [
    (("--socks5-hostname", f"127.0.0.1:{EGRESS}"), "socks5"),
    (("-x", f"http://127.0.0.1:{EGRESS}"), "http-proxy"),
    (("-p", "-x", f"http://127.0.0.1:{EGRESS}"), "http-connect"),
])
def test_curl_to_stock_http_server_through_both_sidecars(apps: Apps, how: tuple[str, ...],
                                                         via: str) -> None:
    before_a, before_b = apps.count(apps.da, via), apps.count(apps.db, "serve")
    out = apps.curl(*how, "http://app-b/hello.txt")
    assert out.stdout == "hello from an unmodified http.server\n"
    a = apps.flow(apps.da, via, before_a)
    b = apps.flow(apps.db, "serve", before_b)
    assert a["dir"] == "out" and a["whois"]["node"].startswith("app-b.")
    assert b["dir"] == "in" and b["target"] == "127.0.0.1:8080"
    assert b["whois"]["node"].startswith("app-a.")
    # The same bytes on both ends: what A's app sent is what B's target got, and back.
    assert a["close"]["bytes_out"] == b["close"]["bytes_in"] > 0
    assert a["close"]["bytes_in"] == b["close"]["bytes_out"] > len(out.stdout)


def test_http_mode_gives_the_unmodified_target_the_callers_identity(apps: Apps) -> None:
    out = apps.curl("--socks5-hostname", f"127.0.0.1:{EGRESS}", "-H",
                    "Tailscale-User-Login: mallory@example.com", "http://app-b:81/who")
    got = {k.lower(): v for k, v in json.loads(out.stdout)["headers"]}
    b = apps.flow(apps.db, "serve", apps.count(apps.db, "serve") - 1)
    assert got["tsnet2-node-name"] == b["whois"]["node"].rstrip(".")
    assert got["tailscale-user-login"] == b["whois"]["user"] != "mallory@example.com"
    assert got["x-forwarded-for"] == b["remote"].rsplit(":", 1)[0]


def test_curl_resolving_names_itself_through_the_dns_responder(apps: Apps) -> None:
    """``--socks5`` (not ``socks5h``): curl resolves ``app-b`` with glibc, whose resolv.conf
    in A's namespace names the responder (``ip netns exec`` bind-mounts
    /etc/netns/NAME/resolv.conf), then asks the proxy for the address. The address is B's,
    the one the one A's flow is logged with."""
    got = apps.net.lab.run(apps.da.node.netns, ["getent", "ahosts", "app-b"]).stdout
    ips = {line.split()[0] for line in got.splitlines()}
    assert any(":" in ip for ip in ips) and any("." in ip for ip in ips), got  # A and AAAA
    before = apps.count(apps.da, "socks5")
    out = apps.curl("--socks5", f"127.0.0.1:{EGRESS}", "http://app-b/hello.txt")
    assert out.stdout == "hello from an unmodified http.server\n"
    a = apps.flow(apps.da, "socks5", before)
    host = a["remote"].rsplit(":", 1)[0].strip("[]")
    assert host in ips and a["remote"].endswith(":80")



def test_uvicorn_on_loopback_with_its_defaults_sees_the_tailnet_caller(apps: Apps) -> None:
    """``--serve 82=http:127.0.0.1:8000`` to uvicorn as it comes (no flags about proxies):
    its ``scope["client"]`` is A's tailnet address and the handler reads A's identity."""
    before = apps.count(apps.db, "serve")
    out = apps.curl("--socks5-hostname", f"127.0.0.1:{EGRESS}", "http://app-b:82/")
    got = json.loads(out.stdout)
    b = apps.flow(apps.db, "serve", before)
    assert b["target"] == "127.0.0.1:8000"
    assert got["client"] == b["remote"].rsplit(":", 1)[0].strip("[]")
    assert got["node"] == b["whois"]["node"].rstrip(".")
    assert got["user"] == b["whois"]["user"]
