"""A watchdog for the daemon's event loop: if it stops turning, the process exits.

Everything the daemon does runs on one asyncio loop. If that loop is stuck (a blocking
call that never returns, a livelock), the daemon is deaf: it answers no app, no probe, no
signal handler. A thread outside the loop notices that the loop has not run a heartbeat
for `timeout` seconds, prints every thread's stack to stderr (so the cause is in the
container's log) and ends the process with status `EXIT_WEDGED`, so the kubelet (or
systemd) starts a working one. Apps reconnect and register again, as after any restart.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("tsnet2d.watchdog")

EXIT_WEDGED = 70  # EX_SOFTWARE
BEAT = 1.0  # seconds between heartbeats on the loop


def _exit_wedged(stuck_for: float) -> None:
    log.critical("event loop stuck for %.0fs; exiting so that a working daemon can be "
                 "started (stacks follow)", stuck_for)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(EXIT_WEDGED)


class Watchdog:
    """Calls `on_wedged(seconds)` (default: exit the process) from a thread when the loop
    it watches has not run a heartbeat for `timeout` seconds."""

    def __init__(self, timeout: float,
                 on_wedged: Callable[[float], None] = _exit_wedged) -> None:
        """Nothing runs until `start()`."""
        if timeout <= 0:
            raise ValueError(f"watchdog timeout must be > 0, got {timeout!r}")
        self.timeout = timeout
        self.on_wedged = on_wedged
        self._every = min(BEAT, timeout / 4)  # beats well within the timeout
        self.last_beat = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self.last_beat = time.monotonic()
        self._handle = loop.call_later(self._every, self._beat, loop)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Beat on `loop` and watch it from a daemon thread."""
        self.last_beat = time.monotonic()
        self._handle = loop.call_later(self._every, self._beat, loop)
        self._thread = threading.Thread(target=self._watch, name="tsnet2d-watchdog",
                                        daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopped.wait(self._every):
            stuck = time.monotonic() - self.last_beat
            if stuck > self.timeout:
                self.on_wedged(stuck)
                return

    def stop(self) -> None:
        """Stop beating and watching (idempotent)."""
        self._stopped.set()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None
