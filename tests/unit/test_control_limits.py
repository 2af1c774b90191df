"""Unit tests of tsnet2.control.limits: settings, descriptor room, log throttling."""

from __future__ import annotations

import logging
import math
import os
import resource
import sys

import pytest
from aiohttp.http_exceptions import LineTooLong

from tsnet2.control import limits
from tsnet2.control.limits import FD_RESERVE, ServerLimits, fd_room


def test_defaults_are_the_documented_ones() -> None:
    lim = ServerLimits()
    assert lim.max_connections == 1024
    assert (lim.header_timeout, lim.idle_timeout, lim.body_timeout) == (10.0, 30.0, 10.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_connections": 0},
        {"max_connections": True},
        {"max_connections": 1.5},
        {"header_timeout": 0},
        {"idle_timeout": -1},
        {"body_timeout": math.inf},
        {"body_timeout": math.nan},
    ],
)
def test_limits_cannot_be_switched_off(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ServerLimits(**kwargs)  # type: ignore[arg-type]


class FakeRlimit:
    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, value: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE and value[1] == self.hard
        assert value[0] <= self.hard
        self.soft = value[0]


def in_use() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fd_room_raises_the_soft_limit_when_the_hard_one_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeRlimit(256, 100_000)
    monkeypatch.setattr(resource, "getrlimit", fake.get)
    monkeypatch.setattr(resource, "setrlimit", fake.set)
    assert fd_room(1024) == 1024
    assert 1024 + FD_RESERVE <= fake.soft < 100_000


def test_fd_room_lowers_the_cap_under_a_small_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRlimit(256, 512)
    monkeypatch.setattr(resource, "getrlimit", fake.get)
    monkeypatch.setattr(resource, "setrlimit", fake.set)
    room = fd_room(1024)
    assert fake.soft == 512
    assert 1 <= room <= 512 - FD_RESERVE - in_use() + 2
    fake2 = FakeRlimit(64, 64)
    monkeypatch.setattr(resource, "getrlimit", fake2.get)
    assert fd_room(1024) == 1  # never 0 or negative


def _record(exc: BaseException | None) -> logging.LogRecord:
    return logging.LogRecord(
        "tsnet2.control.http",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        ("127.0.0.1",),
        (type(exc), exc, None) if exc is not None else None,
    )


def test_malformed_request_logs_are_one_line_per_interval() -> None:
    now = [1000.0]
    throttle = limits._BadRequestLogThrottle(clock=lambda: now[0])
    secret = "tsnet2-node-" + "cd" * 32
    exc = LineTooLong(("Authorization: Bearer " + secret).encode(), 8190)
    first = _record(exc)
    assert throttle.filter(first)
    assert first.levelno == logging.WARNING and first.exc_info is None
    message = first.getMessage()
    assert "1 malformed HTTP requests" in message and "LineTooLong" in message
    assert secret not in message
    for _ in range(50):
        assert not throttle.filter(_record(exc))
    now[0] += limits.PRESSURE_LOG_INTERVAL
    later = _record(exc)
    assert throttle.filter(later)
    assert "51 malformed HTTP requests" in later.getMessage()
    # Anything else (a real bug's traceback) passes untouched.
    try:
        raise RuntimeError("bug")
    except RuntimeError:
        bug = _record(sys.exc_info()[1])
    assert throttle.filter(bug) and bug.levelno == logging.ERROR and bug.exc_info is not None
    assert throttle.filter(_record(None))
