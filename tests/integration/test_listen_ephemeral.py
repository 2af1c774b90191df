"""Port 0 listeners on a real node get the prototype's ports (issue 12, wire fidelity).

The Go daemon (cmd/tsnet2d/daemon/daemon.go at 7dd5d94c0, ``pickEphemeralPort``) answers
``register_listener`` for port 0 with ``":<10002 + n % 9998>"``, n counting from 1: a fresh
daemon hands out ``:10003``, then ``:10004``... Ours does the same, on real sockets on the
node's tailnet addresses, and skips a port some socket there already holds.
"""

from __future__ import annotations

import base64
import json
import re
import socket
from collections.abc import Iterator

import pytest

from tsnet2 import proto

from .tailnet import TwoNodes, echo_once, recv_exactly, two_nodes

pytestmark = pytest.mark.netns

RESULT = re.compile(rb'\{"id":(\d+),"result":"([A-Za-z0-9+/=]+)"\}\n')


@pytest.fixture(scope="module")
def net() -> Iterator[TwoNodes]:
    with two_nodes(("eph-a", "eph-b")) as n:
        yield n


def readline(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk, f"control channel closed: {buf!r}"
        buf += chunk
    return buf


def register_raw(s: socket.socket, rid: int, network: str, addr: str) -> bytes:
    """Send a prototype-shaped register_listener frame; return the bound addr, after
    checking the reply byte for byte against the Go daemon's shape."""
    params = base64.b64encode(proto.go_json({"network": network, "addr": addr})).decode()
    s.sendall(b'{"id":%d,"method":"register_listener","params":"%s"}\n'
              % (rid, params.encode()))
    line = readline(s)
    m = RESULT.fullmatch(line)
    assert m and int(m.group(1)) == rid, line
    result = base64.b64decode(m.group(2))
    doc = json.loads(result)
    assert list(doc) == ["listener_id", "addr"] and proto.ID_RE.fullmatch(doc["listener_id"])
    assert result == b'{"listener_id":"%s","addr":"%s"}' % (doc["listener_id"].encode(),
                                                            doc["addr"].encode())
    return str(doc["addr"]).encode()


def test_port_0_follows_the_go_daemon_and_skips_ports_in_use(net: TwoNodes) -> None:
    a_v4, _ = net.a.tailscale_ips()
    assert a_v4 is not None
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(30)
    raw.connect(str(net.da.socket_path))
    raw.sendall(proto.ChannelKind.CONTROL.byte)
    try:
        # A fresh daemon: the prototype's first two port-0 answers, byte for byte.
        assert register_raw(raw, 1, "tcp", ":0") == b":10003"
        assert register_raw(raw, 2, "tcp4", "0.0.0.0:0") == b":10004"

        # Through the library: the next port, and it is a real, reachable port.
        ln = net.a.listen("tcp", ":0")
        assert ln.port == 10005 and ln.addr.endswith(":10005")
        t = echo_once(ln)
        with net.b.dial("tcp", f"{a_v4}:10005", timeout=15) as c:
            c.sendall(b"ephemeral")
            assert recv_exactly(c, 9) == b"ephemeral"
        t.join(10)

        # Another process's socket on the node's address holds the port the counter
        # points at next (10006): it is skipped, not an error.
        with net.lnet.lab.in_netns(net.da.node.netns):
            holder = socket.socket()
        try:
            holder.bind((str(a_v4), 10006))
            holder.listen()
            ln2 = net.a.listen("tcp4", ":0")
            assert ln2.port == 10007
        finally:
            holder.close()
    finally:
        raw.close()
    # The raw client's listeners go with its connection; like the Go counter, ours moves
    # on instead of handing 10003 out again.
    ln3 = net.a.listen("tcp", ":0")
    assert ln3.port == 10008
    for x in (ln, ln2, ln3):
        x.close()


def test_fixed_ports_in_the_range_are_still_exact(net: TwoNodes) -> None:
    """An app may name a port of the range itself: it gets exactly that port, and the
    port-0 listener that would have had it gets the next one."""
    with net.a.listen("tcp", ":0") as probe:
        p = probe.port
    assert 10002 <= p < 19999
    with net.a.listen("tcp", f":{p + 1}") as fixed:
        assert fixed.port == p + 1
        with net.a.listen("tcp", ":0") as eph:
            assert eph.port == p + 2
