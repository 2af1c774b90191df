"""The daemon's own health: a critical task that ends stops it; a stuck loop ends it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from tsnet2.daemon.server import Daemon, DaemonConfig, DaemonFatalError
from tsnet2.daemon.watchdog import Watchdog


def test_dead_accept_loop_stops_the_daemon_with_the_reason(tmp_path: Path) -> None:
    """A daemon whose socket accept loop is gone must not stay up deaf: run() ends with a
    DaemonFatalError naming the task (tsnet2d exits 1, and its supervisor starts a new one)."""
    async def main() -> None:
        d = Daemon(DaemonConfig(socket_path=tmp_path / "run" / "s.sock",
                                state_dir=tmp_path / "state",
                                traffic_log=str(tmp_path / "traffic.jsonl"),
                                watchdog_timeout=0))
        ready = asyncio.Event()
        run = asyncio.create_task(d.run(ready.set))
        await ready.wait()
        await asyncio.sleep(0)  # let the accept loop start
        assert d._healthz() == (True, "ok")
        assert d._accept_task is not None
        d._accept_task.cancel()  # the loop is gone, whatever the cause
        with pytest.raises(DaemonFatalError, match="socket accept loop ended"):
            await asyncio.wait_for(run, 30)
        assert not (tmp_path / "run" / "s.sock").exists()

    asyncio.run(main())


def test_watchdog_sees_a_stuck_loop() -> None:
    stuck = threading.Event()
    seen: list[float] = []

    def on_wedged(seconds: float) -> None:
        seen.append(seconds)
        stuck.set()

    async def main() -> None:
        # 2 s, not less: a loaded machine can hold a turning loop off the CPU for a good
        # fraction of a second, which the watchdog cannot tell from a stuck one.
        dog = Watchdog(2.0, on_wedged)
        dog.start(asyncio.get_running_loop())
        try:
            await asyncio.sleep(4.0)  # a turning loop, for twice the timeout: no alarm
            assert not seen
            deadline = time.monotonic() + 30
            while not stuck.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)  # blocks the loop, as a stuck call would
            assert seen and seen[0] > 2.0
        finally:
            dog.stop()

    asyncio.run(main())
