"""Helpers for tests that run a whole tailnet (control + tsnet2d daemons) in a netns lab."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tsnet2.lab import Lab, find_leftovers
from tsnet2.lab.tailnet import LocalTailnet


@contextmanager
def running_tailnet(**kwargs: Any) -> Iterator[LocalTailnet]:
    """A lab with a control server; removed (and checked clean) afterwards."""
    lab = Lab()
    try:
        with LocalTailnet(lab, **kwargs) as net:
            net.start_control()
            yield net
    finally:
        lab.close()
    leftovers = find_leftovers(lab.prefix)
    assert not leftovers, f"lab {lab.prefix} left behind: {leftovers}"


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `pred` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def read_log(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL traffic log; blank lines skipped, bad JSON fails the test."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def recv_exactly(sock: Any, n: int) -> bytes:
    """Read exactly n bytes from a blocking socket (fails on early EOF)."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return buf

