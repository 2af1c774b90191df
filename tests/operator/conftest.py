"""Operator tests: ``--update-golden`` rewrites tests/operator/golden/*.patch.json.

Without the flag a golden file that differs from the computed result, or one without an input
(a stale leftover), fails the test. Pass this directory on the command line so pytest loads
this conftest before parsing options: ``pytest tests/operator --update-golden``.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--update-golden``."""
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/operator/golden/*.patch.json from the current injector output",
    )


@pytest.fixture()
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True when the run was asked to refresh golden files."""
    return bool(request.config.getoption("--update-golden", default=False))
