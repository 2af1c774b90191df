"""Smoke test: a real etcd + kube-apiserver serve namespaces, TokenRequest and TokenReview.

Skips (never builds) when ``tests/k8s/build-tools.sh`` has not been run.
"""

from __future__ import annotations

import http.client
import json

from kubernetes import client as k8s

from tests.k8s.apiserver import (
    KubeAPIServer,
    k8s_version,
)

NAMESPACE = "tsnet2-smoke"
SERVICE_ACCOUNT = "tsnet2-operator"
AUDIENCE = "tsnet2"


def _review(api: k8s.ApiClient, token: str, audiences: list[str] | None) -> k8s.V1TokenReviewStatus:
    review = k8s.V1TokenReview(spec=k8s.V1TokenReviewSpec(token=token, audiences=audiences))
    result = k8s.AuthenticationV1Api(api).create_token_review(review)
    assert result.status is not None
    status: k8s.V1TokenReviewStatus = result.status
    return status


def test_version_is_stamped(apiserver: KubeAPIServer) -> None:
    """/version reports the pinned release, not v0.0.0-master (ldflags were applied)."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1", apiserver.port, context=apiserver.ssl_context(), timeout=10
    )
    try:
        conn.request("GET", "/version")
        resp = conn.getresponse()
        body = json.loads(resp.read(65536))
    finally:
        conn.close()
    assert resp.status == 200
    assert body["gitVersion"] == f"v{k8s_version()}"
    assert body["major"] == "1"
    assert body["minor"] == k8s_version().split(".")[1]


def test_token_request_and_review(api_client: k8s.ApiClient) -> None:
    """A ServiceAccount token with audience tsnet2 authenticates only for that audience."""
    core = k8s.CoreV1Api(api_client)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=NAMESPACE)))
    sa = core.create_namespaced_service_account(
        NAMESPACE, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=SERVICE_ACCOUNT))
    )
    request = k8s.AuthenticationV1TokenRequest(
        spec=k8s.V1TokenRequestSpec(audiences=[AUDIENCE], expiration_seconds=600)
    )
    issued = core.create_namespaced_service_account_token(SERVICE_ACCOUNT, NAMESPACE, request)
    assert issued.status is not None and sa.metadata is not None
    token = issued.status.token
    assert isinstance(token, str) and token.count(".") == 2  # a JWS

    status = _review(api_client, token, [AUDIENCE])
    assert status.authenticated is True, status.error
    assert status.user is not None and status.user.groups is not None
    assert status.user.username == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
    assert status.user.uid == sa.metadata.uid
    assert "system:serviceaccounts" in status.user.groups
    assert status.audiences == [AUDIENCE]

    # The same token must not authenticate for the apiserver's own audience...
    assert not _review(api_client, token, None).authenticated
    # ...and a token with a forged signature must be rejected.
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
    assert not _review(api_client, forged, [AUDIENCE]).authenticated
