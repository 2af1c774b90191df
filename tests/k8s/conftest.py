"""Fixtures of the Kubernetes tests: one real etcd + kube-apiserver per test module and an
admin client of it (modules that need more, e.g. the CRDs installed, override them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client as k8s

from tests.k8s.apiserver import KubeAPIServer, admin_client, running_apiserver


@pytest.fixture(scope="module")
def apiserver() -> Iterator[KubeAPIServer]:
    """A running control plane for the module (skips when the binaries are not built)."""
    with running_apiserver() as api:
        yield api


@pytest.fixture(scope="module")
def api_client(apiserver: KubeAPIServer) -> Iterator[k8s.ApiClient]:
    """An admin (system:masters) ApiClient of :func:`apiserver`."""
    with admin_client(apiserver) as api:
        yield api
