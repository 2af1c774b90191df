"""Faults across 1,000 flows: an app killed mid-flow, a daemon restarted, a peer node removed,
the control server restarted. Afterwards every `open` has exactly one `close`, the daemons
that kept running hold no more descriptors and slots than before, the listeners are back, and
established peers kept talking while control was down.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import tsnet2
from tsnet2.lab.tailnet import DaemonProc

from .tailnet import read_log, recv_exactly, running_tailnet, wait_for

pytestmark = pytest.mark.netns

ECHO_APP = textwrap.dedent("""
    import sys, threading, tsnet2
    srv = tsnet2.Server(socket_path=sys.argv[1], hostname=sys.argv[2])
    srv.up(timeout=30)
    ln = srv.listen("tcp", ":" + sys.argv[3])
    print("listening", flush=True)
    def serve(c):
        with c:
            while data := c.recv(65536):
                c.sendall(data)
    while True:
        conn = ln.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
""")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def balanced(log: Path) -> tuple[int, list[str]]:
    """(opens, problems): conn ids with not exactly one close."""
    recs = read_log(log)
    opens = [r["conn_id"] for r in recs if r["kind"] == "open"]
    closes = [r["conn_id"] for r in recs if r["kind"] == "close"]
    problems = [c for c in set(opens) if closes.count(c) != 1]
    problems += [c for c in set(closes) if c not in opens]
    assert len(opens) == len(set(opens))
    return len(opens), problems


class EchoApp:
    """An app process with a listener, killable."""

    def __init__(self, d: DaemonProc, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_APP, str(d.socket_path), d.name, str(port)],
            stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"listening"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def answer_once(conn: tsnet2.TailnetSocket) -> None:
    """Read one byte, answer one, then hold the flow until the peer (or its node) ends it."""
    with conn:
        try:
            recv_exactly(conn, 1)
            conn.sendall(b"y")
            conn.recv(1)
        except OSError:
            pass


def run_flows(client: tsnet2.Server, target: str, count: int, size: int = 2048,
              threads: int = 8) -> tuple[int, list[BaseException]]:
    """`count` echo flows from `threads` threads; returns (ok, errors)."""
    ok = 0
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        nonlocal ok
        for _i in range(n):
            payload = os.urandom(size)
            try:
                with client.dial("tcp", target, timeout=15) as conn:
                    conn.sendall(payload)
                    assert recv_exactly(conn, size) == payload
                with lock:
                    ok += 1
            except Exception as exc:
                with lock:
                    errors.append(exc)
    shares = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    ts = [threading.Thread(target=worker, args=(n,)) for n in shares]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return ok, errors


def test_faults_across_1000_flows() -> None:
    with running_tailnet(ephemeral_timeout=3.0) as net:
        key = net.authkey(reusable=True)
        da = net.add_daemon("fa", auth_key=key)   # serves; never restarted
        db = net.add_daemon("fb", auth_key=key)   # dials; restarted once
        dc = net.add_daemon("fc", auth_key=key)   # a peer that is removed
        b = tsnet2.Server(socket_path=str(db.socket_path), hostname="fb")
        c = tsnet2.Server(socket_path=str(dc.socket_path), hostname="fc", ephemeral=True)
        b.up(timeout=30)
        c.up(timeout=30)
        assert da.proc is not None
        app = EchoApp(da, 5000)
        total = 0
        try:
            ok, errors = run_flows(b, "fa:5000", 100)
            assert (ok, errors) == (100, [])
            total += ok

            # 0. A's daemon restarts under the app: its listener comes back once the daemon
            #    is ready, re-registered by the library on its own.
            assert net.stop_daemon("fa") == 0
            net.start_daemon("fa")

            def a_listening() -> bool:
                try:
                    with b.dial("tcp", "fa:5000", timeout=1) as conn:
                        conn.sendall(b"?")
                        return recv_exactly(conn, 1) == b"?"
                except tsnet2.Error:
                    return False
            wait_for(a_listening, 10, "A's listener back after the daemon restart")
            assert da.proc is not None
            ok, errors = run_flows(b, "fa:5000", 100)
            assert (ok, errors) == (100, [])
            total += ok
            time.sleep(0.5)
            a_fds, a_pid = fd_count(da.proc.pid), da.proc.pid

            # 1. The app is killed mid-flow: open flows end (with errors), the daemon logs
            #    their close, and a new app can listen on the same port at once.
            hold = [b.dial("tcp", "fa:5000", timeout=15) for _ in range(20)]
            for h in hold:
                h.sendall(b"x")
                assert recv_exactly(h, 1) == b"x"
            app.kill()
            for h in hold:
                h.settimeout(10)
                with contextlib.suppress(ConnectionResetError):
                    assert h.recv(10) == b""
                h.close()
            total += len(hold)
            app = EchoApp(da, 5000)
            ok, errors = run_flows(b, "fa:5000", 200)
            assert (ok, errors) == (200, [])
            total += ok

            # 2. B's daemon restarts under a live Server: open flows are cut (and closed
            #    in B's log), and the same Server object dials again by itself.
            hold = [b.dial("tcp", "fa:5000", timeout=15) for _ in range(10)]
            assert net.stop_daemon("fb") == 0
            for h in hold:
                h.close()
            total += len(hold)
            net.start_daemon("fb")

            def b_dials() -> bool:
                try:
                    with b.dial("tcp", "fa:5000", timeout=5) as conn:
                        conn.sendall(b"!")
                        return recv_exactly(conn, 1) == b"!"
                except tsnet2.Error:
                    return False
            # The first call reconnects and brings B's node up again; on a loaded machine
            # that can take a few seconds. After that, nothing may fail.
            wait_for(b_dials, 30, "B's Server to dial again after its daemon restarted")
            ok, errors = run_flows(b, "fa:5000", 200)
            assert (ok, errors) == (200, [])
            total += ok

            # 3. Peer node removed mid-flow: flows to it end; it leaves every netmap.
            with c.listen("tcp", ":5001") as ln:
                def serve_c() -> None:
                    for _ in range(10):
                        try:
                            conn = ln.accept(timeout=20)
                        except tsnet2.Error:
                            return
                        threading.Thread(target=answer_once, args=(conn,), daemon=True).start()
                t = threading.Thread(target=serve_c, daemon=True)
                t.start()
                to_c = [b.dial("tcp", "fc:5001", timeout=15) for _ in range(10)]
                for h in to_c:
                    h.sendall(b"c")
                    assert recv_exactly(h, 1) == b"y"
                net.remove_daemon("fc")
                for h in to_c:
                    h.close()
                total += len(to_c)
            with contextlib.suppress(tsnet2.Error):
                c.close()  # its daemon is gone: best effort

            def c_gone() -> bool:
                return not any(p.get("HostName") == "fc" for p in
                               b.local_client().status()["Peer"].values())
            wait_for(c_gone, 15, "fc gone from B's netmap")

            # 4. Control server restarted: established peers keep talking meanwhile.
            net.stop_control()
            ok, errors = run_flows(b, "fa:5000", 200)
            assert (ok, errors) == (200, [])
            total += ok
            net.start_control()
            ok, errors = run_flows(b, "fa:5000", 200)
            assert (ok, errors) == (200, [])
            total += ok
            assert total >= 1000
        finally:
            app.kill()
            b.close()

        # Every flow in every surviving log is accounted for exactly once.
        for d in (da, db):
            wait_for(lambda d=d: not balanced(d.traffic_log)[1], 15,
                     f"every open in {d.name}'s log to have one close")
        opens_a, _ = balanced(da.traffic_log)
        assert opens_a >= total - 10
        # A's daemon never restarted: the app's exit released its slots and flows, so its
        # descriptor count is back where it was.
        assert da.proc is not None and da.proc.pid == a_pid
        wait_for(lambda: fd_count(a_pid) <= a_fds, 15, "A's descriptors back to the baseline")
