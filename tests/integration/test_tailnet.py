"""A tailnet over time: nodes joining and leaving, daemons and the control server restarting.

Real processes throughout: `tsnet2 control serve`, tsnet2d per node namespace, wireguard-go.
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

import tsnet2
from tsnet2.lab.tailnet import DaemonProc, LocalTailnet
from tsnet2.node.device import WIREGUARD_GO_ENV, find_wireguard_go

from .tailnet import recv_exactly, running_tailnet, wait_for

pytestmark = pytest.mark.netns


def _server(d: DaemonProc, *, ephemeral: bool = False) -> tsnet2.Server:
    return tsnet2.Server(socket_path=str(d.socket_path), hostname=d.name, ephemeral=ephemeral)


def _echo(listener: Any, count: int) -> threading.Thread:
    def run() -> None:
        for _ in range(count):
            with listener.accept(timeout=30) as conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _peer_names(srv: tsnet2.Server) -> set[str]:
    status = srv.local_client().status()
    return {p["HostName"] for p in status["Peer"].values()}


def _roundtrip(client: tsnet2.Server, target: str, payload: bytes) -> None:
    with client.dial("tcp", target, timeout=15) as conn:
        conn.sendall(payload)
        assert recv_exactly(conn, len(payload)) == payload


def test_three_nodes_then_a_fourth_joins_and_an_ephemeral_leaves() -> None:
    with running_tailnet() as net:
        key = net.authkey(reusable=True)
        daemons = [net.add_daemon(f"n{i}", auth_key=key) for i in (1, 2, 3)]
        servers = [_server(d) for d in daemons]
        try:
            for s in servers:
                s.up(timeout=30)
            # Each pair can talk, both ways.
            listeners = [s.listen("tcp", ":7000") for s in servers]
            threads = [_echo(ln, count=2) for ln in listeners]
            for i, client in enumerate(servers):
                for j, d in enumerate(daemons):
                    if i != j:
                        _roundtrip(client, f"{d.name}:7000", f"{i}->{j}".encode())
            for t in threads:
                t.join(30)
            for ln in listeners:
                ln.close()

            # A fourth, ephemeral node joins: the others see it, unrestarted (pushed by their
            # netmap long-polls; 10 s only catches a push that never comes).
            d4 = net.add_daemon("n4", auth_key=key)
            s4 = _server(d4, ephemeral=True)
            st4 = s4.up(timeout=30)
            for s in servers:
                wait_for(lambda s=s: "n4" in _peer_names(s), 10, "n4 in a peer's netmap")
            with s4.listen("tcp", ":7001") as ln:
                t = _echo(ln, count=1)
                _roundtrip(servers[0], "n4:7001", b"hello n4")
                t.join(30)
            old_v4 = st4.tailscale_ips[0]

            # It leaves: gone from every netmap, and its address goes to the next node.
            s4.close()
            for s in servers:
                wait_for(lambda s=s: "n4" not in _peer_names(s), 2.0, "n4 gone from a netmap")
            d5 = net.add_daemon("n5", auth_key=key)
            with _server(d5, ephemeral=True) as s5:
                assert s5.up(timeout=30).tailscale_ips[0] == old_v4
        finally:
            for s in servers:
                if not s.closed:
                    s.close()


def test_tsnet2d_says_which_wireguard_go_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--wireguard-go picks the binary over $TSNET2_WIREGUARD_GO, and the daemon logs it."""
    real = find_wireguard_go()
    ran = tmp_path / "ran"
    wrapper = tmp_path / "wg-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {ran}\nexec {real.path} "$@"\n')
    wrapper.chmod(0o755)
    with running_tailnet() as net:
        key = net.authkey()
        plain = net.add_daemon("plain", auth_key=key)
        with _server(plain) as srv:
            srv.up(timeout=30)
        assert f"device {plain.node.ifname} up: wireguard-go {real.path}\n" in plain.log_text()
        monkeypatch.setenv(WIREGUARD_GO_ENV, str(tmp_path / "not-there"))
        named = net.add_daemon("named", auth_key=net.authkey(),
                               extra_args=("--wireguard-go", str(wrapper)))
        with _server(named) as srv:
            srv.up(timeout=30)
        assert f"device {named.node.ifname} up: wireguard-go {wrapper}\n" in named.log_text()
        assert ran.read_text() == f"-f {named.node.ifname}\n"


def _device_gone(net: LocalTailnet, d: DaemonProc) -> bool:
    out = net.lab.run(d.node.netns, ["ip", "link", "show", d.node.ifname], check=False)
    return out.returncode != 0


def _wireguard_go_running(ifname: str) -> bool:
    out = subprocess.run(["pgrep", "-f", f"wireguard-go -f {ifname}$"], capture_output=True)
    return out.returncode == 0


def test_daemon_restart_keeps_identity_and_addresses() -> None:
    with running_tailnet() as net:
        key = net.authkey(reusable=False)
        d = net.add_daemon("keeper", auth_key=key)
        with _server(d) as srv:
            first = srv.up(timeout=30)
            self_before = srv.local_client().status()["Self"]
        # Graceful stop: device and wireguard-go are gone.
        assert net.stop_daemon("keeper") == 0
        assert _device_gone(net, d)
        assert not _wireguard_go_running(d.node.ifname)
        assert (d.state_dir / "node.key").stat().st_mode & 0o777 == 0o600
        # Same state dir, and the single-use key is spent: the node credential carries it.
        net.start_daemon("keeper")
        with _server(d) as srv:
            again = srv.up(timeout=30)
            self_after = srv.local_client().status()["Self"]
        assert again.tailscale_ips == first.tailscale_ips
        assert self_after["ID"] == self_before["ID"]
        assert self_after["PublicKey"] == self_before["PublicKey"]
        assert self_after["DNSName"] == "keeper.tail-scale.ts.net."
        # A crash (SIGKILL) leaves no stray wireguard-go either once the device is gone.
        net.stop_daemon("keeper")


def test_control_restart_keeps_nodes_and_peers_keep_talking() -> None:
    with running_tailnet() as net:
        key = net.authkey(reusable=True)
        da, db = net.add_daemon("a", auth_key=key), net.add_daemon("b", auth_key=key)
        with _server(da) as a, _server(db) as b:
            ips_a = a.up(timeout=30).tailscale_ips
            b.up(timeout=30)
            with a.listen("tcp", ":7100") as ln:
                t = _echo(ln, count=2)
                net.stop_control()
                # Established peers keep talking while control is down.
                _roundtrip(b, f"{ips_a[0]}:7100", b"control is down")
                net.start_control()
                _roundtrip(b, "a:7100", b"control is back")
                t.join(30)
            # The restarted control server still knows both nodes with the same addresses,
            # and a node joining now is seen by the old ones.
            assert a.up(timeout=30).tailscale_ips == ips_a
            dc = net.add_daemon("c", auth_key=key)
            with _server(dc) as c:
                c.up(timeout=30)
                wait_for(lambda: "c" in _peer_names(a), 10.0, "c in a's netmap")
                assert "a" in _peer_names(c) and "b" in _peer_names(c)


def test_bad_and_reused_auth_keys_are_refused() -> None:
    with running_tailnet() as net:
        single = net.authkey(reusable=False)
        d1 = net.add_daemon("first", auth_key=single)
        with _server(d1) as s1:
            s1.up(timeout=30)
        d2 = net.add_daemon("second", auth_key=single)
        with _server(d2) as s2, pytest.raises(tsnet2.DaemonError, match="already used"):
            s2.start()
        d3 = net.add_daemon("third", auth_key="tskey-auth-wrong")
        with _server(d3) as s3, pytest.raises(tsnet2.DaemonError, match="invalid auth key"):
            s3.start()
        # The refusals left the daemons serving: a good key passed by the app works.
        good = net.authkey(reusable=True)
        with tsnet2.Server(socket_path=str(d3.socket_path), hostname="third",
                           auth_key=good) as s3:
            ip = s3.up(timeout=30).tailscale_ips[0]
            assert ip in ipaddress.ip_network("100.64.0.0/10")
        assert "auth key" in d3.log_text() or "start" in d3.log_text()
        assert "tskey-auth-wrong" not in d3.log_text()
