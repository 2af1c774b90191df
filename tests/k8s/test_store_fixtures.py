"""Shared fixtures for the Kubernetes store, auth and volume tests (no tests in here).

A real etcd + kube-apiserver per test module; each test gets a fresh namespace, so state never
leaks between tests. Skips (never builds) when ``tests/k8s/build-tools.sh`` has not been run.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from kubernetes import client as k8s
from tsnet2_operator.store import install_crds

from tests.k8s.apiserver import (
    KubeAPIServer,
    admin_client,
    running_apiserver,
)


@pytest.fixture(scope="module")
def apiserver() -> Iterator[KubeAPIServer]:
    """A running control plane for this module's tests, with the tsnet2.io CRDs installed."""
    with running_apiserver() as api:
        with admin_client(api) as client:
            install_crds(client)
        yield api


@pytest.fixture()
def api_client(apiserver: KubeAPIServer) -> Iterator[k8s.ApiClient]:
    """An admin ApiClient, closed after the test."""
    with admin_client(apiserver) as api:
        yield api


def new_namespace(api: k8s.ApiClient, prefix: str = "t") -> str:
    """Create a namespace with a random name and return the name."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    k8s.CoreV1Api(api).create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    return name


@pytest.fixture()
def namespace(api_client: k8s.ApiClient) -> str:
    """A fresh namespace for this test (the test apiserver has no namespace controller, so
    it is never deleted; the whole etcd goes away with the module)."""
    return new_namespace(api_client)
