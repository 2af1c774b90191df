"""The netns lab: nodes reach each other over the hub bridge; close removes everything."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tsnet2.lab import LAB_SUPERNET, Lab, LabError, check_prerequisites, find_leftovers

pytestmark = pytest.mark.netns


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_prerequisites_met_here() -> None:
    assert check_prerequisites() == []


def test_close_removes_everything_and_is_idempotent() -> None:
    lab = Lab()
    try:
        a, b = lab.add_node("a"), lab.add_node("b")
        assert {lab.hub, a.netns, b.netns} <= _netns_names()
        assert a.netns == f"{lab.prefix}-a" and a.ip in lab.subnet
        assert lab.subnet.subnet_of(LAB_SUPERNET)
        assert lab.hub_ip == lab.subnet.network_address + 1
        assert a.ifname != b.ifname and a.ifname.startswith(lab.prefix) and len(a.ifname) <= 15
        assert a.dir.is_dir() and a.dir.parent == lab.dir
        sleeper = lab.popen(a.netns, ["sleep", "600"])
        # a process the lab did not track (backgrounded by a shell) inside its namespace;
        # its argv carries the prefix so find_leftovers can see it
        sleep = f"{sys.executable} -c 'import time; time.sleep(600)' {lab.prefix}"
        lab.run(b.netns, ["sh", "-c", f"{sleep} >/dev/null 2>&1 &"])
        deadline = time.monotonic() + 10
        while not any(x.startswith("process") for x in find_leftovers(lab.prefix)):
            assert time.monotonic() < deadline, "background process never showed up"
            time.sleep(0.05)
    finally:
        lab.close()
    assert sleeper.returncode is not None
    assert not {lab.hub, a.netns, b.netns} & _netns_names()
    assert not lab.dir.exists()
    assert find_leftovers(lab.prefix) == []
    lab.close()  # idempotent
    with pytest.raises(LabError, match="closed"):
        lab.add_node("c")


def test_nodes_talk_over_the_bridge(lab: Lab) -> None:
    a, b = lab.add_node("a"), lab.add_node("b")
    with lab.in_netns(b.netns):
        listener = socket.create_server((str(b.ip), 0))
    with listener:
        port = listener.getsockname()[1]
        got: list[bytes] = []

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                got.append(conn.recv(100))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with lab.in_netns(a.netns):
            client = socket.create_connection((str(b.ip), port), timeout=10)
        with client:
            client.sendall(b"ping")
        thread.join(10)
    assert got == [b"ping"]
    # the hub answers too, and the host's namespace cannot see the lab subnet
    lab.run(a.netns, ["ping", "-c", "1", "-W", "5", str(lab.hub_ip)])
    with socket.socket() as s:
        s.settimeout(0.5)
        assert s.connect_ex((str(b.ip), port)) != 0


def _netns_inode() -> int:
    return Path("/proc/thread-self/ns/net").stat().st_ino


def test_in_netns_moves_only_this_thread(lab: Lab) -> None:
    a = lab.add_node("a")
    outer = _netns_inode()
    entered, done = threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def existing_thread() -> None:
        entered.wait(10)
        seen["existing"] = _netns_inode()
        done.set()

    other = threading.Thread(target=existing_thread)
    other.start()
    with lab.in_netns(a.netns):
        inner = _netns_inode()
        entered.set()
        done.wait(10)
        # threads started inside inherit the namespace of the thread that creates them
        child = threading.Thread(target=lambda: seen.setdefault("child", _netns_inode()))
        child.start()
        child.join()
    other.join()
    assert inner != outer
    assert seen == {"existing": outer, "child": inner}
    assert _netns_inode() == outer


def test_remove_node_and_bad_input(lab: Lab) -> None:
    a = lab.add_node("a")
    proc = lab.popen(a.netns, ["sleep", "600"])
    lab.remove_node("a")
    assert proc.returncode is not None
    assert a.netns not in _netns_names() and not a.dir.exists()
    with pytest.raises(LabError):
        lab.remove_node("a")
    with pytest.raises(LabError, match="node name"):
        lab.add_node("Bad Name")
    b = lab.add_node("b")
    with pytest.raises(LabError, match="already exists"):
        lab.add_node("b")
    with pytest.raises(LabError, match="not a namespace"):
        lab.popen("t2-not-ours", ["true"])
    with pytest.raises(LabError, match="exited with 3"):
        lab.run(b.netns, ["sh", "-c", "echo oops >&2; exit 3"])
    with pytest.raises(LabError, match="lab prefix"):
        Lab(prefix="Bad!")


def test_unique_ifnames_for_long_names(lab: Lab) -> None:
    x = lab.add_node("averyveryverylongname")
    y = lab.add_node("averyveryverylongname2")
    assert x.ifname != y.ifname
    assert len(x.ifname) <= 15 and len(y.ifname) <= 15


def test_popen_stops_a_process_ignoring_sigterm(lab: Lab) -> None:
    a = lab.add_node("a")
    proc = lab.popen(a.netns, ["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"])

    def ignores_term() -> bool:  # the trap is set (``ip netns exec`` execs, same pid)
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
        return False

    deadline = time.monotonic() + 10
    while not ignores_term():
        assert time.monotonic() < deadline, "the shell never set its SIGTERM trap"
        time.sleep(0.01)
    t0 = time.monotonic()
    lab.remove_node("a")
    assert proc.returncode is not None and time.monotonic() - t0 < 15
