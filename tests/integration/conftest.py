"""Shared fixtures for the integration tests: the netns lab and started WireGuard nodes.

Tests marked ``@pytest.mark.netns`` are skipped (with the reason) unless the lab can run:
root, ``ip``, wireguard-go and /dev/net/tun. After each ``lab`` fixture, nothing named with
the lab's prefix may remain (namespace, link, wireguard-go socket or process).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from tests.require import needs
from tsnet2.lab import Lab, LabNode, check_prerequisites, find_leftovers
from tsnet2.node import Node
from tsnet2.node.wgkey import WireguardKey

from .plain_daemon import Daemon

LAB_PROBLEMS = check_prerequisites()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip netns tests with a clear reason when the lab cannot run on this machine."""
    if not LAB_PROBLEMS:
        return
    reason = "netns lab unavailable: " + "; ".join(LAB_PROBLEMS)
    skip = pytest.mark.skip(reason=needs("netns", reason))
    for item in items:
        if item.get_closest_marker("netns") is not None:
            item.add_marker(skip)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh Lab; closed after the test, then checked to have left nothing behind."""
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        the_lab.close()
    leftovers = find_leftovers(the_lab.prefix)
    assert not leftovers, f"lab {the_lab.prefix} left behind: {leftovers}"


StartNode = Callable[..., Node]


@pytest.fixture
def start_node(lab: Lab) -> Iterator[StartNode]:
    """``start_node(lab_node, host=N, **node_kwargs)``: a started Node in that namespace with
    addresses 100.64.0.N and fd7a:115c:a1e0::N; closed after the test (before the lab)."""
    nodes: list[Node] = []

    def start(lab_node: LabNode, host: int, **kwargs: object) -> Node:
        node = Node(ifname=lab_node.ifname, **kwargs)  # type: ignore[arg-type]
        with lab.in_netns(lab_node.netns):
            node.start(WireguardKey.generate())
        nodes.append(node)
        node.set_addresses(IPv4Address(f"100.64.0.{host}"), IPv6Address(f"fd7a:115c:a1e0::{host}"))
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.close()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A scratch dir every uid can traverse (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="tsnet2-open-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _running(d: Daemon) -> Iterator[Daemon]:
    try:
        yield d
    finally:
        assert d.stop() == 0, d.text()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A tsnet2d without a tailnet, in pytest's (root-only) tmp_path; must stop cleanly."""
    yield from _running(Daemon(tmp_path))


@pytest.fixture
def open_daemon(open_dir: Path) -> Iterator[Daemon]:
    """The same in a directory every uid can traverse (for other-uid clients)."""
    yield from _running(Daemon(open_dir))
