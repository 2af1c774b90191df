"""The nftables audit guard (``tsnet2.node.guard``) against real processes in the netns lab.

Two lab nodes A and B with started WireGuard nodes and a tunnel between them; the guard is
installed on A only. "Unprivileged" means a real child process in A's namespace that dropped
to uid/gid 65534 (so it has no capabilities and cannot set SO_MARK); "marked" means a socket
with SO_MARK 0x7473, which is what tsnet2d puts on every socket it opens.
"""

from __future__ import annotations

import asyncio
import errno
import json
import platform
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

import pytest

from tsnet2.lab import Lab, LabNode
from tsnet2.node import Node, PeerConfig
from tsnet2.node.guard import (
    LOG_BURST,
    LOG_PREFIX,
    LOG_RATE,
    LOG_SNAPLEN,
    Guard,
    GuardError,
    Listener,
    list_tables,
    original_dst,
)
from tsnet2.node.nflog import NflogError, NflogReader, RefusedSyn

pytestmark = pytest.mark.netns

WG_PORT = 41641
MARK = 0x7473
SO_MARK = getattr(socket, "SO_MARK", 36)
A4, A6 = "100.64.0.1", "fd7a:115c:a1e0::1"
B4, B6 = "100.64.0.2", "fd7a:115c:a1e0::2"
REFUSED = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.EPERM, errno.EACCES}
FAST = 2.0  # seconds: a refusal must come at once, well before the 5 s connect timeout
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by uid 65534 (the venv's interpreter is not)

# A child process in a namespace: drops to uid/gid 65534 unless told not to, reports whether it
# can set SO_MARK, then connects / sends UDP / tries a bind / listens as asked; prints one JSON
# line (two for "listen": the bound port first, the result after its stdin closes).
CHILD = r"""
import errno, json, os, select, socket, sys, time
mode, args = sys.argv[1], json.loads(sys.argv[2])
if args.get("drop", True):
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
def can_mark():
    with socket.socket() as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, 36, 0x7473)
            return True
        except PermissionError:
            return False
out = {"uid": os.getuid(), "can_mark": can_mark()}
def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET
if mode == "connect":
    out["results"] = []
    for host, port in args["targets"]:
        with socket.socket(fam(host), socket.SOCK_STREAM) as s:
            s.settimeout(5)
            if args.get("mark"):
                s.setsockopt(socket.SOL_SOCKET, 36, 0x7473)
            t0 = time.monotonic()
            try:
                s.connect((host, port))
                err, data = 0, s.recv(16).decode() if args.get("read") else ""
            except socket.timeout:
                err, data = "timeout", ""
            except OSError as exc:
                err, data = exc.errno, ""
            out["results"].append({"errno": err, "data": data,
                                   "seconds": time.monotonic() - t0})
elif mode == "udp":
    out["errors"] = []
    for host, port in args["targets"]:
        with socket.socket(fam(host), socket.SOCK_DGRAM) as s:
            try:
                s.sendto(b"leak", (host, port))
                out["errors"].append(0)
            except OSError as exc:
                out["errors"].append(exc.errno)
elif mode == "bind":
    host = args["host"]
    with socket.socket(fam(host), socket.SOCK_STREAM) as s:
        if fam(host) == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(args.get("v6only", 0)))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, args["port"]))
            s.listen(1)
            out["errno"] = 0
        except OSError as exc:
            out["errno"] = exc.errno
elif mode == "listen":
    host = args.get("host", "::")
    srv = socket.socket(fam(host), socket.SOCK_STREAM)
    if fam(host) == socket.AF_INET6:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(args.get("v6only", 0)))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, args["port"]))
    srv.listen(8)
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    accepted = 0
    while True:
        ready, _, _ = select.select([srv, sys.stdin], [], [], 30)
        if srv in ready:
            conn, _ = srv.accept()
            accepted += 1
            conn.sendall(b"unprivileged")
            conn.close()
        if sys.stdin in ready or not ready:
            break
    srv.close()
    out["accepted"] = accepted
elif mode == "udplisten":
    host = args.get("host", "::")
    sock = socket.socket(fam(host), socket.SOCK_DGRAM)
    if fam(host) == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(args.get("v6only", 0)))
    sock.bind((host, args["port"]))
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    received = []
    while True:
        ready, _, _ = select.select([sock, sys.stdin], [], [], 30)
        if sock in ready:
            received.append(sock.recvfrom(64)[0].decode())
        if sys.stdin in ready or not ready:
            break
    sock.close()
    out["received"] = received
print(json.dumps(out), flush=True)
"""


@dataclass
class Pair:
    """Two lab nodes with WireGuard nodes that are each other's peer."""

    lab: Lab
    a: LabNode
    b: LabNode
    na: Node
    nb: Node


def _peer(node: Node, lab_node: LabNode, host: int) -> PeerConfig:
    return PeerConfig(
        public_key=node.public_key,
        endpoint=f"{lab_node.ip}:{WG_PORT}",
        allowed_ips=[f"100.64.0.{host}/32", f"fd7a:115c:a1e0::{host}/128"],
        persistent_keepalive=None,  # no handshake before both sides know each other
    )


@pytest.fixture
def pair(lab: Lab, start_node: Callable[..., Node]) -> Pair:
    """A (100.64.0.1) and B (100.64.0.2), peered, tunnel up."""
    a, b = lab.add_node("a"), lab.add_node("b")
    na, nb = start_node(a, 1), start_node(b, 2)
    assert na.ipv6 and nb.ipv6
    na.apply_peers([_peer(nb, b, 2)])
    nb.apply_peers([_peer(na, a, 1)])
    # Warm the tunnel up (WireGuard handshake; a lost first initiation is retried only after
    # 5 s), so the timings the tests check are the guard's, not the handshake's.
    with marked_listener(lab, b.netns, B4) as listener:
        listener.settimeout(20)
        assert echo_once(lab, listener, a.netns, timeout=20) == b"hello"
    return Pair(lab, a, b, na, nb)


MakeGuard = Callable[..., Guard]


@pytest.fixture
def make_guard(lab: Lab) -> Iterator[MakeGuard]:
    """``make_guard(lab_node, **kwargs)``: a Guard for that node's device, installed in its
    namespace; removed after the test (before the lab goes)."""
    made: list[Guard] = []

    def make(node: LabNode, **kwargs: Any) -> Guard:
        guard = Guard(node.ifname, **kwargs)
        made.append(guard)
        with lab.in_netns(node.netns):
            guard.install()
        return guard

    try:
        yield make
    finally:
        for guard in made:
            guard.remove()


# -- helpers -------------------------------------------------------------------------------


def child(
    lab: Lab, netns: str, mode: str, *, wrapper: tuple[str, ...] = (), **args: Any
) -> dict[str, Any]:
    """Run CHILD to completion in ``netns`` (under ``wrapper``, e.g. setpriv); its result."""
    argv = [*wrapper, SYSTEM_PYTHON, "-I", "-c", CHILD, mode, json.dumps(args)]
    proc = lab.run(netns, argv, timeout=60)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


class ChildListener:
    """CHILD in "listen" mode (or ``mode`` "udplisten": a UDP socket reporting what it
    ``received``), running in the background until ``result()``; by default on ``[::]`` for
    IPv4 and IPv6, else on ``host`` (``v6only``: IPv6 only)."""

    def __init__(
        self,
        lab: Lab,
        netns: str,
        port: int = 0,
        drop: bool = True,
        host: str = "::",
        v6only: bool = False,
        mode: str = "listen",
    ) -> None:
        args = json.dumps({"port": port, "drop": drop, "host": host, "v6only": int(v6only)})
        self.proc = lab.popen(
            netns, [SYSTEM_PYTHON, "-I", "-c", CHILD, mode, args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "listener child died before binding"
        self.port: int = json.loads(line)["port"]

    def result(self) -> dict[str, Any]:
        """Stop listening; the child's report (``accepted``: connections it got)."""
        out, _ = self.proc.communicate(timeout=30)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result


def family(host: str) -> socket.AddressFamily:
    """AF_INET6 for an address with a colon, else AF_INET."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def marked_listener(lab: Lab, netns: str, host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket in ``netns`` on ``host:port`` carrying the daemon's mark."""
    with lab.in_netns(netns):
        sock = socket.socket(family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(8)
    sock.settimeout(10)
    return sock


def connect(
    lab: Lab, netns: str, host: str, port: int, *, mark: bool = False, timeout: float = 5.0
) -> tuple[socket.socket | None, int | str, float]:
    """Connect from ``netns`` (as this root process); (socket or None, errno or 0, seconds)."""
    with lab.in_netns(netns):
        sock = socket.socket(family(host), socket.SOCK_STREAM)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
    sock.settimeout(timeout)
    t0 = time.monotonic()
    try:
        sock.connect((host, port))
    except TimeoutError:
        sock.close()
        return None, "timeout", time.monotonic() - t0
    except OSError as exc:
        sock.close()
        return None, exc.errno or -1, time.monotonic() - t0
    return sock, 0, time.monotonic() - t0


def echo_once(
    lab: Lab, listener: socket.socket, netns: str, *, mark: bool = False, timeout: float = 5.0
) -> bytes:
    """Connect to ``listener`` from ``netns``, send a line, get it back through the listener."""
    host, port = listener.getsockname()[:2]
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(conn.recv(64))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    sock, err, _ = connect(lab, netns, host, port, mark=mark, timeout=timeout)
    assert sock is not None, f"connect to {host}:{port} failed: {err}"
    with sock:
        sock.sendall(b"hello")
        got.append(sock.recv(64))
    server.join(10)
    return got[0]


def pair_of(sock: socket.socket) -> Listener:
    """The (address, port) a listening socket is bound to, as the guard wants it."""
    host, port = sock.getsockname()[:2]
    return ip_address(host), port


def tables(lab: Lab, netns: str) -> str:
    """``nft list tables`` in ``netns``."""
    return lab.run(netns, ["nft", "list", "tables"]).stdout


def assert_refused_fast(result: dict[str, Any]) -> None:
    """A CHILD connect result was refused with an error, quickly."""
    assert result["errno"] in REFUSED, result
    assert result["seconds"] < FAST, result


# -- (a) and (b): outbound -----------------------------------------------------------------


def test_unprivileged_process_cannot_reach_a_peer(pair: Pair, make_guard: MakeGuard) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    listeners = [marked_listener(lab, b.netns, host) for host in (B4, B6)]
    try:
        targets = [[s.getsockname()[0], s.getsockname()[1]] for s in listeners]
        # Control: without the guard the unprivileged process does reach B (so the test can fail).
        before = child(lab, a.netns, "connect", targets=targets[:1])
        assert before["uid"] == 65534 and before["can_mark"] is False
        assert before["results"][0]["errno"] == 0, before
        listeners[0].accept()[0].close()

        make_guard(a)
        after = child(lab, a.netns, "connect", targets=targets)
        assert after["can_mark"] is False
        for result in after["results"]:
            assert_refused_fast(result)
            assert result["errno"] == errno.ECONNREFUSED  # the guard's TCP reset
        # Root without the mark is refused too: it is the mark, not the uid, that counts.
        root = child(lab, a.netns, "connect", targets=targets, drop=False)
        assert root["uid"] == 0 and root["can_mark"] is True
        for result in root["results"]:
            assert_refused_fast(result)
        # Nothing reached B's listeners.
        for sock in listeners:
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.accept()
    finally:
        for sock in listeners:
            sock.close()


def test_unprivileged_udp_does_not_leave(pair: Pair, make_guard: MakeGuard) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    make_guard(a)
    with lab.in_netns(b.netns):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sink:
        sink.bind((B4, 0))
        sink.settimeout(0.5)
        port = sink.getsockname()[1]
        child(lab, a.netns, "udp", targets=[[B4, port]] * 3)
        with pytest.raises(TimeoutError):
            sink.recvfrom(64)
        # Positive control: a marked datagram from A arrives, so the sink works.
        with lab.in_netns(a.netns):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sender:
            sender.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
            sender.sendto(b"daemon", (B4, port))
        sink.settimeout(5)
        assert sink.recvfrom(64)[0] == b"daemon"


def udp_socket(lab: Lab, netns: str, host: str, *, marked: bool, port: int = 0) -> socket.socket:
    """A UDP socket in ``netns`` bound to ``host:port`` (with the daemon's mark if
    ``marked``), blocking with a 10 s timeout."""
    with lab.in_netns(netns):
        sock = socket.socket(family(host), socket.SOCK_DGRAM)
    if marked:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
    sock.bind((host, port))
    sock.settimeout(10)
    return sock


def test_udp_inbound_only_to_registered_udp_listeners(pair: Pair, make_guard: MakeGuard) -> None:
    """An unprivileged process in A's namespace receives no UDP from the tailnet; the
    daemon's registered UDP sockets do (their own sets: a TCP pair opens no UDP)."""
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a)
    app = ChildListener(lab, a.netns, mode="udplisten")  # uid 65534, [::] for both families
    daemon = [udp_socket(lab, a.netns, host, marked=True) for host in (A4, A6)]
    peer = [udp_socket(lab, b.netns, host, marked=False) for host in (B4, B6)]
    try:
        udp_pairs = {pair_of(s) for s in daemon}
        guard.set_listeners({(ip_address(A4), app.port)}, udp_pairs)
        assert guard.read_udp_listeners() == udp_pairs == guard.udp_listeners
        assert guard.read_listeners() == {(ip_address(A4), app.port)}
        for src, dst in ((peer[0], A4), (peer[1], A6)):
            src.sendto(b"to-app", (dst, app.port))
        # Sent after the app's datagrams on the same path: once these arrive, so would they.
        for src, dst in zip(peer, daemon, strict=True):
            src.sendto(b"to-daemon", dst.getsockname()[:2])
            data, sender = dst.recvfrom(64)
            assert data == b"to-daemon" and sender[:2] == src.getsockname()[:2]
            dst.sendto(b"answer", sender)  # the daemon's answer leaves (marked)
            assert src.recvfrom(64)[0] == b"answer"
    finally:
        for sock in daemon + peer:
            sock.close()
        result = app.result()
    assert result["uid"] == 65534 and result["received"] == [], result


def test_udp_conntrack_outliving_a_daemon_socket_does_not_reach_the_app(
    pair: Pair, make_guard: MakeGuard
) -> None:
    """A daemon UDP flow leaves a conntrack entry behind when its socket closes; an app
    binding that port must not get the peer's later datagrams as "established"."""
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a)
    peer = udp_socket(lab, b.netns, B4, marked=False)
    marker = udp_socket(lab, a.netns, A4, marked=True)
    try:
        guard.set_listeners(set(), {pair_of(marker)})
        flow = udp_socket(lab, a.netns, A4, marked=True)
        with flow:
            flow.connect(peer.getsockname()[:2])
            flow.send(b"out")
            data, where = peer.recvfrom(64)
            assert data == b"out"
            peer.sendto(b"reply", where)
            assert flow.recv(64) == b"reply"  # established, to the daemon's socket
            port = flow.getsockname()[1]
        app = ChildListener(lab, a.netns, mode="udplisten", host="0.0.0.0", port=port)
        try:
            assert app.port == port
            peer.sendto(b"stolen", (A4, port))
            peer.sendto(b"marker", marker.getsockname()[:2])
            assert marker.recvfrom(64)[0] == b"marker"
        finally:
            result = app.result()
        assert result["uid"] == 65534 and result["received"] == [], result
        # Control: without the guard the same app does get the conntrack flow's datagrams.
        guard.remove()
        app = ChildListener(lab, a.netns, mode="udplisten", host="0.0.0.0", port=port)
        try:
            peer.sendto(b"now", (A4, port))
            with lab.in_netns(a.netns):
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with probe:  # after "now" on the same path: the app has it by then
                probe.bind((A4, 0))
                probe.settimeout(10)
                peer.sendto(b"probe", probe.getsockname()[:2])
                assert probe.recvfrom(64)[0] == b"probe"
        finally:
            result = app.result()
        assert result["received"] == ["now"], result
    finally:
        peer.close()
        marker.close()


def test_marked_socket_reaches_a_peer(pair: Pair, make_guard: MakeGuard) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    make_guard(a)
    for host in (B4, B6):
        with marked_listener(lab, b.netns, host) as listener:
            assert echo_once(lab, listener, a.netns, mark=True) == b"hello"


def _kernel_at_least(major: int, minor: int) -> bool:
    nums = platform.release().split("-", 1)[0].split(".")
    return (int(nums[0]), int(nums[1])) >= (major, minor)


@pytest.mark.skipif(not _kernel_at_least(5, 17), reason="SO_MARK needs NET_ADMIN before 5.17")
def test_net_raw_is_enough_to_pass_the_guard(pair: Pair, make_guard: MakeGuard) -> None:
    """Why injected app containers drop NET_RAW: since Linux 5.17, CAP_NET_RAW alone allows
    SO_MARK (and packet sockets skip netfilter's output hooks altogether)."""
    lab, a, b = pair.lab, pair.a, pair.b
    make_guard(a)
    with marked_listener(lab, b.netns, B4) as listener:
        port = listener.getsockname()[1]
        setpriv = (
            "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
            "--inh-caps", "+net_raw", "--ambient-caps", "+net_raw",
        )  # fmt: skip
        result = child(lab, a.netns, "connect", wrapper=setpriv, drop=False, mark=True,
                       targets=[[B4, port]])  # fmt: skip
        assert result["uid"] == 65534 and result["can_mark"] is True, result
        assert result["results"][0]["errno"] == 0, result
        listener.accept()[0].close()


# -- (c): inbound --------------------------------------------------------------------------


def test_inbound_only_to_registered_listeners(pair: Pair, make_guard: MakeGuard) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a)  # no log group: unregistered ports are rejected, not logged
    app = ChildListener(lab, a.netns)  # the app's own listener on a port NOT in the set
    registered = [marked_listener(lab, a.netns, host) for host in (A4, A6)]
    try:
        pairs = {pair_of(s) for s in registered}
        guard.set_listeners(pairs)
        assert guard.read_listeners() == pairs == guard.listeners
        for host in (A4, A6):
            sock, err, seconds = connect(lab, b.netns, host, app.port)
            assert sock is None and err == errno.ECONNREFUSED and seconds < FAST
        for listener in registered:
            assert echo_once(lab, listener, b.netns) == b"hello"
        # The sets are address-precise: A4's port is closed on A6 and the other way round.
        v4_port, v6_port = (s.getsockname()[1] for s in registered)
        if v4_port != v6_port:
            for host, port in ((A6, v4_port), (A4, v6_port)):
                sock, err, seconds = connect(lab, b.netns, host, port)
                assert sock is None and err == errno.ECONNREFUSED and seconds < FAST
        # Unregistering a pair closes it at once, listener or not.
        guard.set_listeners(set())
        assert guard.read_listeners() == set()
        for listener in registered:
            host, port = listener.getsockname()[:2]
            sock, err, seconds = connect(lab, b.netns, host, port)
            assert sock is None and err == errno.ECONNREFUSED and seconds < FAST
    finally:
        for sock in registered:
            sock.close()
        assert app.result()["accepted"] == 0


def test_other_family_of_a_registered_port_is_closed(pair: Pair, make_guard: MakeGuard) -> None:
    """Only (A4, port) is registered. An app cannot bind that pair or the port's wildcard
    (the daemon's listener holds it), and its listener on [::]:port (IPv6 only, which the
    kernel allows) is not reachable: the rule matches the address, not just the port."""
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a)
    with marked_listener(lab, a.netns, A4) as daemon_listener:
        port = daemon_listener.getsockname()[1]
        guard.set_listeners({(ip_address(A4), port)})
        for host, v6only in ((A4, 0), ("0.0.0.0", 0), ("::", 0)):
            tried = child(lab, a.netns, "bind", host=host, port=port, v6only=v6only)
            assert tried["errno"] == errno.EADDRINUSE, (host, tried)
        app = ChildListener(lab, a.netns, port=port, host="::", v6only=True)
        try:
            assert app.port == port
            sock, err, seconds = connect(lab, b.netns, A6, port)
            assert sock is None and err == errno.ECONNREFUSED and seconds < FAST
            assert echo_once(lab, daemon_listener, b.netns) == b"hello"  # A4 still works
        finally:
            assert app.result()["accepted"] == 0
    # Control: without the guard the same app listener is reached, so the refusal above came
    # from the guard.
    guard.remove()
    app = ChildListener(lab, a.netns, port=port, host="::", v6only=True)
    try:
        sock, err, _ = connect(lab, b.netns, A6, port)
        assert sock is not None, err
        with sock:
            sock.settimeout(5)
            assert sock.recv(64) == b"unprivileged"
    finally:
        assert app.result()["accepted"] == 1


def sockets_on_port(lab: Lab, netns: str, state: str, port: int) -> list[str]:
    """``ss`` lines of TCP sockets in ``state`` with local port ``port`` in ``netns``."""
    argv = ["ss", "-tanH", "state", state, f"( sport = :{port} )"]
    return [ln for ln in lab.run(netns, argv).stdout.splitlines() if ln.strip()]


def dial_from(lab: Lab, netns: str, src: str, sport: int, host: str, port: int) -> socket.socket:
    """A marked TCP socket in ``netns`` bound to the fixed ``src:sport`` (SO_REUSEADDR), connected
    to ``host:port``."""
    with lab.in_netns(netns):
        sock = socket.socket(family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((src, sport))
        sock.settimeout(5)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@pytest.mark.parametrize(("a_host", "b_host"), [(A4, B4), (A6, B6)], ids=["v4", "v6"])
def test_reconnect_onto_a_time_wait_socket_is_accepted(
    pair: Pair, make_guard: MakeGuard, a_host: str, b_host: str
) -> None:
    """Regression: a peer reusing a source port while A still holds the old connection in
    TIME_WAIT. The SYN's 4-tuple finds that TIME_WAIT socket, which is not a full socket, so
    a `socket mark` match broke on it and the guard refused a legitimate connect."""
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a)
    with marked_listener(lab, a.netns, a_host) as listener:
        port = listener.getsockname()[1]
        guard.set_listeners({pair_of(listener)})
        with lab.in_netns(b.netns), socket.socket(family(b_host), socket.SOCK_STREAM) as probe:
            probe.bind((b_host, 0))
            sport = probe.getsockname()[1]  # a free port in B, used for both connects
        for attempt in range(2):
            t0 = time.monotonic()
            try:
                client = dial_from(lab, b.netns, b_host, sport, a_host, port)
            except OSError as exc:
                pytest.fail(f"connect {attempt} from port {sport} refused: {exc!r}")
            with client:
                assert time.monotonic() - t0 < FAST
                conn, peer = listener.accept()
                assert (ip_address(peer[0]), peer[1]) == (ip_address(b_host), sport)
                with conn:
                    conn.settimeout(5)
                    client.sendall(b"x")
                    assert conn.recv(1) == b"x"
                    conn.sendall(b"y")
                    assert client.recv(1) == b"y"
                # The server (A) closes first, so A's side of the flow ends in TIME_WAIT.
                assert client.recv(1) == b""
            # B's side closed second: it is gone once A acknowledged B's FIN.
            deadline = time.monotonic() + 5
            while sockets_on_port(lab, b.netns, "all", sport) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert sockets_on_port(lab, b.netns, "all", sport) == []
            held = sockets_on_port(lab, a.netns, "time-wait", port)
            assert any(f":{sport}" in ln.split()[-1] for ln in held), held


# -- (d): refused SYNs are logged through NFLOG -------------------------------------------


GROUP = 7


def refused_syn(
    lab: Lab, netns: str, src: str, host: str, port: int
) -> tuple[int | str, float, int]:
    """Connect from ``src:<ephemeral>`` in ``netns``; (errno or 0, seconds, the source port)."""
    with lab.in_netns(netns):
        sock = socket.socket(family(host), socket.SOCK_STREAM)
    with sock:
        sock.bind((src, 0))
        sport = sock.getsockname()[1]
        sock.settimeout(5)
        t0 = time.monotonic()
        try:
            sock.connect((host, port))
            err: int | str = 0
        except TimeoutError:
            err = "timeout"
        except OSError as exc:
            err = exc.errno or -1
        return err, time.monotonic() - t0, sport


def collect(reader: NflogReader, want: int, timeout: float = 5.0) -> list[RefusedSyn]:
    """Read from ``reader`` until ``want`` records came or ``timeout`` passed; then a bit more,
    so extra records would show."""
    got: list[RefusedSyn] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and reader.wait(max(0.0, deadline - time.monotonic())):
        got += reader.read_ready()
    if reader.wait(0.2):
        got += reader.read_ready()
    return got


@pytest.fixture
def a_reader(pair: Pair) -> Iterator[NflogReader]:
    """An NflogReader for GROUP opened in A's namespace."""
    with pair.lab.in_netns(pair.a.netns):
        reader = NflogReader(GROUP)
    with reader:
        yield reader


@pytest.mark.parametrize(("a_host", "b_host"), [(A4, B4), (A6, B6)], ids=["v4", "v6"])
def test_refused_syns_are_reset_and_logged(
    pair: Pair, make_guard: MakeGuard, a_reader: NflogReader, a_host: str, b_host: str
) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a, log_group=GROUP)
    app = ChildListener(lab, a.netns)  # the app's own listener on a port NOT in the set
    try:
        with marked_listener(lab, a.netns, a_host) as registered:
            guard.set_listeners({pair_of(registered)})
            # A registered port still reaches its own listener, and is not logged.
            assert echo_once(lab, registered, b.netns) == b"hello"
        expected = []
        for dport in (app.port, 9):  # the app's port, and one nobody listens on
            err, seconds, sport = refused_syn(lab, b.netns, b_host, a_host, dport)
            # A true refusal: the SYN is answered by a reset, not by a handshake.
            assert err == errno.ECONNREFUSED and seconds < FAST, (err, seconds)
            expected.append(RefusedSyn(ip_address(b_host), sport, ip_address(a_host), dport,
                                       LOG_PREFIX))  # fmt: skip
        assert collect(a_reader, len(expected)) == expected
        assert a_reader.overruns == 0 and a_reader.malformed == 0
    finally:
        assert app.result()["accepted"] == 0


def test_reader_in_an_event_loop(pair: Pair, make_guard: MakeGuard, a_reader: NflogReader) -> None:
    """How tsnet2d uses it: ``loop.add_reader`` on the fd, ``read_ready()`` in the callback."""
    lab, a, b = pair.lab, pair.a, pair.b
    make_guard(a, log_group=GROUP)

    async def main() -> tuple[list[RefusedSyn], int]:
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[RefusedSyn] = asyncio.Queue()

        def on_readable() -> None:
            for syn in a_reader.read_ready():
                got.put_nowait(syn)

        loop.add_reader(a_reader.fileno(), on_readable)
        try:
            err, _, sport = await asyncio.to_thread(refused_syn, lab, b.netns, B4, A4, 4444)
            assert err == errno.ECONNREFUSED
            return [await asyncio.wait_for(got.get(), 5)], sport
        finally:
            loop.remove_reader(a_reader.fileno())

    (syn,), sport = asyncio.run(main())
    assert (syn.src, syn.sport, syn.dst, syn.dport) == (ip_address(B4), sport, ip_address(A4), 4444)


def test_without_log_group_nothing_is_logged(
    pair: Pair, make_guard: MakeGuard, a_reader: NflogReader
) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    make_guard(a)
    err, seconds, _ = refused_syn(lab, b.netns, B4, A4, 9)
    assert err == errno.ECONNREFUSED and seconds < FAST
    assert collect(a_reader, 1, timeout=0.5) == []


def test_log_rule_is_rate_limited(pair: Pair, make_guard: MakeGuard, a_reader: NflogReader) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a, log_group=GROUP)
    chain = lab.run(a.netns, ["nft", "list", "chain", "inet", guard.table, "tailnet_in"]).stdout
    assert (
        f"limit rate {LOG_RATE} burst {LOG_BURST} packets "
        f'log prefix "{LOG_PREFIX}" group {GROUP} snaplen {LOG_SNAPLEN}'
    ) in chain
    # A burst of SYNs: every one is refused, but no more are logged than the limit lets by.
    total, batch = 600, 100
    refused = 0
    t0 = time.monotonic()
    for _ in range(total // batch):
        with lab.in_netns(b.netns):
            socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(batch)]
        try:
            for sock in socks:
                sock.setblocking(False)
                assert sock.connect_ex((A4, 9)) == errno.EINPROGRESS
            for sock in socks:
                select.select([], [sock], [], 5)
                refused += sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
        finally:
            for sock in socks:
                sock.close()
    elapsed = time.monotonic() - t0
    assert refused == total
    logged = collect(a_reader, total, timeout=2.0)
    allowed = LOG_BURST + int(LOG_RATE.split("/", 1)[0]) * (elapsed + 2.5)
    assert LOG_BURST // 2 <= len(logged) <= allowed, (len(logged), elapsed)
    assert len(logged) < total, f"nothing was limited ({elapsed:.2f} s for {total} SYNs)"
    assert {syn.dport for syn in logged} == {9}


def test_nflog_group_is_per_namespace_and_exclusive(pair: Pair, a_reader: NflogReader) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    with lab.in_netns(a.netns), pytest.raises(NflogError, match="holds the group") as info:
        NflogReader(GROUP)
    assert info.value.errno == errno.EPERM
    with lab.in_netns(b.netns):
        other = NflogReader(GROUP)  # another namespace: its own group of that number
    with other:
        assert other.read_ready() == []
    bound = lab.run(a.netns, ["cat", "/proc/net/netfilter/nfnetlink_log"]).stdout.split()
    assert bound[:1] == [str(GROUP)]
    a_reader.close()
    a_reader.close()
    assert a_reader.fileno() == -1 and a_reader.closed
    with pytest.raises(NflogError, match="closed"):
        a_reader.read_ready()
    # Closing the socket unbinds the group: nothing is left in A, and it can be bound again.
    assert lab.run(a.netns, ["cat", "/proc/net/netfilter/nfnetlink_log"]).stdout == ""
    with lab.in_netns(a.netns), NflogReader(GROUP) as again:
        assert again.read_ready() == []


def test_remove_leaves_nothing_and_stops_logging(
    pair: Pair, make_guard: MakeGuard, a_reader: NflogReader
) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a, log_group=GROUP)
    err, _, _ = refused_syn(lab, b.netns, B6, A6, 9)
    assert err == errno.ECONNREFUSED and len(collect(a_reader, 1)) == 1
    guard.remove()
    assert lab.run(a.netns, ["nft", "list", "ruleset"]).stdout.strip() == ""
    # Control: without the guard the app's listener is reached, and nothing is logged.
    app = ChildListener(lab, a.netns)
    try:
        sock, err, _ = connect(lab, b.netns, A4, app.port)
        assert sock is not None, err
        with sock:
            sock.settimeout(5)
            assert sock.recv(64) == b"unprivileged"
    finally:
        assert app.result()["accepted"] == 1
    err, _, _ = refused_syn(lab, b.netns, B4, A4, 9)  # the kernel's own reset: no listener
    assert err == errno.ECONNREFUSED
    assert collect(a_reader, 1, timeout=0.5) == []


def test_original_dst_of_an_accepted_connection(pair: Pair, make_guard: MakeGuard) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a)
    for host in (A4, A6):
        with marked_listener(lab, a.netns, host) as listener:
            port = listener.getsockname()[1]
            guard.set_listeners({pair_of(listener)})
            sock, err, _ = connect(lab, b.netns, host, port)
            assert sock is not None, err
            with sock:
                conn, _ = listener.accept()
                with conn:
                    ip, orig_port = original_dst(conn)
            assert (ip, orig_port) == (ip_address(host), port)


def test_original_dst_without_conntrack_is_a_guard_error() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock, pytest.raises(GuardError):
        original_dst(sock)  # not connected
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, pytest.raises(GuardError):
        original_dst(sock)


# -- (e): lifecycle and isolation ----------------------------------------------------------


def test_install_and_remove_are_idempotent(pair: Pair, make_guard: MakeGuard) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a)
    assert f"table inet {guard.table}" in tables(lab, a.netns)
    assert guard.table not in tables(lab, b.netns)  # B's namespace is untouched
    pairs: set[Listener] = {(ip_address(A4), 80), (ip_address(A6), 443), (ip_address(A4), 443)}
    guard.set_listeners(pairs)
    with lab.in_netns(a.netns):
        guard.install()  # again: replaced in one transaction, listeners re-applied
    assert guard.read_listeners() == pairs
    assert tables(lab, a.netns).count(guard.table) == 1
    # A restarted daemon (new Guard object) replaces the crashed one's table, ports and all.
    restarted = make_guard(a)
    assert restarted.read_listeners() == set()
    guard.remove()
    guard.remove()
    assert guard.table not in tables(lab, a.netns)
    assert not guard.exists()
    # A Guard never installed removes a leftover table of its name in the current namespace.
    make_guard(a).set_listeners({(ip_address(A6), 22)})
    with lab.in_netns(a.netns):
        Guard(a.ifname).remove()
    assert tables(lab, a.netns).strip() == ""
    with pytest.raises(GuardError, match="not installed"):
        guard.set_listeners({(ip_address(A4), 1)})


def test_guard_in_a_does_not_affect_b(pair: Pair, make_guard: MakeGuard) -> None:
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a)
    assert tables(lab, b.netns).strip() == ""
    # B's outbound is not guarded: an unprivileged process in B reaches A's registered port.
    with marked_listener(lab, a.netns, A4) as listener:
        port = listener.getsockname()[1]
        guard.set_listeners({pair_of(listener)})
        result = child(lab, b.netns, "connect", targets=[[A4, port]])
        assert result["uid"] == 65534 and result["results"][0]["errno"] == 0, result
        listener.accept()[0].close()
    # B's inbound is not guarded: a marked socket from A reaches an unprivileged listener in B.
    app_b = ChildListener(lab, b.netns)
    try:
        sock, err, _ = connect(lab, a.netns, B6, app_b.port, mark=True)
        assert sock is not None, err
        with sock:
            sock.settimeout(5)
            assert sock.recv(64) == b"unprivileged"
    finally:
        assert app_b.result()["accepted"] == 1


def test_reset_for_a_handshake_nobody_finished(pair: Pair, make_guard: MakeGuard) -> None:
    """A SYN was accepted, then the listener went (an unregister racing a connect): the
    kernel's reset carries no mark but must still get out, or the peer hangs."""
    lab, a, b = pair.lab, pair.a, pair.b
    guard = make_guard(a)
    listener = marked_listener(lab, a.netns, A4)
    with listener:
        port = listener.getsockname()[1]
        guard.set_listeners({pair_of(listener)})
        # B drops its own final handshake ACK, so A's side stays half-open (SYN_RECV).
        hold = b.dir / "hold.nft"
        hold.write_text(
            "table inet hold {\n\tchain o {\n\t\ttype filter hook output priority 0;\n"
            f"\t\tip daddr {A4} tcp flags == ack drop\n\t}}\n}}\n"
        )
        lab.run(b.netns, ["nft", "-f", str(hold)])
        sock, err, _ = connect(lab, b.netns, A4, port)
    assert sock is not None, err  # B got the SYN-ACK; A's listener is closed now
    with sock:
        lab.run(b.netns, ["nft", "delete", "table", "inet", "hold"])
        sock.sendall(b"late")
        sock.settimeout(3)
        with pytest.raises(ConnectionResetError):
            sock.recv(64)


def test_calls_run_in_the_install_namespace(pair: Pair, make_guard: MakeGuard) -> None:
    lab, a = pair.lab, pair.a
    guard = make_guard(a)
    errors: list[BaseException] = []

    def from_other_thread() -> None:  # a fresh thread in the host namespace (asyncio.to_thread)
        try:
            guard.install()  # again, where the first install was
            guard.set_listeners({(ip_address(A4), 8080), (ip_address(A6), 8080)})
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=from_other_thread)
    thread.start()
    thread.join(30)
    assert not errors
    for name, host in (("listen4", A4), ("listen6", A6)):
        out = lab.run(a.netns, ["nft", "-j", "list", "set", "inet", guard.table, name]).stdout
        assert json.loads(out)["nftables"][1]["set"]["elem"] == [{"concat": [host, 8080]}]
    assert ("inet", guard.table) not in list_tables()  # the host namespace: nothing


def test_two_devices_in_one_namespace_do_not_collide(pair: Pair) -> None:
    lab, a = pair.lab, pair.a
    g1, g2 = Guard(a.ifname), Guard(a.ifname + "x")
    with lab.in_netns(a.netns), g1, g2:
        p1: set[Listener] = {(ip_address(A4), 1)}
        p2: set[Listener] = {(ip_address(A6), 2)}
        g1.set_listeners(p1)
        g2.set_listeners(p2)
        assert (g1.read_listeners(), g2.read_listeners()) == (p1, p2)
        g2.remove()
        assert g1.exists() and not g2.exists()
    assert tables(lab, a.netns).strip() == ""


def test_set_listeners_validates_before_changing(pair: Pair, make_guard: MakeGuard) -> None:
    guard = make_guard(pair.a)
    good: set[Listener] = {(ip_address(A4), 443), (ip_address(A6), 443)}
    guard.set_listeners(good)
    v4 = ip_address(A4)
    bad_sets: list[tuple[list[Any], str]] = [
        ([(v4, 0)], "not a TCP port"),
        ([(v4, 65536)], "not a TCP port"),
        ([(v4, 80), (v4, -1)], "not a TCP port"),  # one bad pair spoils the whole update
        ([(v4, True)], "not a TCP port"),
        ([(A4, 80)], "not an ipaddress"),
        ([80], "pair"),
        ([(ip_address("0.0.0.0"), 80)], "wildcard"),
    ]
    for bad, message in bad_sets:
        with pytest.raises(GuardError, match=message):
            guard.set_listeners(bad)
    assert guard.read_listeners() == good == guard.listeners


def test_read_listeners_of_a_foreign_table_is_a_guard_error(pair: Pair) -> None:
    """A table of that name without the sets (e.g. an older tsnet2's) is reported, and
    install() replaces it."""
    lab, a = pair.lab, pair.a
    guard = Guard(a.ifname)
    lab.run(a.netns, ["nft", "add", "table", "inet", guard.table])
    lab.run(a.netns, ["nft", "add", "set", "inet", guard.table, "ports", "{ type inet_service; }"])
    try:
        with lab.in_netns(a.netns), pytest.raises(GuardError, match="no set listen4"):
            guard.read_listeners()
        with lab.in_netns(a.netns):
            guard.install()
        assert guard.read_listeners() == set()
    finally:
        guard.remove()


def test_nft_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GuardError, match=r"`nft` command was not found.*nftables"):
        Guard("tsnet2").install()


def test_nft_failure_carries_stderr(pair: Pair) -> None:
    guard = Guard(pair.a.ifname)
    with pytest.raises(GuardError) as info, pair.lab.in_netns(pair.a.netns):
        guard.read_listeners()  # no such table
    assert info.value.returncode == 1 and info.value.stderr
    assert info.value.stderr in str(info.value)
    assert not guard.installed
