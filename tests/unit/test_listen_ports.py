"""Port 0 listeners get the prototype's ports: 10002-19999, in its order, skipping ports
in use, with an error when none is left.

The Go daemon (cmd/tsnet2d/daemon/daemon.go at 7dd5d94c0, ``pickEphemeralPort``) answers
port 0 with ``10002 + n % 9998`` for a counter n = 1, 2, ...: 10003 first. A real
``Datapath`` binds real sockets here, on loopback addresses (no node, no root needed);
the netns integration tests check the same through a node's tailnet addresses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tsnet2.daemon import datapath
from tsnet2.daemon.backend import Backend, DeviceConfig
from tsnet2.daemon.datapath import EPHEMERAL_PORTS, Datapath, ListenError
from tsnet2.proto import ErrorCode
from tsnet2.traffic import TrafficLog

LO = ipaddress.IPv4Address("127.0.0.1")


@dataclasses.dataclass
class Held:
    """Stands for a registered listener: all the allocator reads of one is its port."""

    port: int


@pytest.fixture
def dp(tmp_path: Path) -> Iterator[Datapath]:
    with TrafficLog(str(tmp_path / "traffic.jsonl")) as log:
        yield Datapath(Backend(tmp_path / "state", DeviceConfig()), log,
                       cast(Any, asyncio.ensure_future))


def hold(dp: Datapath, *ports: int) -> None:
    for p in ports:
        dp.listeners[f"held-{p}"] = cast(Any, Held(p))


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def test_the_range_is_the_prototypes() -> None:
    assert (EPHEMERAL_PORTS[0], EPHEMERAL_PORTS[-1], len(EPHEMERAL_PORTS)) == (10002, 19999, 9998)


def test_candidates_follow_the_go_counter(dp: Datapath) -> None:
    """10003, 10004, ... as the Go counter runs; after 19999 comes 10002; a port that
    was not taken (the generator abandoned after it) is not handed out twice."""
    assert next(dp._ephemeral_ports()) == 10003
    assert next(dp._ephemeral_ports()) == 10004
    it = dp._ephemeral_ports()
    assert [next(it), next(it)] == [10005, 10006]  # a bind found 10005 taken: next is 10006
    assert next(dp._ephemeral_ports()) == 10007
    dp._ephemeral_count = 9996  # the port last handed out was 19998
    assert next(dp._ephemeral_ports()) == 19999
    assert next(dp._ephemeral_ports()) == 10002
    assert next(dp._ephemeral_ports()) == 10003


def test_candidates_skip_the_nodes_listeners_and_try_each_port_once(dp: Datapath) -> None:
    hold(dp, 10003, 10005)
    ports = list(dp._ephemeral_ports())
    assert ports[:3] == [10004, 10006, 10007]
    assert len(ports) == len(set(ports)) == 9998 - 2
    assert set(ports) == set(EPHEMERAL_PORTS) - {10003, 10005}


def test_port_0_binds_in_the_range(dp: Datapath) -> None:
    socks = dp._bind([LO], 0)
    try:
        port = socks[0].getsockname()[1]
        assert port in EPHEMERAL_PORTS
        # The counter stands at the port handed out: the next listener gets a later one.
        assert dp._ephemeral_count == port - 10002
    finally:
        close_all(socks)


def test_port_0_skips_a_port_another_socket_holds(dp: Datapath) -> None:
    """A real socket (not a listener of the node) on the port the counter points at next:
    the bind fails with EADDRINUSE and the next port is taken instead."""
    holder = socket.socket()
    try:
        holder.bind((str(LO), 10003))
        holder.listen()
    except OSError as exc:  # something on this machine holds it already: just as good
        assert exc.errno == errno.EADDRINUSE
    try:
        socks = dp._bind([LO], 0)
        port = socks[0].getsockname()[1]
        close_all(socks)
        assert 10003 < port <= 19999
        assert dp._ephemeral_count == port - 10002
    finally:
        holder.close()


def test_port_0_binds_one_port_on_every_address(dp: Datapath) -> None:
    addrs = [LO, ipaddress.IPv4Address("127.0.0.2")]
    socks = dp._bind(addrs, 0)
    try:
        assert [s.getsockname()[0] for s in socks] == ["127.0.0.1", "127.0.0.2"]
        assert len({s.getsockname()[1] for s in socks}) == 1
        assert socks[0].getsockname()[1] in EPHEMERAL_PORTS
    finally:
        close_all(socks)


def test_exhausted_range_is_address_in_use(dp: Datapath, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """Every port of the range held (by listeners of the node, or by other sockets): a
    clear address_in_use error naming the range, and nothing is left bound."""
    monkeypatch.setattr(datapath, "EPHEMERAL_PORTS", range(10002, 10005))
    hold(dp, 10002, 10004)
    holder = socket.socket()
    try:
        try:
            holder.bind((str(LO), 10003))
            holder.listen()
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
        with pytest.raises(ListenError) as ei:
            dp._bind([LO], 0)
    finally:
        holder.close()
    assert ei.value.code == ErrorCode.ADDRESS_IN_USE
    assert str(ei.value) == (
        "daemon: no free port for a port-0 listener: every port of 10002-10004 is in use "
        "on this node (127.0.0.1); close a listener or pick a port")


def test_a_fixed_port_is_never_replaced(dp: Datapath) -> None:
    """A taken fixed port is an error, even one inside the range."""
    holder = socket.socket()
    holder.bind((str(LO), 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(ListenError, match=f"port {port} is in use") as ei:
            dp._bind([LO], port)
        assert ei.value.code == ErrorCode.ADDRESS_IN_USE
    finally:
        holder.close()
    assert dp._ephemeral_count == 0
