"""TokenReview registration on a real API server: real ServiceAccount tokens bound to pods.

Pods are API objects only (no kubelet): TokenRequest binds a token to a pod object, and
TokenReview checks it, which is all the authenticator needs.

Expiry: the API server refuses ``expirationSeconds`` below 600, so a test cannot wait for a
token to expire. A bound token is also invalidated when its pod is deleted, which is the
case that matters for sidecars (the pod is gone, its token must no longer register); that is
tested instead, and expiry itself is enforced by the same TokenReview call.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kubernetes import client as k8s
from tsnet2_operator.auth import TokenReviewAuthenticator
from tsnet2_operator.store import KubernetesStore

from tests.k8s.test_store_fixtures import api_client, apiserver, new_namespace
from tsnet2.control.server import ControlServer

__all__ = ["api_client", "apiserver"]

SA = "app"


def _pub() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def make_pod(
    api: k8s.ApiClient,
    namespace: str,
    name: str,
    *,
    hostname: str | None = None,
    injected: bool = True,
    state: str | None = None,
    tags: str | None = None,
) -> k8s.V1Pod:
    """Create a Pod object (never scheduled) with tsnet2 annotations."""
    annotations: dict[str, str] = {}
    if injected:
        annotations["tsnet2.io/status"] = '{"version":"test"}'
    if hostname:
        annotations["tsnet2.io/hostname"] = hostname
    if state:
        annotations["tsnet2.io/state"] = state
    if tags:
        annotations["tsnet2.io/tags"] = tags
    pod = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, annotations=annotations),
        spec=k8s.V1PodSpec(
            service_account_name=SA, containers=[k8s.V1Container(name="app", image="app")]
        ),
    )
    created: k8s.V1Pod = k8s.CoreV1Api(api).create_namespaced_pod(namespace, pod)
    return created


def pod_token(api: k8s.ApiClient, namespace: str, pod: k8s.V1Pod, audience: str = "tsnet2") -> str:
    """A real ServiceAccount token bound to ``pod`` (TokenRequest, boundObjectRef Pod)."""
    assert pod.metadata is not None
    request = k8s.AuthenticationV1TokenRequest(
        spec=k8s.V1TokenRequestSpec(
            audiences=[audience],
            expiration_seconds=600,
            bound_object_ref=k8s.V1BoundObjectReference(
                api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
            ),
        )
    )
    issued = k8s.CoreV1Api(api).create_namespaced_service_account_token(SA, namespace, request)
    assert issued.status is not None
    token: str = issued.status.token
    return token


def setup_namespace(api: k8s.ApiClient) -> str:
    namespace = new_namespace(api, "app")
    k8s.CoreV1Api(api).create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=SA))
    )
    return namespace


def events(api: k8s.ApiClient, namespace: str, pod: str, reason: str) -> list[str]:
    listed = k8s.CoreV1Api(api).list_namespaced_event(namespace)
    return [
        e.message or ""
        for e in listed.items
        if e.involved_object.name == pod and e.reason == reason
    ]


class Registrar:
    """POSTs /v1/register with a bearer token (what the sidecar does)."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def register(
        self, token: str | None, hostname: str, **extra: Any
    ) -> tuple[int, dict[str, Any]]:
        body = {"public_key": extra.pop("public_key", None) or _pub(), "hostname": hostname}
        body.update(extra)
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.session.post(f"{self.url}/v1/register", json=body, headers=headers) as resp:
            data: dict[str, Any] = await resp.json()
            return resp.status, data


@pytest.fixture()
def store_namespace(api_client: k8s.ApiClient) -> str:
    return new_namespace(api_client, "tsnet2-system")


async def _serve(
    api: k8s.ApiClient, store_namespace: str
) -> AsyncIterator[tuple[Registrar, KubernetesStore, ControlServer]]:
    async with KubernetesStore(api, store_namespace) as store:
        server = ControlServer(store, authenticator=TokenReviewAuthenticator(api, store))
        url = await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                yield Registrar(session, url), store, server
        finally:
            await server.close()


def test_token_of_injected_pod_registers(api_client: k8s.ApiClient, store_namespace: str) -> None:
    namespace = setup_namespace(api_client)
    pod = make_pod(api_client, namespace, "web-7d9f", hostname="web", tags="tag:web,tag:x")
    token = pod_token(api_client, namespace, pod)

    async def main() -> None:
        async for reg, store, server in _serve(api_client, store_namespace):
            status, data = await reg.register(token, "web", endpoints=["10.1.0.5:41641"])
            assert status == 200, data
            node = data["node"]
            assert node["name"] == "web" and node["ephemeral"] is True
            assert node["user"]["login_name"] == f"system:serviceaccount:{namespace}:{SA}"
            assert node["tags"] == ["tag:web", "tag:x"]
            objs = await store.node_objects()
            assert objs[0]["spec"]["pod"] == {
                "namespace": namespace,
                "name": "web-7d9f",
                "uid": pod.metadata.uid,
            }
            # Same pod again, with its node credential: the same node.
            status, again = await reg.register(
                token, "web", node_credential=data["node_credential"]
            )
            assert status == 200 and again["node"]["id"] == node["id"], again
            # Auth keys keep working on the same server (nodes outside the cluster).
            key = await server.create_auth_key()
            status, outside = await reg.register(None, "laptop", auth_key=key)
            assert status == 200 and outside["node"]["user"]["login_name"].startswith("admin@")
            # A tag the pod's annotation does not allow.
            status, data = await reg.register(token, "web", tags=["tag:db"])
            assert status == 403 and "tag:db" in data["error"], data

    asyncio.run(main())
    assert events(api_client, namespace, "web-7d9f", "TailnetNodeRegistered")


def test_wrong_tokens_are_refused(api_client: k8s.ApiClient, store_namespace: str) -> None:
    namespace = setup_namespace(api_client)
    web = make_pod(api_client, namespace, "web", injected=True)
    other = make_pod(api_client, namespace, "other", injected=True)
    plain = make_pod(api_client, namespace, "plain", injected=False)
    gone = make_pod(api_client, namespace, "gone", injected=True)
    other_token = pod_token(api_client, namespace, other)
    wrong_audience = pod_token(api_client, namespace, web, audience="vault")
    plain_token = pod_token(api_client, namespace, plain)
    gone_token = pod_token(api_client, namespace, gone)
    k8s.CoreV1Api(api_client).delete_namespaced_pod("gone", namespace, grace_period_seconds=0)
    unbound = k8s.CoreV1Api(api_client).create_namespaced_service_account_token(
        SA,
        namespace,
        k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=["tsnet2"], expiration_seconds=600)
        ),
    )
    assert unbound.status is not None and web.metadata is not None

    async def main() -> None:
        async for reg, store, _ in _serve(api_client, store_namespace):
            # A token bound to another pod cannot register this pod's hostname.
            status, data = await reg.register(other_token, "web")
            assert status == 403 and "does not match pod" in data["error"], data
            # Wrong audience: TokenReview refuses it.
            status, data = await reg.register(wrong_audience, "web")
            assert status == 401 and "TokenReview" in data["error"], data
            assert "audience" in data["error"]
            # The pod is not injected (no tsnet2.io/status).
            status, data = await reg.register(plain_token, "plain")
            assert status == 403 and "tsnet2.io/status" in data["error"], data
            # A bound token whose pod was deleted (stands in for expiry; see module doc).
            status, data = await reg.register(gone_token, "gone")
            assert status == 401, data
            # A token not bound to any pod.
            status, data = await reg.register(unbound.status.token, "web")
            assert status == 401 and "not bound to a pod" in data["error"], data
            # Garbage.
            status, data = await reg.register("not-a-jwt", "web")
            assert status == 401, data
            assert await store.list_nodes() == []

    asyncio.run(main())
    assert any(
        "does not match" in m
        for m in events(api_client, namespace, "other", "TailnetRegistrationRefused")
    )


def test_bearer_without_authenticator_is_refused(
    api_client: k8s.ApiClient, store_namespace: str
) -> None:
    async def main() -> None:
        async with KubernetesStore(api_client, store_namespace) as store:
            server = ControlServer(store)
            url = await server.start()
            try:
                async with aiohttp.ClientSession() as session:
                    status, data = await Registrar(session, url).register("x.y.z", "web")
                    assert status == 401 and "does not accept bearer" in data["error"]
            finally:
                await server.close()

    asyncio.run(main())


def test_two_live_pods_never_share_an_identity(
    api_client: k8s.ApiClient, store_namespace: str
) -> None:
    namespace = setup_namespace(api_client)
    core = k8s.CoreV1Api(api_client)
    first = make_pod(api_client, namespace, "db-a", hostname="db", state="persistent")
    second = make_pod(api_client, namespace, "db-b", hostname="db", state="persistent")
    first_token = pod_token(api_client, namespace, first)
    second_token = pod_token(api_client, namespace, second)

    async def main() -> None:
        async for reg, store, _ in _serve(api_client, store_namespace):
            status, data = await reg.register(first_token, "db")
            assert status == 200 and data["node"]["ephemeral"] is False, data
            node_id, credential = data["node"]["id"], data["node_credential"]
            # The second pod mounts the same state (same credential): refused while the
            # first is alive; so is a fresh registration. Never renamed, never cloned.
            status, refused = await reg.register(second_token, "db", node_credential=credential)
            assert status == 409 and "in use by live pod" in refused["error"], refused
            assert "db-a" in refused["error"]
            status, refused = await reg.register(second_token, "db")
            assert status == 409, refused
            assert [n.name for n in await store.list_nodes()] == ["db"]
            # Once the first pod is gone, the second takes the identity over.
            core.delete_namespaced_pod("db-a", namespace, grace_period_seconds=0)
            status, data = await reg.register(second_token, "db", node_credential=credential)
            assert status == 200 and data["node"]["id"] == node_id, data
            objs = await store.node_objects()
            assert [o["spec"]["pod"]["name"] for o in objs] == ["db-b"]

    asyncio.run(main())
    refusals = events(api_client, namespace, "db-b", "TailnetRegistrationRefused")
    assert refusals and "in use by live pod" in refusals[0]
