"""The prototype's end-to-end scenario (seed-spec §5.2) and parity scenarios S3-S6, S8-S10,
over real wireguard-go devices in network namespaces, with real tsnet2d and control processes.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import tsnet2
from tsnet2.lab.tailnet import LocalTailnet

from .tailnet import read_log, recv_exactly, running_tailnet, wait_for

pytestmark = pytest.mark.netns

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


class Pair:
    """Two daemons with an app Server each: A ("tsnet2-a") and B ("tsnet2-b")."""

    def __init__(self, net: LocalTailnet) -> None:
        self.net = net
        key = net.authkey(reusable=True)
        self.da = net.add_daemon("tsnet2-a", auth_key=key)
        self.db = net.add_daemon("tsnet2-b", auth_key=key)
        self.a = tsnet2.Server(socket_path=str(self.da.socket_path), hostname="tsnet2-a",
                               dir=str(self.da.node.dir), ephemeral=True,
                               traffic_log_path=str(self.da.traffic_log))
        self.b = tsnet2.Server(socket_path=str(self.db.socket_path), hostname="tsnet2-b",
                               ephemeral=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with running_tailnet() as net:
        p = Pair(net)
        try:
            p.a.up(timeout=30)
            p.b.up(timeout=30)
            yield p
        finally:
            for srv in (p.a, p.b):
                if not srv.closed:
                    srv.close()


def _echo_server(listener: Any, results: list[Any], count: int = 1) -> threading.Thread:
    def run() -> None:
        for _ in range(count):
            try:
                conn = listener.accept(timeout=30)
            except Exception as exc:  # reported to the test thread
                results.append(exc)
                return
            with conn:
                results.append(conn.tailnet_remote)
                while data := conn.recv(65536):
                    conn.sendall(data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_prototype_end_to_end(pair: Pair) -> None:
    """seed-spec §5.2 step by step, with the close record polled for."""
    st = pair.a.up(timeout=30)
    assert st.tailscale_ips, "A has no tailnet IP"
    a_ip = st.tailscale_ips[0]
    assert isinstance(a_ip, ipaddress.IPv4Address)
    results: list[Any] = []
    with pair.a.listen("tcp", ":8080") as ln:
        t = _echo_server(ln, results)
        with pair.b.dial("tcp", f"{a_ip}:8080", timeout=30) as conn:
            conn.sendall(b"hello tsnet2")
            assert recv_exactly(conn, 12) == b"hello tsnet2"
        t.join(30)
    assert results and not isinstance(results[0], Exception), results
    who = pair.b.local_client().whois(f"{a_ip}:8080")
    assert who["Node"] is not None and "tsnet2-a" in who["Node"]["Name"]

    def complete() -> list[dict[str, Any]] | None:
        recs = read_log(pair.da.traffic_log)
        closes = [r for r in recs if r["kind"] == "close" and (r["bytes_in"] or r["bytes_out"])]
        return recs if closes else None

    recs = wait_for(complete, 10, "a close record in A's traffic log")
    opens = [r for r in recs if r["kind"] == "open" and r["dir"] == "in"]
    assert opens
    for r in opens:
        assert r["whois"] is not None
        assert r["proto"] == "tcp" and r["local"] and r["remote"]
    payloads = b"".join(base64.b64decode(r["payload_b64"]) for r in recs if r["kind"] == "data")
    assert b"hello tsnet2" in payloads


def test_up_status_reflects_node(pair: Pair) -> None:
    """S3: Up returns IPs; tailscale_ips() and cert_domains() agree with it."""
    st = pair.b.up(timeout=30)
    v4, v6 = pair.b.tailscale_ips()
    assert v4 in st.tailscale_ips and v4 in ipaddress.ip_network("100.64.0.0/10")
    assert v6 is not None and v6 in ipaddress.ip_network("fd7a:115c:a1e0::/48")
    assert pair.b.cert_domains() == st.cert_domains == ["tsnet2-b.tail-scale.ts.net"]


def test_localapi_status_and_whois_by_name(pair: Pair) -> None:
    """S5: status lists the peer; WhoIs by IPv6 works too; unknown IP is a 404."""
    status = pair.b.local_client().status()
    assert status["BackendState"] == "Running"
    assert status["Self"]["DNSName"] == "tsnet2-b.tail-scale.ts.net."
    names = [p["DNSName"] for p in status["Peer"].values()]
    assert "tsnet2-a.tail-scale.ts.net." in names
    _v4, a_v6 = pair.a.tailscale_ips()
    who = pair.b.local_client().whois(str(a_v6))
    assert who["Node"]["Name"] == "tsnet2-a.tail-scale.ts.net."
    assert who["UserProfile"]["LoginName"]
    with pytest.raises(tsnet2.LocalAPIError) as ei:
        pair.b.local_client().whois("100.64.255.254")
    assert ei.value.status == 404


def test_traffic_log_details(pair: Pair) -> None:
    """S6: 40 KiB in >= 3 chunks that concatenate back; seq per direction; byte counts;
    timestamps; conn ids; every open has exactly one close. Dial by hostname and FQDN."""
    payload = bytes(range(256)) * 160  # 40 KiB
    results: list[Any] = []
    with pair.a.listen("tcp", ":8081") as ln:
        t = _echo_server(ln, results, count=2)
        for target in ("tsnet2-a:8081", "tsnet2-a.tail-scale.ts.net.:8081"):
            with pair.b.dial("tcp", target, timeout=30) as conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := conn.recv(65536):
                    got += chunk
                assert got == payload
        t.join(30)

    def both_closed() -> list[dict[str, Any]] | None:
        recs = read_log(pair.db.traffic_log)
        outs = [r for r in recs if r["kind"] == "open" and r["dir"] == "out"
                and r["remote"].endswith(":8081")]
        ids = {r["conn_id"] for r in outs}
        closes = [r for r in recs if r["kind"] == "close" and r["conn_id"] in ids]
        return recs if len(outs) == 2 and len(closes) == 2 else None

    recs = wait_for(both_closed, 10, "both flows closed in B's log")
    for r in recs:
        assert RFC3339.match(r["t"]), r["t"]
        assert re.fullmatch(r"[0-9a-f]{16}", r["conn_id"])
    outs = [r for r in recs if r["kind"] == "open" and r["remote"].endswith(":8081")]
    for op in outs:
        assert op["whois"]["node"] == "tsnet2-a.tail-scale.ts.net."
        cid = op["conn_id"]
        mine = [r for r in recs if r["conn_id"] == cid]
        closes = [r for r in mine if r["kind"] == "close"]
        assert len(closes) == 1
        for direction, total_key in (("app->peer", "bytes_out"), ("peer->app", "bytes_in")):
            data = [r for r in mine if r["kind"] == "data" and r["dir"] == direction]
            assert len(data) >= 3
            assert [r["seq"] for r in data] == list(range(1, len(data) + 1))
            assert all(r["len"] <= 16384 for r in data)
            joined = b"".join(base64.b64decode(r["payload_b64"]) for r in data)
            assert joined == payload
            assert closes[0][total_key] == len(payload)
    # Every open in both logs has exactly one close.
    for log in (pair.da.traffic_log, pair.db.traffic_log):
        all_recs = read_log(log)
        opened = [r["conn_id"] for r in all_recs if r["kind"] == "open"]
        closed = [r["conn_id"] for r in all_recs if r["kind"] == "close"]
        assert sorted(opened) == sorted(set(opened))
        assert sorted(set(closed)) == sorted(closed)
        assert set(closed) <= set(opened)


def test_half_close(pair: Pair) -> None:
    """S10: a peer that sends then shuts its write side still gets the reply; app sees EOF."""
    a_ip = pair.a.tailscale_ips()[0]
    seen: list[Any] = []

    def server(ln: Any) -> None:
        with ln.accept(timeout=30) as conn:
            data = b""
            while chunk := conn.recv(1024):
                data += chunk
            seen.append(data)  # reached EOF: the peer half-closed
            conn.sendall(b"reply:" + data)

    with pair.a.listen("tcp", ":8082") as ln:
        t = threading.Thread(target=server, args=(ln,), daemon=True)
        t.start()
        with pair.b.dial("tcp", f"{a_ip}:8082", timeout=30) as conn:
            conn.sendall(b"question")
            conn.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := conn.recv(1024):
                reply += chunk
        t.join(30)
    assert seen == [b"question"]
    assert reply == b"reply:question"


def test_errors(pair: Pair) -> None:
    """S8: unreachable dial, duplicate listen, non-tcp listen, listen_tls arguments."""
    with pytest.raises(tsnet2.DialError):
        pair.b.dial("tcp", "100.127.1.1:80", timeout=10)
    with pytest.raises(tsnet2.DialError, match="no tailnet node named"):
        pair.b.dial("tcp", "nosuchnode:80", timeout=10)
    a_ip = pair.a.tailscale_ips()[0]
    with pytest.raises(tsnet2.DialError):
        pair.b.dial("tcp", f"{a_ip}:9", timeout=10)  # nobody listens: refused
    with pair.a.listen("tcp", ":8083"), pytest.raises(tsnet2.DaemonError, match="already"):
        pair.a.listen("tcp", ":8083")
    # UDP has its own ports: a UDP listener on a TCP listener's port is fine, a second
    # UDP one is not.
    with pair.a.listen("tcp", ":8084"), pair.a.listen("udp", ":8084") as pl, \
            pytest.raises(tsnet2.AddressInUseError):
        assert pl.port == 8084
        pair.a.listen_packet("udp", ":8084")
    with pair.a.listen_tls("tcp", ":443") as ln:  # implemented: tests/integration/test_tls_lab.py
        assert ln.tls
    with pytest.raises(tsnet2.AddressError):
        pair.a.listen_tls("tcp", ":443", alpn="h2")


def test_failed_dials_and_refused_flows_keep_daemon_serving(pair: Pair) -> None:
    """Bad dials do not disturb the daemon: the next good flow works."""
    for _ in range(3):
        with pytest.raises(tsnet2.DialError):
            pair.b.dial("tcp", "ghost.tail-scale.ts.net:80", timeout=10)
    a_ip = pair.a.tailscale_ips()[0]
    results: list[Any] = []
    with pair.a.listen("tcp", ":8085") as ln:
        t = _echo_server(ln, results)
        with pair.b.dial("tcp", f"{a_ip}:8085", timeout=30) as conn:
            conn.sendall(b"x")
            assert recv_exactly(conn, 1) == b"x"
        t.join(30)
    assert "ghost.tail-scale.ts.net" in pair.db.log_text()


def test_tcp4_tcp6_listeners(pair: Pair) -> None:
    """tcp4 and tcp6 listeners receive the flows of their family."""
    v4, v6 = pair.a.tailscale_ips()
    for network, ip in (("tcp4", v4), ("tcp6", v6)):
        results: list[Any] = []
        with pair.a.listen(network, ":8086") as ln:
            t = _echo_server(ln, results)
            with pair.b.dial("tcp", tsnet2_addr(ip, 8086), timeout=30) as conn:
                conn.sendall(b"fam")
                assert recv_exactly(conn, 3) == b"fam"
                assert conn.tailnet_remote == (ip, 8086)
            t.join(30)
        assert results and results[0][0] == pair.b.tailscale_ips()[0 if ip.version == 4 else 1]


def tsnet2_addr(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, port: int) -> str:
    assert ip is not None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def test_close_semantics() -> None:
    """S9 on a fresh pair: second close raises ClosedError; accept after close raises."""
    with running_tailnet() as net:
        key = net.authkey(reusable=True)
        d = net.add_daemon("solo", auth_key=key)
        srv = tsnet2.Server(socket_path=str(d.socket_path), hostname="solo", ephemeral=True)
        srv.up(timeout=30)
        ln = srv.listen("tcp", ":9000")
        srv.close()
        with pytest.raises(tsnet2.ClosedError):
            ln.accept(timeout=1)
        with pytest.raises(tsnet2.ClosedError):
            srv.close()
        # The daemon is no zombie: it still serves and a new Server can start it again.
        srv2 = tsnet2.Server(socket_path=str(d.socket_path), hostname="solo", ephemeral=True)
        with srv2:
            st = srv2.up(timeout=30)
            assert st.tailscale_ips


def test_cli_status_whois_ping(pair: Pair) -> None:
    """`tsnet2 status|whois|ping` against a daemon socket, as a user would run them."""
    import subprocess
    import sys

    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "tsnet2.cli", *args, "--socket",
                              str(pair.db.socket_path)], capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()
        return out.stdout.decode()

    a_ip = pair.a.tailscale_ips()[0]
    status = cli("status")
    assert "tsnet2-b.tail-scale.ts.net." in status and "tsnet2-a.tail-scale.ts.net." in status
    assert "Running" in status
    who = cli("whois", str(a_ip))
    assert "Machine: tsnet2-a.tail-scale.ts.net." in who
    with pair.a.listen("tcp", ":8087") as ln:
        results: list[Any] = []
        t = _echo_server(ln, results, count=2)
        ping = cli("ping", "-c", "2", "-i", "0.1", "tsnet2-a:8087")
        t.join(30)
    assert ping.count("connected to tsnet2-a:8087 (") == 2, ping
