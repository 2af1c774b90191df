"""Device lifecycle, error mapping and the kernel backend."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tsnet2.lab import Lab, find_leftovers
from tsnet2.node import Node, NodeError, PeerConfig, UAPIError, detect_endpoints
from tsnet2.node.device import (
    SOCKET_DIR,
    WIREGUARD_GO_ENV,
    KernelDevice,
    PeerUpdate,
    UserspaceDevice,
    WireguardGo,
    detect_backend,
    find_wireguard_go,
)
from tsnet2.node.uapi import MAX_REPLY_BYTES, UAPIClient
from tsnet2.node.wgkey import WireguardKey

netns = pytest.mark.netns


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@netns
def test_close_removes_device_process_and_socket(lab: Lab) -> None:
    a = lab.add_node("a")
    node = Node(ifname=a.ifname, backend="userspace")
    with lab.in_netns(a.netns):
        node.start(WireguardKey.generate())
    device = node.device
    assert isinstance(device, UserspaceDevice) and device.pid is not None
    pid = device.pid
    sock = SOCKET_DIR / f"{a.ifname}.sock"
    assert _alive(pid) and sock.exists()
    assert a.ifname in lab.run(a.netns, ["ip", "link"]).stdout
    node.close()
    node.close()  # idempotent
    assert not _alive(pid)
    assert not sock.exists()
    assert a.ifname not in lab.run(a.netns, ["ip", "link"]).stdout
    with pytest.raises(NodeError, match="not started"):
        node.peer_stats()


@netns
def test_killed_wireguard_go_stale_socket_and_restart(lab: Lab) -> None:
    a = lab.add_node("a")
    key = WireguardKey.generate()
    with lab.in_netns(a.netns), Node(ifname=a.ifname) as node:
        node.start(key)
        pid = node.device.pid  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)
        sock = SOCKET_DIR / f"{a.ifname}.sock"
        node.close()
        assert not sock.exists() and not _alive(pid)
    # the same name starts again afterwards, with the same key
    with lab.in_netns(a.netns), Node(ifname=a.ifname) as node:
        node.start(key)
        assert node.state().public_key == str(key.public_key())


@netns
def test_duplicate_device_names_refused(lab: Lab, start_node: Callable[..., Node]) -> None:
    a, b = lab.add_node("a"), lab.add_node("b")
    start_node(a, 1)
    # same name in the same netns
    dup = Node(ifname=a.ifname)
    with lab.in_netns(a.netns), pytest.raises(NodeError, match="already exists"):
        dup.start(WireguardKey.generate())
    # same name in another netns: the UAPI socket directory is shared by all namespaces
    with lab.in_netns(b.netns), pytest.raises(NodeError, match="already serves"):
        dup.start(WireguardKey.generate())
    assert not dup.started


@netns
def test_existing_link_and_bad_names_refused(lab: Lab) -> None:
    a = lab.add_node("a")
    lab.run(a.netns, ["ip", "link", "add", "name", a.ifname, "type", "veth"])
    node = Node(ifname=a.ifname)
    with lab.in_netns(a.netns), pytest.raises(NodeError, match="already exists"):
        node.start(WireguardKey.generate())
    for bad in ("much-too-long-name", "a/b", "a:b", ""):
        with pytest.raises(NodeError, match="bad interface name"):
            Node(ifname=bad)


def _fake_binary(tmp_path: Path, body: str) -> str:
    """A stand-in executable for supervisor failure paths (a child that dies or hangs)."""
    path = tmp_path / "child.sh"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


@netns
def test_child_that_dies_early_reports_its_output(lab: Lab, tmp_path: Path) -> None:
    a = lab.add_node("a")
    dev = UserspaceDevice(
        a.ifname, binary=_fake_binary(tmp_path, "echo 'ERROR: tun busy' >&2; exit 3")
    )
    with (
        lab.in_netns(a.netns),
        pytest.raises(NodeError, match=r"(?s)exited with status 3.*tun busy"),
    ):
        dev.start(WireguardKey.generate(), 41641)
    assert dev.pid is None


@netns
def test_child_that_never_listens_is_killed(lab: Lab, tmp_path: Path) -> None:
    a = lab.add_node("a")
    # argv[1] is "-f", argv[2] the lab-prefixed name: find_leftovers would see a stray child
    script = f'echo starting; exec {sys.executable} -c "import time; time.sleep(60)" "$2"'
    dev = UserspaceDevice(a.ifname, binary=_fake_binary(tmp_path, script))
    with lab.in_netns(a.netns), pytest.raises(NodeError, match=r"(?s)did not create.*starting"):
        dev.start(WireguardKey.generate(), 41641)
    assert dev.pid is None
    assert [x for x in find_leftovers(lab.prefix) if x.startswith("process")] == []


@netns
def test_the_wireguard_go_named_is_the_one_run(
        lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$TSNET2_WIREGUARD_GO names the binary (scripts/test points it at the build of
    image/wireguard-go); ``Node(wireguard_go=...)`` (tsnet2d --wireguard-go) overrides it."""
    real = find_wireguard_go()
    a = lab.add_node("a")
    with lab.in_netns(a.netns), Node(ifname=a.ifname, backend="userspace") as node:
        node.start(WireguardKey.generate())
        device = node.device
        assert isinstance(device, UserspaceDevice) and device.pid is not None
        assert device.path == real.path
        assert os.path.realpath(f"/proc/{device.pid}/exe") == os.path.realpath(real.path)
    ran = tmp_path / "ran"
    wrapper = _fake_binary(tmp_path, f'echo "$@" >> {ran}; exec {real.path} "$@"')
    monkeypatch.setenv(WIREGUARD_GO_ENV, wrapper)
    assert find_wireguard_go() == WireguardGo(wrapper, real.version)
    assert ran.read_text() == "--version\n"
    ran.unlink()
    with lab.in_netns(a.netns), Node(ifname=a.ifname, backend="userspace") as node:
        node.start(WireguardKey.generate())
        assert node.device.path == wrapper  # type: ignore[attr-defined]
    assert ran.read_text() == f"-f {a.ifname}\n"
    monkeypatch.setenv(WIREGUARD_GO_ENV, str(tmp_path / "not-there"))
    with lab.in_netns(a.netns), Node(ifname=a.ifname, backend="userspace",
                                     wireguard_go=wrapper) as node:
        node.start(WireguardKey.generate())
    assert ran.read_text() == f"-f {a.ifname}\n" * 2
    with pytest.raises(NodeError, match=f"not-there not found; install the wireguard-go "
                       f"package, or name a wireguard-go binary in \\${WIREGUARD_GO_ENV}"):
        find_wireguard_go()


@netns
def test_missing_binary(lab: Lab) -> None:
    a = lab.add_node("a")
    dev = UserspaceDevice(a.ifname, binary="wireguard-go-not-installed")
    with lab.in_netns(a.netns), pytest.raises(NodeError, match="install the wireguard-go package"):
        dev.start(WireguardKey.generate(), 41641)


@netns
def test_uapi_errors(lab: Lab, start_node: Callable[..., Node]) -> None:
    a = lab.add_node("a")
    node = start_node(a, 1)
    client = UAPIClient(SOCKET_DIR / f"{a.ifname}.sock")
    with pytest.raises(UAPIError) as info:
        client.set(["listen_port=notaport"])
    assert info.value.errno == 22
    with pytest.raises(UAPIError) as info:
        client.set(["public_key=zz"])
    assert info.value.errno == 22
    # validation happens before anything is sent
    with pytest.raises(NodeError, match="not a network"):
        node.apply_peers(
            [PeerConfig(str(WireguardKey.generate().public_key()), None, ["100.64.0.1/8"])]
        )
    with pytest.raises(NodeError, match="not an IP address"):
        node.apply_peers([PeerConfig(str(WireguardKey.generate().public_key()), "host:1", [])])
    assert node.peer_stats() == {}
    # a missing socket is a UAPIError too
    with pytest.raises(UAPIError, match="cannot reach"):
        UAPIClient(SOCKET_DIR / "t2-no-such-dev.sock").get()


def _serve_once(path: Path, reply: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                with contextlib.suppress(OSError):  # the client gives up on oversized replies
                    conn.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (b"listen_port=1\n", "without errno"),
        (b"garbage\n\n", "malformed"),
        (b"errno=x\n\n", "not a number"),
        (b"\xff=1\nerrno=0\n\n", "not ASCII"),
        (b"a=" + b"x" * (MAX_REPLY_BYTES + 10), "exceeds"),
    ],
)
def test_uapi_client_rejects_bad_replies(tmp_path: Path, reply: bytes, match: str) -> None:
    """A misbehaving socket peer gives a UAPIError, never a hang or an unbounded buffer."""
    path = tmp_path / "dev.sock"
    thread = _serve_once(path, reply)
    with pytest.raises(UAPIError, match=match):
        UAPIClient(path, timeout=5).get()
    thread.join(5)


def test_uapi_client_times_out(tmp_path: Path) -> None:
    path = tmp_path / "slow.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(1)  # accepts (backlog) but never answers
        with pytest.raises(UAPIError, match="timed out"):
            UAPIClient(path, timeout=0.3).get()


@netns
def test_detect_endpoints_in_lab(lab: Lab, start_node: Callable[..., Node]) -> None:
    a = lab.add_node("a")
    start_node(a, 1)
    with lab.in_netns(a.netns):
        found = detect_endpoints(41641, exclude_ifnames=[a.ifname])
    assert found == [f"{a.ip}:41641"]


@netns
def test_kernel_backend(lab: Lab) -> None:
    a = lab.add_node("a")
    with lab.in_netns(a.netns):
        backend = detect_backend()
    if backend != "kernel":
        pytest.skip("kernel WireGuard module not available here (ip link add type wireguard fails)")
    with lab.in_netns(a.netns):
        dev = KernelDevice(a.ifname)
        dev.start(WireguardKey.generate(), 41641)
        try:
            peer = str(WireguardKey.generate().public_key())
            dev.set_peers([PeerUpdate(peer, endpoint="10.1.2.3:5", allowed_ips=("100.64.0.9/32",))])
            state = dev.state()
            assert state.listen_port == 41641
            assert state.peers[peer].endpoint == "10.1.2.3:5"
            assert state.peers[peer].allowed_ips == ["100.64.0.9/32"]
            dev.set_peers([PeerUpdate(peer, remove=True)])
            assert dev.state().peers == {}
        finally:
            dev.close()
        assert a.ifname not in lab.run(a.netns, ["ip", "link"]).stdout
