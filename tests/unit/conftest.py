"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .faces import AsyncFace, SyncFace


@pytest.fixture(params=["sync", "async"])
def face(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Each client face in turn (tests/unit/faces.py): the test runs once per face."""
    f: Any = SyncFace() if request.param == "sync" else AsyncFace()
    try:
        yield f
    finally:
        f.close()
