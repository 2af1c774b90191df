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

from tests.k8s.apiserver import KubeAPIServer, default_bin_dir, missing_binaries


@pytest.fixture(scope="module")
def apiserver() -> Iterator[KubeAPIServer]:
    """A running control plane for this module's tests, with the tsnet2.io CRDs installed."""
    bin_dir = default_bin_dir()
    missing = missing_binaries(bin_dir)
    if missing:
        pytest.skip(
            f"real Kubernetes binaries not built ({', '.join(missing)} missing in {bin_dir}); "
            "run tests/k8s/build-tools.sh first (needs Go >= 1.26 and the Go module proxy)"
        )
    with KubeAPIServer(bin_dir) as api:
        with admin_client(api) as client:
            install_crds(client)
        yield api


def admin_config(apiserver: KubeAPIServer) -> k8s.Configuration:
    """Client configuration of the system:masters admin."""
    config = k8s.Configuration()
    config.host = apiserver.url
    config.ssl_ca_cert = str(apiserver.ca_file)
    config.cert_file = str(apiserver.admin_cert)
    config.key_file = str(apiserver.admin_key)
    return config


def admin_client(apiserver: KubeAPIServer) -> k8s.ApiClient:
    """A new ApiClient as admin (use it as a context manager)."""
    return k8s.ApiClient(admin_config(apiserver))


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
