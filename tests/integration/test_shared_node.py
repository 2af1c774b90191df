"""The daemon as a shared service: several clients, a node that outlives them, self-healing,
and errors that name their cause (issue 9). Real daemons, real WireGuard, real processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tsnet2
from tsnet2 import proto
from tsnet2.daemon.server import MAX_LISTENERS_PER_SESSION

from .tailnet import TwoNodes, echo_once, recv_exactly, two_nodes, wait_for

pytestmark = pytest.mark.netns


def assert_echo(dialer: tsnet2.Server, target: str, payload: bytes = b"ping",
                timeout: float = 15) -> None:
    with dialer.dial("tcp", target, timeout=timeout) as c:
        c.sendall(payload)
        assert recv_exactly(c, len(payload)) == payload


def wireguard_go_pid(ifname: str) -> int:
    out = subprocess.run(["pgrep", "-f", f"wireguard-go -f {ifname}$"], capture_output=True,
                         text=True, timeout=10)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, f"wireguard-go for {ifname}: {pids}"
    return pids[0]


@pytest.fixture(scope="module")
def net() -> Iterator[TwoNodes]:
    with two_nodes(("web", "peer")) as n:
        yield n


def test_a_second_app_and_a_read_only_tool_leave_the_first_app_serving(net: TwoNodes) -> None:
    with net.a.listen("tcp", ":8301") as ln:
        # A second app on the same daemon joins and leaves; a join=False tool (what
        # `tsnet2 ping` is) dials and leaves. Neither takes the node from the first app.
        second = tsnet2.Server(socket_path=str(net.da.socket_path))
        second.up(timeout=30)
        with second.listen("tcp", ":8302"):
            pass
        second.close()
        with tsnet2.Server(socket_path=str(net.da.socket_path), join=False) as tool:
            t = echo_once(ln)
            assert_echo(tool, "web:8301")
            t.join(10)
        # The node is still up, with its address, and the first app's listener serves.
        v4, _ = net.a.tailscale_ips()
        assert v4 is not None
        t = echo_once(ln)
        assert_echo(net.b, "web:8301")
        t.join(10)
    # Another client cannot close what it does not own: its unregister is ignored.
    with net.a.listen("tcp", ":8303") as ln, \
            tsnet2.Server(socket_path=str(net.da.socket_path), join=False) as tool:
        tool.start()
        tool._rpc("test", proto.Method.UNREGISTER_LISTENER,
                  proto.UnregisterListenerParams(ln.listener_id), 5)
        t = echo_once(ln)
        assert_echo(net.b, "web:8303")
        t.join(10)


def test_errors_name_their_cause(net: TwoNodes) -> None:
    # A fixed port in use is EADDRINUSE, never silently another port.
    with net.a.listen("tcp", ":8310"):
        with pytest.raises(tsnet2.AddressInUseError) as info:
            net.a.listen("tcp", ":8310")
        assert isinstance(info.value, OSError) and info.value.errno == 98
    # One daemon, one node: another hostname is a conflict, not a silent "yes".
    other = tsnet2.Server(socket_path=str(net.da.socket_path), hostname="not-web")
    with pytest.raises(tsnet2.HostnameConflictError, match=r"'web'.*'not-web'"):
        other.start()
    # Dial targets: unknown names and addresses.
    with pytest.raises(tsnet2.NoSuchPeerError, match="no tailnet node named 'nobody'"):
        net.a.dial("tcp", "nobody:80", timeout=10)
    with pytest.raises(tsnet2.NoSuchPeerError):
        net.a.dial("tcp", "100.64.99.99:80", timeout=10)


def test_a_port_another_process_holds_is_eaddrinuse(net: TwoNodes) -> None:
    """Not just another tsnet2 listener: any socket on the node's address and port."""
    v4, _ = net.a.tailscale_ips()
    with net.lnet.lab.in_netns(net.da.node.netns):
        holder = socket.socket()
    try:
        holder.bind((str(v4), 9500))
        holder.listen()
        with pytest.raises(tsnet2.AddressInUseError, match="port 9500 is in use"):
            net.a.listen("tcp4", ":9500")
    finally:
        holder.close()


def test_listeners_per_client_are_capped(net: TwoNodes) -> None:
    """One client registering listeners without end: the 65th is a LimitError, and the
    daemon's descriptors grow by the 64 listeners' sockets only."""
    assert net.da.proc is not None
    pid = net.da.proc.pid
    with tsnet2.Server(socket_path=str(net.da.socket_path)) as hog:
        hog.up(timeout=30)
        before = len(os.listdir(f"/proc/{pid}/fd"))
        for _ in range(MAX_LISTENERS_PER_SESSION):
            hog._rpc("test", proto.Method.REGISTER_LISTENER,
                     proto.RegisterListenerParams("tcp4", ":0"), 10)
        with pytest.raises(tsnet2.LimitError, match="64 listeners"):
            hog._rpc("test", proto.Method.REGISTER_LISTENER,
                     proto.RegisterListenerParams("tcp4", ":0"), 10)
        grown = len(os.listdir(f"/proc/{pid}/fd")) - before
        assert grown <= MAX_LISTENERS_PER_SESSION + 4, grown
        # Other clients are served meanwhile.
        assert net.a.tailscale_ips()[0] is not None
    # Its listeners went with it.
    wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= before, 10, "the fds to go")


def test_wrong_auth_key_is_an_auth_key_error(net: TwoNodes) -> None:
    d = net.lnet.add_daemon("nokey", auth_key=None)
    with tsnet2.Server(socket_path=str(d.socket_path), auth_key="tskey-auth-wrong") as srv, \
            pytest.raises(tsnet2.AuthKeyError, match="auth key"):
        srv.start()


def test_offline_peer_is_named_as_such() -> None:
    with two_nodes(("dialer", "gone")) as n:
        n.lnet.stop_daemon("gone", signal.SIGKILL)  # registered, but no longer polling

        def offline() -> bool:
            peers = n.a.local_client().status().get("Peer") or {}
            return any(p.get("HostName") == "gone" and p.get("Online") is False
                       for p in peers.values())
        wait_for(offline, 30, "the control server to report 'gone' offline")
        with pytest.raises(tsnet2.PeerOfflineError, match="'gone' is offline"):
            n.a.dial("tcp", "gone:80", timeout=20)


@pytest.mark.parametrize("up", [True, False], ids=["tsnet2d --up", "held by the app"])
def test_lost_node_comes_back_and_the_app_registers_again(up: bool) -> None:
    """wireguard-go dies under a running node: the app's blocked accept says so
    (NodeDownError), the node comes back (the --up supervisor, or the app's reconnect),
    and the next accept() serves on the same port again."""
    extra = ("--up", "--hostname", "web") if up else ()
    with two_nodes(("web", "peer"), extra_a=extra) as n:
        ln = n.a.listen("tcp", ":8320")
        errors: list[BaseException] = []
        accepted = threading.Event()

        def blocked_accept() -> None:
            try:
                ln.accept(timeout=60).close()
                accepted.set()
            except BaseException as exc:
                errors.append(exc)
        t = threading.Thread(target=blocked_accept, daemon=True)
        t.start()
        os.kill(wireguard_go_pid(n.da.node.ifname), signal.SIGKILL)
        t.join(30)
        assert not t.is_alive() and not accepted.is_set()
        assert len(errors) == 1 and isinstance(errors[0], tsnet2.NodeDownError), errors
        assert "went away" in str(errors[0])
        wait_for(lambda: "node lost: wireguard-go" in n.da.log_text(), 10, "a log line")
        # The next accept reconnects, waits for the node and registers the listener again.
        t = echo_once(ln)
        try:
            wait_for(lambda: _echo_works(n.b, "web:8320"), 60, "the listener to serve again")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- web's daemon:\n{n.da.log_text()[-4000:]}") from None
        t.join(10)
        assert ln.addr == ":8320"
        v4, _ = n.a.tailscale_ips()
        assert v4 is not None
        ln.close()


def _echo_works(dialer: tsnet2.Server, target: str) -> bool:
    try:
        assert_echo(dialer, target, timeout=5)
    except (tsnet2.DialError, tsnet2.DeadlineExceededError):
        return False  # not back yet (or the peer's WireGuard session not yet renewed)
    return True


def test_last_holder_closing_stops_a_node_without_up() -> None:
    with two_nodes(("solo", "other")) as n:
        extra = tsnet2.Server(socket_path=str(n.da.socket_path))
        extra.up(timeout=30)
        extra.close()  # one hold left: the node stays
        assert n.a.tailscale_ips()[0] is not None
        n.a.close()  # the last hold: the node goes down (and can start again)
        lc = tsnet2.LocalClient(str(n.da.socket_path))
        wait_for(lambda: _backend_state(lc) != "Running", 15, "the node to stop")
        again = tsnet2.Server(socket_path=str(n.da.socket_path), hostname="solo")
        again.up(timeout=30)
        assert again.tailscale_ips()[0] is not None
        again.close()


def _backend_state(lc: tsnet2.LocalClient) -> Any:
    try:
        return lc.status().get("BackendState")
    except tsnet2.LocalAPIError:
        return "NoState"


def test_same_uid_without_sys_ptrace_cannot_copy_the_daemons_sockets(net: TwoNodes) -> None:
    """tsnet2d is non-dumpable, so a process of its own uid (root here) without
    CAP_SYS_PTRACE cannot copy its listening socket with pidfd_getfd; with CAP_SYS_PTRACE it
    can, which is why the injector refuses SYS_PTRACE to app containers."""
    assert net.da.proc is not None
    pid = net.da.proc.pid
    fd = listening_fd(pid, net.da.socket_path)
    code = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "pidfd = os.pidfd_open(int(sys.argv[1]))\n"
        "new = libc.syscall(438, pidfd, int(sys.argv[2]), 0)\n"
        "print('stolen' if new >= 0 else os.strerror(ctypes.get_errno()))\n"
    )
    argv = [sys.executable, "-c", code, str(pid), str(fd)]
    without = subprocess.run(["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace",
                              *argv], capture_output=True, text=True, timeout=30)
    assert without.stdout.strip() == "Operation not permitted", without
    with_cap = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert with_cap.stdout.strip() == "stolen", with_cap


def listening_fd(pid: int, path: Path) -> int:
    """The fd number of the process's listening Unix socket bound to `path`."""
    table = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]  # the process's netns
    inodes = {line.split()[6] for line in table if line.endswith(" " + str(path))}
    for name in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{name}")
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return int(name)
    raise AssertionError(f"no socket bound to {path} in process {pid}")


def test_async_face_is_told_and_registers_again_too() -> None:
    """The asyncio face behaves as the sync one when the node goes away."""
    import asyncio

    with two_nodes(("web", "peer"), extra_a=("--up", "--hostname", "web")) as n:
        async def main() -> None:
            async with tsnet2.AsyncServer(socket_path=str(n.da.socket_path)) as srv:
                await srv.up(timeout=30)
                ln = await srv.listen("tcp", ":8330")
                # Its slots were parked by listen(): the refusal reaches them either way.
                blocked = asyncio.create_task(ln.accept(timeout=60))
                os.kill(wireguard_go_pid(n.da.node.ifname), signal.SIGKILL)
                with pytest.raises(tsnet2.NodeDownError, match="went away"):
                    await asyncio.wait_for(blocked, 30)

                async def serve() -> None:
                    async with await ln.accept(timeout=60) as conn:
                        conn.writer.write(await conn.reader.read(100))
                        await conn.writer.drain()
                server = asyncio.create_task(serve())
                try:
                    await asyncio.to_thread(
                        wait_for, lambda: _echo_works(n.b, "web:8330"), 60, "the listener")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n{n.da.log_text()[-4000:]}") from None
                await asyncio.wait_for(server, 10)
                await ln.close()

        asyncio.run(main())
