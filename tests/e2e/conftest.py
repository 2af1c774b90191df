"""When opted in (``TSNET2_E2E_KIND=1``, as scripts/e2e-kind runs it), SIGTERM is turned into
``KeyboardInterrupt`` for the whole run, so pytest tears its fixtures down (the kind
cluster, the test API server) instead of dying: the script forwards Ctrl-C as SIGTERM,
because pytest runs as its background job, which ignores SIGINT."""

from __future__ import annotations

import os
import signal
from types import FrameType

import pytest

from tests.e2e.kind.cluster import OPT_IN_ENV


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """Install the SIGTERM handler when opted in."""
    if os.environ.get(OPT_IN_ENV) == "1":
        signal.signal(signal.SIGTERM, _interrupt)
