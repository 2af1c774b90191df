"""Fixtures for the chart tests: the real helm binary, rendering, and a real API server.

helm and kube-apiserver/etcd are built by ``tests/k8s/build-tools.sh`` (from the Go module
proxy); tests that need them skip with a message naming the missing binary. Nothing here
renders templates itself: every manifest comes from ``helm template``/``helm install``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.apiserver import default_bin_dir
from tests.k8s.conftest import api_client, apiserver  # noqa: F401  (the same fixtures)
from tests.require import needs

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tsnet2"
VALUES_DIR = Path(__file__).resolve().parent / "values"
VALUES_FILES = sorted(VALUES_DIR.glob("*.yaml"))
NAMESPACE = "tsnet2-system"
RELEASE = "t"
HELM_TIMEOUT = 120.0
BUILD_HINT = "run tests/k8s/build-tools.sh first (needs Go >= 1.26 and the Go module proxy)"


class HelmError(RuntimeError):
    """helm exited non-zero (the message has its stderr)."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"helm {' '.join(argv)} exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Helm:
    """The real helm binary with an isolated home (no user config, cache or plugins)."""

    binary: Path
    home: Path
    kubeconfig: Path | None = None

    def run(self, *argv: str) -> str:
        """Run helm, return stdout; raise :class:`HelmError` on a non-zero exit."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        proc = subprocess.run(
            [str(self.binary), *argv],
            capture_output=True, text=True, env=env, timeout=HELM_TIMEOUT, check=False,
        )
        if proc.returncode != 0:
            raise HelmError(argv, proc.returncode, proc.stderr)
        return proc.stdout

    def with_kubeconfig(self, kubeconfig: Path) -> Helm:
        """The same helm talking to the cluster of ``kubeconfig``."""
        return Helm(self.binary, self.home, kubeconfig)

    def template(self, *args: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        """``helm template`` the chart; the rendered objects (empty documents dropped)."""
        out = self.run("template", RELEASE, str(CHART), "--namespace", namespace, *args)
        return [doc for doc in yaml.safe_load_all(out) if doc]


def values_args(path: Path) -> list[str]:
    """``-f path`` (an empty file means the chart defaults)."""
    return ["-f", str(path)]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The helm binary built by build-tools.sh, or skip."""
    binary = default_bin_dir() / "helm"
    if not os.access(binary, os.X_OK):
        pytest.skip(needs("k8s", f"helm not built ({binary} missing); {BUILD_HINT}"))
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The objects of one kind."""
    return [o for o in objects if o.get("kind") == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of ``kind`` (and ``name``); fails the test otherwise."""
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
