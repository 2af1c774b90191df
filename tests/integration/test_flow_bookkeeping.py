"""A spliced flow holds no task or coroutine frame for its life; its end is still accounted.

`Datapath._splice` returns as soon as both sockets are attached (the channel handler, and
its task, end there); the Splice's close callback removes the flow from `splices` and
counts it in the metrics exactly once. Real sockets (TCP over loopback for the peer, a
Unix socket pair for the app), a real traffic log and real metrics.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.tailnet import recv_exactly, relay_sockets
from tsnet2.daemon.backend import Backend, DeviceConfig
from tsnet2.daemon.datapath import Datapath
from tsnet2.daemon.metrics import Metrics
from tsnet2.traffic import TrafficLog

IO_TIMEOUT = 5.0


def _value(m: Metrics, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_splice_returns_at_once_and_its_end_is_accounted(tmp_path: Path) -> None:
    log_path = tmp_path / "traffic.jsonl"

    async def run() -> None:
        metrics = Metrics()
        with TrafficLog(str(log_path)) as log:
            dp = Datapath(Backend(tmp_path / "state", DeviceConfig()), log,
                          asyncio.ensure_future, metrics)
            remote, daemon_peer, daemon_app, app = relay_sockets(IO_TIMEOUT)
            try:
                flow = log.open_flow(direction="out", local="100.64.0.2:40000",
                                     remote="100.64.0.1:8080", whois=None)
                owned = await asyncio.wait_for(
                    dp._splice("out", flow, daemon_app, daemon_peer, b"early"), IO_TIMEOUT)
                assert owned is True  # the splice owns both sockets now
                # Nothing runs (or waits) per flow: only this test's own task exists.
                assert asyncio.all_tasks() == {asyncio.current_task()}
                assert len(dp.splices) == 1
                assert _value(metrics, "tsnet2_flows_active", direction="out") == 1

                assert await asyncio.to_thread(recv_exactly, remote, 5) == b"early"
                await asyncio.to_thread(app.sendall, b"ping")
                assert await asyncio.to_thread(recv_exactly, remote, 4) == b"ping"
                await asyncio.to_thread(remote.sendall, b"pong!")
                assert await asyncio.to_thread(recv_exactly, app, 5) == b"pong!"
                (sp,) = dp.splices
                app.shutdown(socket.SHUT_WR)
                remote.shutdown(socket.SHUT_WR)
                await asyncio.wait_for(sp.done, IO_TIMEOUT)
            finally:
                remote.close()
                app.close()
            assert not dp.splices
            assert _value(metrics, "tsnet2_flows_active", direction="out") == 0
            assert _value(metrics, "tsnet2_flows_closed_total", direction="out",
                          result="ok") == 1
            assert _value(metrics, "tsnet2_flow_duration_seconds_count", direction="out") == 1
            assert _value(metrics, "tsnet2_flow_bytes_total", direction="out",
                          stream="app->peer") == 9
            assert _value(metrics, "tsnet2_flow_bytes_total", direction="out",
                          stream="peer->app") == 5
        assert daemon_app.fileno() == -1 and daemon_peer.fileno() == -1  # the splice closed them
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        closes = [r for r in records if r["kind"] == "close"]
        assert len(closes) == 1 and closes[0]["bytes_out"] == 9 and closes[0]["bytes_in"] == 5

    asyncio.run(run())


def test_bytes_hook_is_bound_once_per_direction(tmp_path: Path) -> None:
    metrics = Metrics()
    add = metrics.flow_bytes_counter("in")
    add("app->peer", 7)
    add("peer->app", 3)
    add("app->peer", 1)
    assert _value(metrics, "tsnet2_flow_bytes_total", direction="in", stream="app->peer") == 8
    assert _value(metrics, "tsnet2_flow_bytes_total", direction="in", stream="peer->app") == 3
    assert _value(metrics, "tsnet2_flow_bytes_total", direction="out", stream="app->peer") == 0
