"""State volumes and garbage collection on a real API server, and the operator end to end.

The test API server runs no kube-controller-manager, so there is no built-in garbage
collector: every deletion of a claim seen here was done by the operator's own collector
(tsnet2_operator.gc), which is what makes it work on such a cluster too. In a real cluster
the built-in garbage collector deletes the claims as well (their ownerReferences are set).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import kopf
import pytest
from kubernetes import client as k8s
from tsnet2_operator.control import ControlRuntime, ControlSettings, register_handlers
from tsnet2_operator.gc import collect_pvcs, orphaned, stale_pod_nodes
from tsnet2_operator.volumes import ensure_pvc, pvc_manifest, pvc_name, state_mode

from tests.k8s.apiserver import KubeAPIServer
from tests.k8s.test_auth import SA, make_pod, pod_token, setup_namespace
from tests.k8s.test_store_fixtures import admin_client, api_client, apiserver, new_namespace

__all__ = ["api_client", "apiserver"]


def _pod_dict(api: k8s.ApiClient, pod: k8s.V1Pod) -> dict[str, Any]:
    data: dict[str, Any] = api.sanitize_for_serialization(pod)  # type: ignore[no-untyped-call]
    return data


def _apps(api: k8s.ApiClient, namespace: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = k8s.CustomObjectsApi(api).create_namespaced_custom_object(
        "apps", "v1", namespace, plural, body
    )
    return created


def _owned(owner: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "apps/v1",
            "kind": kind,
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "controller": True,
        }
    ]


def _pvcs(api: k8s.ApiClient, namespace: str) -> dict[str, list[str]]:
    """Claims not being deleted, with their owners' kinds. A deleted claim keeps existing with
    a deletionTimestamp here: the kubernetes.io/pvc-protection finalizer is removed by
    kube-controller-manager, which the test API server does not run."""
    claims = k8s.CoreV1Api(api).list_namespaced_persistent_volume_claim(namespace)
    return {
        c.metadata.name: [o.kind for o in c.metadata.owner_references or []]
        for c in claims.items
        if c.metadata.deletion_timestamp is None
    }


def test_pure_parts() -> None:
    assert state_mode(None) == "ephemeral"
    assert state_mode({"tsnet2.io/state": "Persistent"}) == "persistent"
    with pytest.raises(ValueError, match=r"tsnet2\.io/state"):
        state_mode({"tsnet2.io/state": "forever"})
    assert pvc_name("My.Host") == "tsnet2-state-my"
    owner = {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u"}
    manifest = pvc_manifest("ns", "db", owner, size="1Gi", storage_class="fast")
    assert manifest["metadata"]["ownerReferences"] == [owner]
    assert manifest["spec"]["storageClassName"] == "fast"
    assert orphaned([False, False]) and not orphaned([False, True]) and not orphaned([])


def test_persistent_pod_gets_a_claim_owned_by_its_deployment(api_client: k8s.ApiClient) -> None:
    namespace = setup_namespace(api_client)
    labels = {"app": "db"}
    template = {
        "metadata": {"labels": labels},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }
    deployment = _apps(
        api_client,
        namespace,
        "deployments",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "db"},
            "spec": {"selector": {"matchLabels": labels}, "template": template},
        },
    )
    replicaset = _apps(
        api_client,
        namespace,
        "replicasets",
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {"name": "db-5c9", "ownerReferences": _owned(deployment, "Deployment")},
            "spec": {"selector": {"matchLabels": labels}, "template": template},
        },
    )
    pod = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(
            name="db-5c9-x1",
            labels=labels,
            annotations={"tsnet2.io/state": "persistent", "tsnet2.io/hostname": "db"},
            owner_references=[
                k8s.V1OwnerReference(
                    api_version="apps/v1",
                    kind="ReplicaSet",
                    name="db-5c9",
                    uid=replicaset["metadata"]["uid"],
                    controller=True,
                )
            ],
        ),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="app", image="app")]),
    )
    created = k8s.CoreV1Api(api_client).create_namespaced_pod(namespace, pod)
    pod_dict = _pod_dict(api_client, created)
    assert ensure_pvc(api_client, pod_dict) == ("tsnet2-state-db", True)
    assert ensure_pvc(api_client, pod_dict) == ("tsnet2-state-db", False)
    claim = k8s.CoreV1Api(api_client).read_namespaced_persistent_volume_claim(
        "tsnet2-state-db", namespace
    )
    owners = claim.metadata.owner_references
    assert [(o.kind, o.name, o.uid) for o in owners] == [
        ("Deployment", "db", deployment["metadata"]["uid"])
    ]
    assert claim.spec.access_modes == ["ReadWriteOnce"]
    # The pod going away (a rollout) keeps the claim; the Deployment going away removes it.
    k8s.CoreV1Api(api_client).delete_namespaced_pod("db-5c9-x1", namespace, grace_period_seconds=0)
    assert collect_pvcs(api_client, namespace) == []
    k8s.CustomObjectsApi(api_client).delete_namespaced_custom_object(
        "apps", "v1", namespace, "deployments", "db"
    )
    assert collect_pvcs(api_client, namespace) == [f"{namespace}/tsnet2-state-db"]
    assert _pvcs(api_client, namespace) == {}


def test_stale_pod_nodes_is_only_about_ephemeral_nodes() -> None:
    from tests.k8s.test_store import _spec  # a NewNode builder

    del _spec  # the decision is pure; build records directly
    from tsnet2_operator.store import PodRef

    from tsnet2.control.store import NodeRecord, UserRecord

    user = UserRecord(1, "u", "u", 0.0)

    def node(node_id: int, ephemeral: bool) -> NodeRecord:
        return NodeRecord(
            node_id,
            "s",
            f"n{node_id}",
            "k",
            "h",
            user,
            (),
            ephemeral,
            (),
            "100.64.0.1",
            "fd7a:115c:a1e0::1",
            0.0,
            None,
            None,
        )

    pods = [
        (node(1, True), PodRef("ns", "a", "uid-a")),
        (node(2, True), PodRef("ns", "b", "uid-b")),
        (node(3, False), PodRef("ns", "c", "uid-c")),
    ]
    assert [n.id for n in stale_pod_nodes(pods, {"uid-a"})] == [2]


class Operator:
    """The operator's control runtime and handlers, run by kopf in a thread."""

    def __init__(self, apiserver: KubeAPIServer, store_namespace: str) -> None:
        self.api = admin_client(apiserver)
        settings = ControlSettings(
            namespace=store_namespace, host="127.0.0.1", port=0, sweep_interval=1.0
        )
        self.runtime = ControlRuntime(self.api, settings)
        self.registry = kopf.OperatorRegistry()
        register_handlers(self.registry, self.runtime)

        @kopf.on.login(registry=self.registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(
                server=apiserver.url,
                ca_path=str(apiserver.ca_file),
                certificate_path=str(apiserver.admin_cert),
                private_key_path=str(apiserver.admin_key),
            )

        self.settings = kopf.OperatorSettings()
        self.settings.posting.enabled = False
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="kopf", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(
                kopf.operator(
                    registry=self.registry,
                    settings=self.settings,
                    standalone=True,
                    clusterwide=True,
                    stop_flag=self.stop_flag,
                    ready_flag=self.ready_flag,
                )
            )
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def __enter__(self) -> Operator:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.errors:
            if self.ready_flag.is_set() and self.runtime.server._url is not None:
                return self
            time.sleep(0.1)
        self.__exit__()
        raise AssertionError(f"operator did not start: {self.errors}")

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self.thread.join(30)
        self.api.close()
        assert not self.thread.is_alive(), "kopf did not stop"


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` until true; return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture()
def operator(apiserver: KubeAPIServer, api_client: k8s.ApiClient) -> Iterator[Operator]:
    with Operator(apiserver, new_namespace(api_client, "tsnet2-system")) as op:
        yield op


def _register(url: str, token: str, hostname: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/v1/register",
                json={"public_key": "A" * 43 + "=", "hostname": hostname},
                headers={"Authorization": f"Bearer {token}"},
            ) as resp,
        ):
            data: dict[str, Any] = await resp.json()
            assert resp.status == 200, data
            return data

    return asyncio.run(main())


def test_operator_end_to_end(operator: Operator, api_client: k8s.ApiClient) -> None:
    """kopf runs the handlers: a persistent pod gets its claim, a deleted bare pod's claim
    goes, a deleted ephemeral pod's node leaves the store within seconds."""
    namespace = setup_namespace(api_client)
    core = k8s.CoreV1Api(api_client)
    objects = k8s.CustomObjectsApi(api_client)
    store_ns = operator.runtime.settings.namespace

    def nodes() -> list[str]:
        listed = objects.list_namespaced_custom_object(
            "tsnet2.io", "v1alpha1", store_ns, "tailnetnodes"
        )
        return [o["spec"]["name"] for o in listed["items"]]

    make_pod(api_client, namespace, "vault-0", hostname="vault", state="persistent")
    took = wait_for(
        lambda: "tsnet2-state-vault" in _pvcs(api_client, namespace),
        10,
        "the state claim of a persistent pod",
    )
    assert _pvcs(api_client, namespace)["tsnet2-state-vault"] == ["Pod"]
    assert took < 10

    web = make_pod(api_client, namespace, "web", hostname="web")
    data = _register(operator.runtime.server.url, pod_token(api_client, namespace, web), "web")
    assert data["node"]["ephemeral"] is True and nodes() == ["web"]
    core.delete_namespaced_pod("web", namespace, grace_period_seconds=0)
    took = wait_for(lambda: nodes() == [], 5, "the node of the deleted ephemeral pod to go")
    print(f"ephemeral node removed {took:.2f}s after its pod was deleted")

    core.delete_namespaced_pod("vault-0", namespace, grace_period_seconds=0)
    wait_for(lambda: _pvcs(api_client, namespace) == {}, 10, "the claim of the deleted owner")
    assert SA == "app"
