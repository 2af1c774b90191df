"""The kind suite's checks and its driver's clean-up, without a cluster.

The checks run on traffic-log and metrics text shaped as docs/traffic-log.md and
docs/metrics.md describe. The driver tests run :class:`KindCluster` with a ``kind`` of the
test's own (a script that records its arguments): kind cannot run on a machine without a
Docker engine, and what is checked is the driver's promise to delete whatever it created —
after a failed create, an error in the body, and SIGTERM.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import checks
from tests.e2e.kind.cluster import (
    ClusterError,
    KindCluster,
    Tools,
    docker_engine_problem,
    find_kind,
    kind_delete_argv,
    kind_load_argv,
    run_uninterrupted,
    sigterm_as_interrupt,
)

CLIENT = "echo-client-5f7-x2.tsnet2.internal."


def _flow(conn_id: int, ping: bytes, pong: bytes, *, whois: str = CLIENT,
          close: bool = True) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = [
        {"kind": "open", "dir": "in", "conn_id": conn_id, "remote": "100.64.0.2:40000",
         "whois": {"node": whois}},
        {"kind": "data", "dir": "peer->app", "conn_id": conn_id, "len": len(ping),
         "payload_b64": base64.b64encode(ping).decode()},
        {"kind": "data", "dir": "app->peer", "conn_id": conn_id, "len": len(pong),
         "payload_b64": base64.b64encode(pong).decode()},
    ]
    if close:
        records.append({"kind": "close", "conn_id": conn_id, "bytes_in": len(ping),
                        "bytes_out": len(pong)})
    return records


def test_result_of_takes_the_last_result_line() -> None:
    log = 'LISTENING\nRESULT {"tries": 1}\nnoise\nRESULT {"tries": 2}\n'
    assert checks.result_of(log) == {"tries": 2}
    assert checks.result_of("LISTENING\n") is None
    with pytest.raises(AssertionError, match="not a JSON object"):
        checks.result_of("RESULT [1]\n")


def test_traffic_records_skip_only_a_torn_last_line() -> None:
    text = "\n".join(json.dumps(r) for r in _flow(1, b"a", b"b")) + "\n"
    assert len(checks.traffic_records(text)) == 4
    assert len(checks.traffic_records(text + '{"kind": "op')) == 4
    with pytest.raises(AssertionError, match="line 2 is not JSON"):
        checks.traffic_records('{"kind": "open"}\n{torn\n{"kind": "close"}\n')


def _cri(stream: str, tag: str, content: str) -> str:
    return f"2026-05-19T16:06:10.123456789Z {stream} {tag} {content}\n"


def test_cri_stdout_joins_partial_lines_and_drops_stderr() -> None:
    """The kubelet's container log: a long record is split into P pieces ending with an F
    piece; stderr lines (the daemon's messages) may come between; a torn CRI line at the
    end and a record whose F piece has not come yet are left out of the records."""
    rec = json.dumps({"kind": "open", "conn_id": "a", "log_seq": 1})
    text = (_cri("stdout", "P", rec[:10]) + _cri("stderr", "F", "tsnet2d: starting")
            + _cri("stdout", "P", rec[10:20]) + _cri("stdout", "F", rec[20:])
            + _cri("stdout", "F", "") + _cri("stdout", "F", '{"kind": "close"}'))
    assert checks.cri_stdout(text) == rec + "\n\n" + '{"kind": "close"}\n'
    assert checks.traffic_records(checks.cri_stdout(text))[0] == json.loads(rec)
    torn = text + "2026-05-19T16:06:10Z stdout F {\"ki"
    assert checks.cri_stdout(torn) == checks.cri_stdout(text)
    unfinished = text + _cri("stdout", "P", '{"kind": "da')
    assert len(checks.traffic_records(checks.cri_stdout(unfinished))) == 2
    with pytest.raises(AssertionError, match="line 1 is not CRI"):
        checks.cri_stdout('{"kind": "open"}\n')


def test_chain_helpers() -> None:
    records: list[dict[str, Any]] = [
        {"kind": "checkpoint", "reason": "start", "log_seq": 1},
        {"kind": "open", "conn_id": "a", "log_seq": 2},
        {"kind": "open", "conn_id": "b", "log_seq": 3},
        {"kind": "gap", "dropped": 1},
        {"kind": "close", "conn_id": "a", "log_seq": 4},
    ]
    assert [r["log_seq"] for r in checks.chained(records)] == [1, 2, 3, 4]
    assert checks.unclosed(records) == ["b"]
    assert checks.same_records_problems(records, records[1:3]) == []
    other = [dict(records[1], conn_id="x"), {"kind": "open", "log_seq": 9}]
    (problem,) = checks.same_records_problems(records, other)
    assert problem.startswith("log_seq 2:")


def test_served_flow_is_the_last_exchange_of_that_client() -> None:
    cut = _flow(1, b"ping\n", b"", close=False)
    cut.append({"kind": "close", "conn_id": 1, "bytes_in": 5, "bytes_out": 0})
    other = _flow(2, b"x", b"y", whois="someone-else.tsnet2.internal.")
    records = cut + other + _flow(3, b"ping\n", b"pong: ping\n")
    flow = checks.served_flow(records, CLIENT)
    assert (flow.conn_id, flow.remote_ip, flow.peer_to_app, flow.app_to_peer, flow.closed) == (
        3, "100.64.0.2", b"ping\n", b"pong: ping\n", True)
    assert not checks.served_flow(_flow(4, b"a", b"b", close=False), CLIENT).closed
    with pytest.raises(AssertionError, match="no inbound open from"):
        checks.served_flow(other, CLIENT)
    wrong = _flow(5, b"abc", b"de")
    wrong[-1]["bytes_out"] = 7
    with pytest.raises(AssertionError, match="hold 3 in, 2 out"):
        checks.served_flow(wrong, CLIENT)
    assert checks.host_of("[fd7a:115c:a1e0::2]:41641") == "fd7a:115c:a1e0::2"


METRICS = """# HELP tsnet2_flows_opened_total Flows opened.
# TYPE tsnet2_flows_opened_total counter
tsnet2_flows_opened_total{direction="in"} 2.0
tsnet2_flows_closed_total{direction="in",result="ok"} 1.0
tsnet2_flows_closed_total{direction="in",result="error"} 1.0
tsnet2_flow_bytes_total{direction="in",stream="peer->app"} 10.0
tsnet2_flow_bytes_total{direction="in",stream="app->peer"} 11.0
tsnet2_node_up 1.0
"""


def test_metrics_agree_with_the_log_or_say_where_not() -> None:
    records = _flow(1, b"ping\n", b"", close=True) + _flow(2, b"ping\n", b"pong: ping\n")
    samples = checks.metric_samples(METRICS)
    assert samples["tsnet2_node_up"] == 1.0
    assert checks.metrics_problems(samples, records) == []
    assert checks.metrics_problems(samples, records[:-1]) == [
        'tsnet2_flows_closed_total{direction="in"} sum = 2.0, the log has 1 inbound closes']
    more = records + _flow(3, b"z", b"")
    assert checks.metrics_problems(samples, more) == [
        'tsnet2_flows_opened_total{direction="in"} = 2.0, expected 3.0',
        'tsnet2_flow_bytes_total{direction="in",stream="peer->app"} = 10.0, expected 11.0',
        'tsnet2_flows_closed_total{direction="in"} sum = 2.0, the log has 3 inbound closes']


# ---- the driver's clean-up -------------------------------------------------------------------

def _tools(tmp_path: Path, create: str) -> tuple[Tools, Path]:
    """Tools whose kind records each call in ``calls`` and runs ``create`` for create."""
    calls = tmp_path / "calls"
    kind = tmp_path / "kind"
    kind.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                    f'if [ "$1" = create ]; then {create}; fi\nexit 0\n')
    kind.chmod(kind.stat().st_mode | stat.S_IXUSR)
    return Tools(docker=Path("/nonexistent/docker"), kind=kind, helm=Path("/nonexistent")), calls


def _calls(calls: Path) -> list[str]:
    return [" ".join(line.split()[:2]) + " " + line.split()[3]
            for line in calls.read_text().splitlines()]


def test_a_failed_create_is_deleted(tmp_path: Path) -> None:
    tools, calls = _tools(tmp_path, "echo 'ERROR: failed to create cluster' >&2; exit 1")
    with pytest.raises(Exception, match="failed to create cluster"), KindCluster(
            tools, tmp_path, name="tsnet2-e2e-t1"):
        pass
    assert _calls(calls) == ["create cluster tsnet2-e2e-t1", "delete cluster tsnet2-e2e-t1"]


def test_an_error_inside_deletes_the_cluster(tmp_path: Path) -> None:
    tools, calls = _tools(tmp_path, "true")
    with pytest.raises(RuntimeError, match="boom"), KindCluster(
            tools, tmp_path, name="tsnet2-e2e-t2") as kc:
        assert kc.kubeconfig == tmp_path / "kubeconfig"
        raise RuntimeError("boom")
    assert _calls(calls) == ["create cluster tsnet2-e2e-t2", "delete cluster tsnet2-e2e-t2"]


def test_sigterm_during_create_deletes_the_cluster(tmp_path: Path) -> None:
    """SIGTERM (what scripts/e2e-kind sends on Ctrl-C) while kind is still creating."""
    tools, calls = _tools(tmp_path, "exec sleep 30")
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt), KindCluster(tools, tmp_path,
                                                           name="tsnet2-e2e-t3"):
            pass
    finally:
        timer.cancel()
    assert _calls(calls) == ["create cluster tsnet2-e2e-t3", "delete cluster tsnet2-e2e-t3"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_as_interrupt_is_scoped() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == before


def test_run_uninterrupted_returns_the_status_or_kills() -> None:
    assert run_uninterrupted(["sh", "-c", "exit 3"], timeout=10) == 3
    assert run_uninterrupted(["sleep", "30"], timeout=0.5) == -1


def test_the_real_kind_takes_the_drivers_command_lines(tmp_path: Path) -> None:
    """With kind installed and no Docker engine (this machine once scripts/e2e-kind has
    installed kind), kind parses every command line and fails on the engine only."""
    kind = find_kind()
    if kind is None:
        pytest.skip("kind is not installed (scripts/e2e-kind installs it)")
    if docker_engine_problem(shutil.which("docker")) is None:
        pytest.skip("a Docker engine is running here: no cluster is created by a unit test")
    tools = Tools(docker=Path("docker"), kind=kind, helm=Path("/nonexistent"))
    with pytest.raises(ClusterError, match="failed to get docker info"), KindCluster(
            tools, tmp_path, name="tsnet2-e2e-probe", node_image="kindest/node:v1.33.1"):
        pass
    for argv in (kind_load_argv(kind, "tsnet2-e2e-probe", "tsnet2:kind-e2e"),
                 kind_delete_argv(kind, "tsnet2-e2e-probe", tmp_path / "kubeconfig")):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode != 0 and "unknown flag" not in proc.stderr, proc.stderr
        # ... it got as far as asking the engine (for the image, for the nodes)
        assert "docker" in proc.stderr or "not present locally" in proc.stderr, proc.stderr
    assert not (tmp_path / "kubeconfig").exists()


def test_flows_by_direction() -> None:
    records = [
        {"kind": "open", "dir": "in", "conn_id": "a", "remote": "100.64.0.2:1"},
        {"kind": "open", "dir": "out", "conn_id": "b", "remote": "100.64.0.3:80"},
        {"kind": "data", "dir": "app->peer", "conn_id": "b", "len": 3,
         "payload_b64": base64.b64encode(b"GET").decode()},
        {"kind": "data", "dir": "peer->app", "conn_id": "b", "len": 2,
         "payload_b64": base64.b64encode(b"ok").decode()},
        {"kind": "data", "dir": "peer->app", "conn_id": "a", "len": 1},  # metadata mode
        {"kind": "close", "conn_id": "b", "bytes_in": 2, "bytes_out": 3},
    ]
    (out,) = checks.flows(records, "out")
    assert (out.open["conn_id"], out.app_to_peer, out.peer_to_app, out.closed) == (
        "b", b"GET", b"ok", True)
    (inbound,) = checks.flows(records, "in")
    assert (inbound.peer_to_app, inbound.closed) == (b"", False)
    assert checks.flows(records, "sideways") == []


def test_udp_flows_from_what_the_traffic_log_writes(tmp_path: Path) -> None:
    """The UDP checks read the records tsnet2.traffic writes for a UDP flow: one data
    record per datagram each way, and a close with proto udp and the counts."""
    from tsnet2.traffic.log import TrafficLog

    path = tmp_path / "traffic.jsonl"
    with TrafficLog(str(path)) as log:
        flow = log.open_flow(direction="in", local="100.64.0.1:5353",
                             remote="100.64.0.2:40000", whois=None, proto="udp")
        for q in (b"q0", b"q1", b"q2"):
            flow.datagram("peer->app", q)
            flow.datagram("app->peer", b"echo " + q)
        tcp = log.open_flow(direction="in", local="100.64.0.1:443",
                            remote="100.64.0.2:40001", whois=None)
        tcp.data("peer->app", b"tcp")
        open_udp = log.open_flow(direction="in", local="100.64.0.1:5353",
                                 remote="100.64.0.3:40000", whois=None, proto="udp")
        open_udp.datagram("peer->app", b"later")
        flow.close()
        tcp.close()
    records = checks.traffic_records(path.read_text(encoding="utf-8"))
    closed, still = checks.udp_flows(records, "in")  # the TCP flow is not one
    assert closed.peer_to_app == [b"q0", b"q1", b"q2"]
    assert closed.app_to_peer == [b"echo q0", b"echo q1", b"echo q2"]
    assert closed.close is not None and closed.close["datagrams_in"] == 3
    assert checks.udp_close_problems(closed) == []
    # The log was closed with the second flow open: the daemon's shutdown close.
    assert still.peer_to_app == [b"later"]
    assert checks.udp_flows(records, "out") == []
    lying = checks.UdpFlow(closed.open, closed.peer_to_app, closed.app_to_peer[:2],
                           closed.close)
    assert checks.udp_close_problems(lying) == [
        "close datagrams_out = 3, the data records say 2",
        "close bytes_out = 21, the data records say 14"]
    assert checks.udp_close_problems(checks.UdpFlow(closed.open, [], [], None)) == [
        f"flow {closed.open['conn_id']} has no close"]
