"""Suite-wide hooks: environment skips become failures for the parts ``$TSNET2_REQUIRE``
names (tests/require.py)."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.require import REQUIRE_ENV, required, required_part


def pytest_report_header(config: pytest.Config) -> str:
    """Which wireguard-go the netns lab's nodes run: $TSNET2_WIREGUARD_GO (scripts/test sets
    it to the build of image/wireguard-go), else wireguard-go on PATH."""
    from tsnet2.node.device import find_wireguard_go
    from tsnet2.node.errors import NodeError

    try:
        return f"wireguard-go: {find_wireguard_go()}"
    except NodeError as exc:
        return f"wireguard-go: {exc}"


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
