"""Suite-wide hooks: environment skips become failures for the parts ``$TSNET2_REQUIRE``
names (tests/require.py)."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.require import REQUIRE_ENV, required, required_part


def pytest_configure(config: pytest.Config) -> None:
    """Reject a misspelt ``$TSNET2_REQUIRE`` before any test runs."""
    try:
        required()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[
        None, pytest.TestReport, None]:
    """A skip tagged ``[needs PART]`` fails when PART is required."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return
    reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    part = required_part(reason)
    if part is not None:
        report.outcome = "failed"
        report.longrepr = (f"{REQUIRE_ENV} requires {part!r}, but this test could not run: "
                           f"{reason}")
