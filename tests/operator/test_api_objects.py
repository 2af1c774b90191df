"""Objects from the API server that lack what the client's models allow to be missing are
refused with a typed error (these were ``assert`` statements)."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s
from tsnet2_operator.auth import TokenSubject, check_pod, pod_hostname, pod_metadata

from tsnet2.control.api import AuthenticationError, RegisterRequest


def test_pod_without_metadata_is_a_503() -> None:
    pod = k8s.V1Pod()
    with pytest.raises(AuthenticationError) as info:
        pod_hostname(pod)
    assert info.value.status == 503 and "without metadata" in info.value.message
    subject = TokenSubject("ns", "default", "web", "uid-1")
    request = RegisterRequest(auth_key=None, node_credential=None, public_key="k",
                              hostname="web", endpoints=(), ephemeral=True, tags=())
    with pytest.raises(AuthenticationError) as info:
        check_pod(pod, subject, request)
    assert info.value.status == 503


def test_pod_metadata() -> None:
    meta = k8s.V1ObjectMeta(name="web", annotations={"tsnet2.io/hostname": "Web_1"})
    assert pod_metadata(k8s.V1Pod(metadata=meta)) is meta
    assert pod_hostname(k8s.V1Pod(metadata=meta)) == "web-1"
