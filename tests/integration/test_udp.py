"""UDP through tsnet2d (issue 15) over real wireguard-go devices in network namespaces:
echo by name both ways, a DNS-like exchange, a burst whose log counts match what was sent
and received, oversized datagrams (client and raw frames), one packet channel per listener,
idle reaping, the guard around UDP, and both client faces."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import tsnet2
from tsnet2 import proto
from tsnet2.proto.udp import Datagram, FrameDecoder, Notice, encode_datagram
from tsnet2.traffic import load_schema

from .tailnet import TwoNodes, read_log, two_nodes, wait_for

pytestmark = pytest.mark.netns

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by uid 65534 (the venv's interpreter is not)
FQDN_B = "ub.tail-scale.ts.net"


@pytest.fixture(scope="module")
def nodes() -> Iterator[TwoNodes]:
    with two_nodes(("ua", "ub")) as n:
        yield n


SCHEMA = jsonschema.Draft202012Validator(load_schema())


def flows(path: Path) -> dict[str, dict[str, Any]]:
    """The log's flows by conn_id: ``open``, ``data`` (list) and ``close`` records (every
    record checked against the traffic log's JSON Schema)."""
    out: dict[str, dict[str, Any]] = {}
    for r in read_log(path):
        SCHEMA.validate({k: v for k, v in r.items() if k not in ("log_seq", "log_hash")})
        if r.get("kind") in ("open", "data", "close"):
            f = out.setdefault(r["conn_id"], {"open": None, "data": [], "close": None})
            if r["kind"] == "data":
                f["data"].append(r)
            else:
                f[r["kind"]] = r
    return out


def closed_flow(path: Path, **match: Any) -> dict[str, Any]:
    """Wait for the UDP flow whose open record has ``match`` to be closed; return it."""
    def find() -> dict[str, Any] | None:
        for f in flows(path).values():
            o = f["open"]
            if (o and o.get("proto") == "udp" and f["close"]
                    and all(o.get(k) == v for k, v in match.items())):
                return f
        return None
    found: dict[str, Any] = wait_for(find, 20, f"a closed UDP flow {match}")
    return found


def serve_echo(pl: tsnet2.PacketListener, count: int, got: list[bytes],
               upper: bool = False) -> threading.Thread:
    """Echo ``count`` datagrams on ``pl`` in a thread (stops at its first error)."""
    def run() -> None:
        for _ in range(count):
            try:
                data, peer = pl.recvfrom(timeout=20)
            except tsnet2.Error:
                return
            got.append(data)
            pl.sendto(data.upper() if upper else data, peer)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_echo_by_name_both_ways(nodes: TwoNodes) -> None:
    n = nodes
    for server, client, srv_daemon, cli_daemon, name in (
        (n.b, n.a, n.db, n.da, "ub"), (n.a, n.b, n.da, n.db, "ua"),
    ):
        got: list[bytes] = []
        with server.listen("udp", ":7000") as pl:
            assert pl.max_datagram == 1280 - 20 - 8  # a dual-stack listener: IPv4's limit
            t = serve_echo(pl, 2, got, upper=True)
            with client.dial("udp", f"{name}:7000", timeout=10) as pc:
                assert pc.max_datagram == 1280 - 20 - 8  # IPv4 peer address
                pc.settimeout(10)
                assert pc.send(b"hello") == 5
                assert pc.recv() == b"HELLO"
                pc.send(b"again")
                assert pc.recv(3) == b"AGA"  # cut to bufsize, as a UDP socket does
                local = pc.local_addr
                assert pc.remote_addr is not None and pc.remote_addr[1] == 7000
            t.join(10)
        assert got == [b"hello", b"again"]
        assert local is not None
        me = f"{local[0]}:{local[1]}"
        out = closed_flow(cli_daemon.traffic_log, remote=f"{pc.remote_addr[0]}:7000",
                          local=me)
        assert out["open"]["dir"] == "out" and out["open"]["whois"]["node"].startswith(name)
        c = out["close"]
        assert (c["proto"], c["datagrams_out"], c["datagrams_in"]) == ("udp", 2, 2)
        assert (c["bytes_out"], c["bytes_in"]) == (10, 10)
        assert [d["len"] for d in out["data"]] == [5, 5, 5, 5]
        inb = closed_flow(srv_daemon.traffic_log, remote=me)
        assert inb["open"]["dir"] == "in" and inb["open"]["listener_id"]
        assert (inb["close"]["datagrams_in"], inb["close"]["datagrams_out"]) == (2, 2)


def test_ipv6_echo(nodes: TwoNodes) -> None:
    got: list[bytes] = []
    with nodes.b.listen("udp6", ":7010") as pl:
        assert pl.max_datagram == 1232
        t = serve_echo(pl, 1, got)
        with nodes.a.dial("udp6", "ub:7010", timeout=10) as pc:
            assert pc.max_datagram == 1232 and pc.remote_addr is not None
            assert pc.remote_addr[0].version == 6
            pc.send(b"v6" * 616)  # exactly 1232
            assert pc.recv(timeout=10) == b"v6" * 616
        t.join(10)
    assert got == [b"v6" * 616]


def dns_query(qid: int, name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)


def test_dns_like_request_response(nodes: TwoNodes) -> None:
    n = nodes
    with n.b.listen_packet("udp4", ":53") as pl:
        def answer() -> None:
            q, peer = pl.recvfrom(512, timeout=20)
            qid = struct.unpack("!H", q[:2])[0]
            rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([100, 64, 0, 9])
            pl.sendto(struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + q[12:] + rr, peer)
        t = threading.Thread(target=answer, daemon=True)
        t.start()
        with n.a.dial("udp", f"{FQDN_B}:53", timeout=10) as pc:
            pc.send(dns_query(0xBEEF, "svc.example"))
            resp = pc.recv(512, timeout=10)
        t.join(10)
    qid, flags, _qd, an = struct.unpack("!HHHH", resp[:8])
    assert (qid, flags & 0x8000, an) == (0xBEEF, 0x8000, 1)
    assert resp.endswith(bytes([100, 64, 0, 9]))


def test_burst_counts_match_the_records(nodes: TwoNodes) -> None:
    """200 datagrams of sizes 1-1200 each way; whatever the receivers really got (no loss
    is expected here, but UDP may drop), the records count exactly that."""
    n = nodes
    count = 200
    sizes = [1 + (i * 37) % 1200 for i in range(count)]
    b_got: list[bytes] = []
    with n.b.listen("udp", ":7001") as pl:
        t = serve_echo(pl, count, b_got)
        with n.a.dial("udp", "ub:7001") as pc:
            for i, size in enumerate(sizes):
                pc.send(bytes([i % 256]) * size)
            a_got: list[bytes] = []
            while len(a_got) < count:
                try:
                    a_got.append(pc.recv(timeout=5))
                except tsnet2.DeadlineExceededError:
                    break  # the rest was lost: count what arrived
            me = f"{pc.local_addr[0]}:{pc.local_addr[1]}" if pc.local_addr else ""
        t.join(10)
        pl_id = pl.listener_id
    # No loss is expected over the lab's veth, but UDP may drop under load: what is checked
    # is that the records count exactly what the apps got.
    assert b_got and a_got, (len(b_got), len(a_got))
    out = closed_flow(n.da.traffic_log, local=me)["close"]
    assert out["datagrams_out"] == count and out["bytes_out"] == sum(sizes)
    assert out["datagrams_in"] == len(a_got)
    assert out["bytes_in"] == sum(map(len, a_got))
    inb = closed_flow(n.db.traffic_log, remote=me, listener_id=pl_id)
    assert inb["close"]["datagrams_in"] == len(b_got) == len(inb["data"]) // 2 + (
        len(inb["data"]) % 2)
    assert inb["close"]["bytes_in"] == sum(map(len, b_got))
    assert inb["close"]["datagrams_out"] == len(b_got)  # each one echoed
    lens = [d["len"] for d in inb["data"] if d["dir"] == "peer->app"]
    assert lens == [len(x) for x in b_got]


def test_oversized_datagrams_are_refused_before_sending(nodes: TwoNodes) -> None:
    n = nodes
    got: list[bytes] = []
    with n.b.listen("udp", ":7002") as pl:
        t = serve_echo(pl, 1, got)
        with n.a.dial("udp", "ub:7002") as pc:
            with pytest.raises(tsnet2.DatagramTooLargeError, match="max_datagram 1252") as ei:
                pc.send(b"x" * 1253)
            assert ei.value.limit == 1252 and ei.value.errno == errno.EMSGSIZE
            assert isinstance(ei.value, OSError)
            pc.send(b"x" * 1252)  # exactly the limit goes
            assert pc.recv(timeout=10) == b"x" * 1252
            with pytest.raises(tsnet2.DatagramTooLargeError, match="1252"):
                pl.sendto(b"y" * 1253, ("100.64.0.1", 9))
            # Within the listener's limit (IPv4's) but over IPv6's: the daemon drops it and
            # says so on the next recvfrom.
            pl.sendto(b"y" * 1233, ("fd7a:115c:a1e0::1", 9))
            me = f"{pc.local_addr[0]}:{pc.local_addr[1]}" if pc.local_addr else ""
        t.join(10)
        with pytest.raises(tsnet2.DatagramTooLargeError, match=r"1233 bytes to .* than 1232"):
            pl.recvfrom(timeout=10)
    assert got == [b"x" * 1252]
    c = closed_flow(n.da.traffic_log, local=me)["close"]
    assert (c["datagrams_out"], c["bytes_out"]) == (1, 1252)


def raw_channel(path: Path, kind: int, payload: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(bytes([kind]) + payload)
    return s


def read_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk, f"EOF after {buf!r}"
        buf += chunk
    return buf


def read_events(s: socket.socket, dec: FrameDecoder, want: int) -> list[Any]:
    events: list[Any] = []
    while len(events) < want:
        data = s.recv(65536)
        assert data, f"EOF after {events}"
        events += dec.feed(data)
    return events


def test_oversized_frame_from_a_raw_client_is_dropped_with_a_notice(nodes: TwoNodes) -> None:
    n = nodes
    got: list[bytes] = []
    with n.b.listen("udp", ":7003") as pl:
        t = serve_echo(pl, 1, got)
        with raw_channel(n.da.socket_path, 0x03,
                         proto.encode_dial_request("udp", "ub:7003")) as s:
            reply = proto.decode_dial_reply(read_line(s))
            assert reply.ok and reply.max_datagram == 1252
            s.sendall(encode_datagram(b"z" * 3000) + encode_datagram(b"small"))
            dec = FrameDecoder()
            events = read_events(s, dec, 2)
            assert isinstance(events[0], Notice)
            assert events[0].code == proto.ErrorCode.DATAGRAM_TOO_LARGE
            assert "3000" in events[0].err and "1252" in events[0].err
            assert events[1] == Datagram(b"small")  # the echo: the channel goes on
        t.join(10)
        assert got == [b"small"]
    c = closed_flow(n.da.traffic_log, remote=reply.remote, local=reply.local)["close"]
    assert (c["datagrams_out"], c["bytes_out"], c["datagrams_in"]) == (1, 5, 1)


def test_second_packet_channel_is_refused(nodes: TwoNodes) -> None:
    with nodes.b.listen("udp", ":7004") as pl, raw_channel(
        nodes.db.socket_path, 0x04, proto.encode_accept_request(pl.listener_id)
    ) as s, pytest.raises(proto.ChannelRefused, match="already has its packet channel"):
        proto.decode_accept_header(read_line(s))


def test_sendto_a_non_tailnet_address_raises_on_the_next_recvfrom(nodes: TwoNodes) -> None:
    with nodes.b.listen("udp", ":7005") as pl:
        pl.sendto(b"nope", ("100.64.9.9", 53))  # a UDP send does not wait for an answer
        with pytest.raises(tsnet2.NoSuchPeerError, match=r"100\.64\.9\.9:53 not sent"):
            pl.recvfrom(timeout=10)
        with pytest.raises(tsnet2.AddressError):
            pl.sendto(b"x", ("ub", 53))  # sendto takes addresses; dial resolves names


def test_dial_errors(nodes: TwoNodes) -> None:
    with pytest.raises(tsnet2.NoSuchPeerError):
        nodes.a.dial("udp", "nobody:53", timeout=10)
    with pytest.raises(tsnet2.NoSuchPeerError):
        nodes.a.dial("udp6", "8.8.8.8:53", timeout=10)
    recs = [r for r in read_log(nodes.da.traffic_log)
            if r.get("kind") == "reject" and r.get("remote") == "nobody:53"]
    assert recs and recs[-1]["proto"] == "udp" and recs[-1]["dir"] == "out"


def test_async_face(nodes: TwoNodes) -> None:
    async def main() -> tuple[bytes, tuple[str, int]]:
        async with tsnet2.AsyncServer(socket_path=str(nodes.db.socket_path)) as b, \
                tsnet2.AsyncServer(socket_path=str(nodes.da.socket_path)) as a:
            pl = await b.listen_packet("udp", ":7006")
            async with pl:
                async def echo() -> tuple[str, int]:
                    data, peer = await pl.recvfrom(timeout=10)
                    await pl.sendto(data[::-1], peer)
                    return peer
                task = asyncio.create_task(echo())
                pc = await a.dial("udp", "ub:7006", timeout=10)
                async with pc:
                    assert isinstance(pc, tsnet2.AsyncPacketConn)
                    await pc.send(b"async")
                    back = await pc.recv(timeout=10)
                peer = await task
            return back, peer
    back, peer = asyncio.run(main())
    assert back == b"cnysa" and peer[0] == "100.64.0.1"


# A process in a namespace: drop to uid 65534, then send UDP to targets, or bind a UDP port
# and report what it received until stdin closes.
CHILD = r"""
import json, os, select, socket, sys
mode, args = sys.argv[1], json.loads(sys.argv[2])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
out = {"uid": os.getuid()}
if mode == "send":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    errs = []
    for _ in range(3):
        try:
            s.sendto(b"direct", (args["host"], args["port"])); errs.append(0)
        except OSError as exc:
            errs.append(exc.errno)
    out["errors"] = errs
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    print(json.dumps({"port": s.getsockname()[1]}), flush=True)
    got = []
    while True:
        r, _, _ = select.select([s, sys.stdin], [], [], 30)
        if s in r:
            got.append(s.recv(64).decode())
        if sys.stdin in r or not r:
            break
    out["received"] = got
print(json.dumps(out), flush=True)
"""


def test_guard_blocks_direct_udp_both_ways(nodes: TwoNodes) -> None:
    """An unprivileged process in A's namespace neither sends UDP to B nor receives UDP
    from B except through the daemon."""
    import subprocess

    n = nodes
    lab = n.lnet.lab
    got: list[bytes] = []
    with n.b.listen("udp4", ":7007") as pl:
        t = serve_echo(pl, 1, got)
        sent = lab.run(n.da.node.netns, [SYSTEM_PYTHON, "-I", "-c", CHILD, "send",
                                         json.dumps({"host": "100.64.0.2", "port": 7007})],
                       timeout=60)
        res = json.loads(sent.stdout.strip().splitlines()[-1])
        assert res["uid"] == 65534
        # Sent after the direct ones: once this arrives, so would they have.
        with n.a.dial("udp", "ub:7007") as pc:
            pc.send(b"via-daemon")
            assert pc.recv(timeout=10) == b"via-daemon"
        t.join(10)
    assert got == [b"via-daemon"], got
    # Inbound: B's daemon sends to an unprivileged socket in A; nothing arrives.
    proc = lab.popen(n.da.node.netns, [SYSTEM_PYTHON, "-I", "-c", CHILD, "recv", "{}"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        with n.b.dial("udp", f"ua:{port}") as pc:
            pc.send(b"direct-in")
        with n.a.listen("udp4", ":7008") as pl2, n.b.dial("udp", "ua:7008") as pc2:
            pc2.send(b"marker")  # the same path, after the direct datagram
            assert pl2.recvfrom(timeout=10)[0] == b"marker"
    finally:
        out, _ = proc.communicate(timeout=30)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["uid"] == 65534 and res["received"] == [], res


def test_idle_flows_are_reaped() -> None:
    idle = ("--udp-idle-timeout", "1")
    with two_nodes(("ia", "ib"), extra_a=idle, extra_b=idle) as n, \
            n.b.listen("udp", ":7100") as pl:
        got: list[bytes] = []
        t = serve_echo(pl, 1, got)
        pc = n.a.dial("udp", "ib:7100")
        with pc:
            pc.send(b"once")
            assert pc.recv(timeout=10) == b"once"
            me = f"{pc.local_addr[0]}:{pc.local_addr[1]}" if pc.local_addr else ""
            # No datagram for a second: both ends close their flow, with its record.
            out = closed_flow(n.da.traffic_log, local=me)
            inb = closed_flow(n.db.traffic_log, remote=me)
            with pytest.raises(tsnet2.ClosedError, match="udp-idle-timeout"):
                pc.recv(timeout=10)  # the daemon closed the reaped dial channel
        t.join(10)
        # The listener lives on: a new datagram opens a new flow.
        t2 = serve_echo(pl, 1, got)
        with n.a.dial("udp", "ib:7100") as pc2:
            pc2.send(b"twice")
            assert pc2.recv(timeout=10) == b"twice"
        t2.join(10)
    assert (out["close"]["datagrams_out"], out["close"]["datagrams_in"]) == (1, 1)
    assert "error" not in out["close"]
    assert (inb["close"]["datagrams_in"], inb["close"]["datagrams_out"]) == (1, 1)
    assert got == [b"once", b"twice"]


def test_daemon_restart_cuts_flows_and_the_listener_comes_back() -> None:
    """B's daemon stops: its UDP flows get their close record (cut). It starts again: the
    PacketListener's next recvfrom reconnects and registers it on the same port."""
    with two_nodes(("ra", "rb")) as n, n.b.listen("udp", ":7200") as pl:
        got: list[bytes] = []
        t = serve_echo(pl, 1, got)
        with n.a.dial("udp", "rb:7200") as pc:
            pc.send(b"before")
            assert pc.recv(timeout=10) == b"before"
            t.join(10)
            me = f"{pc.local_addr[0]}:{pc.local_addr[1]}" if pc.local_addr else ""
            assert n.lnet.stop_daemon("rb") == 0
            inb = closed_flow(n.db.traffic_log, remote=me)
            assert inb["close"]["error"] == "daemon: flow cut by shutdown"
            assert inb["close"]["datagrams_in"] == 1
            n.lnet.start_daemon("rb")
            after: list[Any] = []

            def again() -> None:
                try:
                    after.append(pl.recvfrom(timeout=60))
                except Exception as exc:  # reported below
                    after.append(exc)

            t2 = threading.Thread(target=again, daemon=True)
            t2.start()
            # A's flow lives on; B drops what arrives before its listener is back.
            wait_for(lambda: pc.send(b"after") and not t2.is_alive(), 60,
                     "the re-registered listener to get a datagram")
            t2.join(10)
    assert after and not isinstance(after[0], BaseException), after
    assert after[0][0] == b"after" and after[0][1][0] == "100.64.0.1"


def test_node_down_is_told_and_the_listener_registers_again() -> None:
    """wireguard-go dies under B's node: a blocked recvfrom raises NodeDownError (the
    daemon's notice), B's flows get their close record, and the next recvfrom reconnects,
    registers the listener again and receives."""
    import os
    import signal

    from .test_shared_node import wireguard_go_pid

    with two_nodes(("na", "nb")) as n, n.b.listen("udp", ":7300") as pl:
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                pl.recvfrom(timeout=60)
            except BaseException as exc:  # reported below
                errors.append(exc)

        t = threading.Thread(target=blocked, daemon=True)
        t.start()
        with n.a.dial("udp", "nb:7300") as pc:
            os.kill(wireguard_go_pid(n.db.node.ifname), signal.SIGKILL)
            t.join(30)
            assert len(errors) == 1 and isinstance(errors[0], tsnet2.NodeDownError), errors
            got: list[Any] = []

            def again() -> None:
                try:
                    got.append(pl.recvfrom(timeout=60))
                except BaseException as exc:  # reported below
                    got.append(exc)

            t2 = threading.Thread(target=again, daemon=True)
            t2.start()
            wait_for(lambda: pc.send(b"back") and not t2.is_alive(), 60,
                     "the listener to receive again")
            t2.join(10)
    assert got and not isinstance(got[0], BaseException), got
    assert got[0][0] == b"back"
