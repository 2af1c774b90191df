"""The DNS responder (``--dns-listen``) in the netns lab: a stdlib client built on
tsnet2.proto.dns, glibc's resolver (``getent``) through a per-namespace resolv.conf, and an
upstream the test runs in the same namespace for names outside the tailnet."""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import tsnet2
from tsnet2.lab.tailnet import DaemonProc, LocalTailnet
from tsnet2.proto import dns
from tsnet2.proto.dns import Message, RCode, Record, RType

from .tailnet import running_tailnet

pytestmark = pytest.mark.netns

UPSTREAM_PORT = 5353
METRICS_PORT = 9464
OUTSIDE = "outside.example"
OUTSIDE_IP = "192.0.2.7"
SILENT = "silent.example"  # the upstream never answers it


@dataclass
class Lab:
    net: LocalTailnet
    da: DaemonProc
    b_ips: list[str]
    upstream_seen: list[str]

    @property
    def netns(self) -> str:
        return self.da.node.netns

    def ask(self, name: str, qtype: int, *, tcp: bool = False, qid: int = 4242,
            raw: bytes | None = None) -> Message:
        query = raw if raw is not None else dns.build_query(name, qtype, id_=qid)
        with self.net.lab.in_netns(self.netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        with s:
            s.settimeout(10)
            s.connect(("127.0.0.1", 53))
            if tcp:
                s.sendall(struct.pack(">H", len(query)) + query)
                size = struct.unpack(">H", _exactly(s, 2))[0]
                return dns.parse_message(_exactly(s, size))
            s.send(query)
            return dns.parse_message(s.recv(65535))


def _exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "EOF"
        buf += chunk
    return buf


def _upstream_answer(data: bytes, seen: list[str]) -> bytes | None:
    q = dns.parse_message(data)
    name = q.questions[0].name.lower()
    seen.append(name)
    if name == SILENT:
        return None
    if name == OUTSIDE and q.questions[0].qtype == RType.A:
        rec = Record(q.questions[0].name, RType.A, 1, 30,
                     ipaddress.IPv4Address(OUTSIDE_IP).packed)
        return dns.build_response(q, RCode.NOERROR, (rec,))
    return dns.build_response(q, RCode.NOERROR if name == OUTSIDE else RCode.NXDOMAIN)


def _serve_upstream(udp: socket.socket, tcp: socket.socket, seen: list[str],
                    stop: threading.Event) -> None:
    """A tiny upstream nameserver (UDP and TCP) until `stop`."""
    import select
    while not stop.is_set():
        ready, _, _ = select.select([udp, tcp], [], [], 0.2)
        if udp in ready:
            data, addr = udp.recvfrom(65535)
            reply = _upstream_answer(data, seen)
            if reply is not None:
                udp.sendto(reply, addr)
        if tcp in ready:
            conn, _ = tcp.accept()
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError, AssertionError):
                    size = struct.unpack(">H", _exactly(conn, 2))[0]
                    reply = _upstream_answer(_exactly(conn, size), seen)
                    if reply is not None:
                        conn.sendall(struct.pack(">H", len(reply)) + reply)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_tailnet() as net:
        key = net.authkey(reusable=True)
        da = net.add_daemon("tsnet2-a", auth_key=key, extra_args=(
            "--dns-listen", "127.0.0.1:53",
            "--dns-upstream", f"127.0.0.1:{UPSTREAM_PORT}",
            "--metrics-addr", f"127.0.0.1:{METRICS_PORT}"))
        db = net.add_daemon("tsnet2-b", auth_key=key)
        stop = threading.Event()
        seen: list[str] = []
        with net.lab.in_netns(da.node.netns):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.create_server(("127.0.0.1", UPSTREAM_PORT))
        udp.bind(("127.0.0.1", UPSTREAM_PORT))
        t = threading.Thread(target=_serve_upstream, args=(udp, tcp, seen, stop), daemon=True)
        t.start()
        b = tsnet2.Server(socket_path=str(db.socket_path), hostname="tsnet2-b")
        a = tsnet2.Server(socket_path=str(da.socket_path), hostname="tsnet2-a")
        resolv = Path("/etc/netns") / da.node.netns
        try:
            st = b.up(timeout=30)
            a.up(timeout=30)
            resolv.mkdir(parents=True, exist_ok=True)
            (resolv / "resolv.conf").write_text(
                "nameserver 127.0.0.1\noptions timeout:3 attempts:1\n")
            yield Lab(net, da, [str(ip) for ip in st.tailscale_ips], seen)
        finally:
            shutil.rmtree(resolv, ignore_errors=True)
            with contextlib.suppress(OSError):
                Path("/etc/netns").rmdir()  # only if empty: others may use it
            stop.set()
            t.join(5)
            udp.close()
            tcp.close()
            a.close()
            b.close()


def _addresses(msg: Message) -> list[str]:
    return [str(r.address) for r in msg.answers if r.address is not None]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_tailnet_names(lab: Lab, tcp: bool) -> None:
    v4 = [ip for ip in lab.b_ips if ":" not in ip]
    v6 = [ip for ip in lab.b_ips if ":" in ip]
    msg = lab.ask("tsnet2-b", RType.A, tcp=tcp)
    assert msg.is_response and msg.rcode == RCode.NOERROR and msg.id == 4242
    assert msg.flags & dns.FLAG_AA and msg.flags & dns.FLAG_RD and msg.flags & dns.FLAG_RA
    assert _addresses(msg) == v4
    assert msg.answers[0].name == "tsnet2-b" and msg.answers[0].ttl > 0
    fqdn = f"TsNet2-B.{lab.net.domain.upper()}."
    msg = lab.ask(fqdn, RType.AAAA, tcp=tcp)
    assert _addresses(msg) == v6
    assert msg.answers[0].name == fqdn.rstrip(".")  # the question's case is kept
    msg = lab.ask("tsnet2-b", RType.MX, tcp=tcp)
    assert msg.rcode == RCode.NOERROR and msg.answers == () and msg.flags & dns.FLAG_AA
    msg = lab.ask(f"nobody.{lab.net.domain}", RType.A, tcp=tcp)
    assert msg.rcode == RCode.NXDOMAIN and msg.answers == ()
    assert msg.flags & dns.FLAG_AA and msg.flags & dns.FLAG_QR
    assert msg.questions == (dns.Question(f"nobody.{lab.net.domain}", RType.A),)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_other_names_are_forwarded(lab: Lab, tcp: bool) -> None:
    msg = lab.ask(OUTSIDE, RType.A, tcp=tcp, qid=7)
    assert msg.id == 7 and msg.rcode == RCode.NOERROR
    assert _addresses(msg) == [OUTSIDE_IP]
    assert not msg.flags & dns.FLAG_AA  # the upstream's answer, unchanged
    msg = lab.ask("nope.example", RType.A, tcp=tcp)
    assert msg.rcode == RCode.NXDOMAIN
    assert "tsnet2-b" not in lab.upstream_seen  # tailnet names never leave the node


def test_upstream_timeout_is_servfail(lab: Lab) -> None:
    msg = lab.ask(SILENT, RType.A)
    assert msg.rcode == RCode.SERVFAIL and msg.id == 4242
    assert SILENT in lab.upstream_seen


def test_malformed_query(lab: Lab) -> None:
    # A header with a question count and no question: FORMERR with the query's id.
    msg = lab.ask("", 0, raw=struct.pack(">HHHHHH", 99, 0x0100, 1, 0, 0, 0))
    assert msg.id == 99 and msg.rcode == RCode.FORMERR
    # A compression pointer loop: FORMERR too, and the responder goes on.
    loop = struct.pack(">HHHHHH", 98, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
    assert lab.ask("", 0, raw=loop).rcode == RCode.FORMERR
    assert _addresses(lab.ask("tsnet2-b", RType.A))


def test_glibc_resolver(lab: Lab) -> None:
    """getent in A's namespace, whose /etc/resolv.conf (bind-mounted by ip netns exec from
    /etc/netns/NAME/) names the responder."""
    out = lab.net.lab.run(lab.netns, ["getent", "ahostsv4", "tsnet2-b"]).stdout
    v4 = [ip for ip in lab.b_ips if ":" not in ip]
    assert out.split()[0] == v4[0], out
    out = lab.net.lab.run(lab.netns, ["getent", "hosts", f"tsnet2-b.{lab.net.domain}"]).stdout
    assert out.split()[0] in lab.b_ips, out
    out = lab.net.lab.run(lab.netns, ["getent", "ahostsv4", OUTSIDE]).stdout
    assert out.split()[0] == OUTSIDE_IP, out
    missing = lab.net.lab.run(lab.netns, ["getent", "hosts", f"nobody.{lab.net.domain}"],
                              check=False)
    assert missing.returncode == 2 and not missing.stdout


def test_queries_are_metrics_not_flows(lab: Lab) -> None:
    lab.ask("tsnet2-b", RType.A)
    lab.ask(OUTSIDE, RType.A)
    with lab.net.lab.in_netns(lab.netns):
        s = socket.create_connection(("127.0.0.1", METRICS_PORT), timeout=10)
    with s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        text = b""
        while chunk := s.recv(65536):
            text += chunk
    values = {}
    for line in text.decode().splitlines():
        if line.startswith("tsnet2_dns_queries_total{"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    assert values['tsnet2_dns_queries_total{transport="udp",result="tailnet"}'] >= 1
    assert values['tsnet2_dns_queries_total{transport="udp",result="forwarded"}'] >= 1
    assert values['tsnet2_dns_queries_total{transport="tcp",result="forwarded"}'] >= 1
    # No flow records for DNS: the only flows in A's log would be dials, and there are none.
    log = lab.da.traffic_log.read_text() if lab.da.traffic_log.exists() else ""
    assert '"kind":"open"' not in log.replace(" ", "")
