"""Every ``open`` has exactly one ``close`` across a crash: a process (a bare TrafficLog, then
a real tsnet2d in the lab) is killed with SIGKILL mid-flow; the next start closes what it left
open, from the open-flow journal in the state directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tsnet2.traffic import TrafficLog
from tsnet2.traffic.log import RESTART_ERROR
from tsnet2.traffic.verify import verify

from .tailnet import read_log, two_nodes, wait_for

REPO = Path(__file__).resolve().parents[2]

CRASH = r'''
import os, signal, sys, time
from tsnet2.traffic import TrafficLog
log = TrafficLog(sys.argv[1], journal=sys.argv[2])
log.open()
done = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
done.data("app->peer", b"x" * 10)
done.close()
left = log.open_flow(direction="in", local="a:3", remote="c:4", whois=None)
left.data("peer->app", b"y" * 100)
time.sleep(1.1)  # the journal counts a flow's bytes at most once a second
left.data("app->peer", b"z" * 7)
quiet = log.open_flow(direction="out", local="a:5", remote="d:6", whois=None)
os.kill(os.getpid(), signal.SIGKILL)
'''


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_killed_process_s_flows_are_closed_by_the_next_open(tmp_path: Path) -> None:
    log_path, journal = tmp_path / "traffic.jsonl", tmp_path / "flows.journal"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(log_path), str(journal)],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60,
                          check=False, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    before = _records(log_path)
    opens = [r["conn_id"] for r in before if r["kind"] == "open"]
    assert len(opens) == 3 and sum(r["kind"] == "close" for r in before) == 1

    with TrafficLog(str(log_path), journal=str(journal)) as log:
        assert log.reconciled == 2
        after = _records(log_path)
    closes = [r for r in after if r["kind"] == "close"]
    # Every open has exactly one close now.
    assert sorted(str(r["conn_id"]) for r in closes) == sorted(str(c) for c in opens)
    by_id = {r["conn_id"]: r for r in closes[1:]}
    left, quiet = by_id[opens[1]], by_id[opens[2]]
    assert str(left["error"]).startswith(f"{RESTART_ERROR}: tsnet2d (pid ")
    assert "stopped without closing this flow" in str(left["error"])
    # The counts are what was journaled: the 100 bytes of the first second (the 7 after the
    # last count line may be missing), never more than the data records hold.
    assert (left["bytes_in"], left["bytes_out"]) in ((100, 0), (100, 7))
    assert (quiet["bytes_in"], quiet["bytes_out"]) == (0, 0)
    assert isinstance(left["duration_ms"], int) and left["duration_ms"] >= 1000
    # A clean shutdown leaves nothing to reconcile.
    with TrafficLog(str(log_path), journal=str(journal)) as log:
        flow = log.open_flow(direction="out", local="a:7", remote="e:8", whois=None)
        flow.data("app->peer", b"q")
    with TrafficLog(str(log_path), journal=str(journal)) as log:
        assert log.reconciled == 0


@pytest.mark.netns
def test_a_killed_daemon_s_flows_are_closed_when_it_restarts() -> None:
    with two_nodes(("ca", "cb")) as net, net.a.listen("tcp", ":7100") as ln:
        conns = []
        try:
            for i in range(3):  # three flows of cb, open when it dies
                c = net.b.dial("tcp", "ca:7100", timeout=10)
                conns.append(c)
                conns.append(ln.accept(timeout=10))
                c.sendall(b"m%d" % i)
                assert conns[-1].recv(2) == b"m%d" % i
            records = read_log(net.db.traffic_log)
            opens = {r["conn_id"] for r in records if r["kind"] == "open"}
            assert len(opens) == 3 and not [r for r in records if r["kind"] == "close"]
            net.lnet.stop_daemon("cb", signal.SIGKILL)
            net.lnet.start_daemon("cb")
            closes = wait_for(lambda: [r for r in read_log(net.db.traffic_log)
                                       if r["kind"] == "close"] or None, 30, "close records")
            assert sorted(r["conn_id"] for r in closes) == sorted(opens)  # one each
            for r in closes:
                assert str(r["error"]).startswith(f"{RESTART_ERROR}: tsnet2d (pid "), r
                assert r["bytes_out"] in (0, 2) and r["bytes_in"] == 0, r
            assert "left open by a daemon that stopped without closing it" in net.db.log_text()
            # The log is whole again.
            rep = verify(net.db.traffic_log.read_text().splitlines())
            # a live log: open at its end (no close checkpoint yet), the rest whole
            assert rep.ok(allow_open=True) and rep.flows == 3 and rep.restart_closes == 3, rep
        finally:
            for c in conns:
                c.close()
