"""The operator's kopf handlers called directly against a real kube-apiserver (no kopf loop).

Each handler is a module-level function taking its state as kopf's ``param``; here the
state holds real API clients, so the CRD installation, the injector's start-up (it reads the
server version) and the state-claim handlers do their real requests.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import kopf
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from tsnet2_operator import app, control, handlers
from tsnet2_operator.config import OperatorConfig, SidecarConfig
from tsnet2_operator.control import ControlRuntime, ControlSettings
from tsnet2_operator.metrics import InjectorMetrics
from tsnet2_operator.store import crd_manifests
from tsnet2_operator.webhook import KubeLookups

from tests.k8s.apiserver import KubeAPIServer, admin_client

LOG = logging.getLogger("tests.k8s.handlers")


def test_install_crds_and_peering_at_startup(api_client: k8s.ApiClient) -> None:
    """install-crds creates our CRDs, kopf's peering CRD and the peering object; run again
    (a restarted replica) it succeeds; ensure-peering adds another peering object."""
    setup = app.ClusterSetup(api_client, "tsnet2-test")
    asyncio.run(app.install_crds_at_startup(param=setup, logger=LOG))
    asyncio.run(app.install_crds_at_startup(param=setup, logger=LOG))
    ext = k8s.ApiextensionsV1Api(api_client)
    names = {c.metadata.name for c in ext.list_custom_resource_definition().items}
    assert {d["metadata"]["name"] for d in crd_manifests()} <= names
    assert app.PEERING_CRD_NAME in names
    asyncio.run(app.ensure_peering_at_startup(
        param=app.ClusterSetup(api_client, "tsnet2-other"), logger=LOG))
    objects = k8s.CustomObjectsApi(api_client).list_cluster_custom_object(
        app.PEERING_GROUP, "v1", app.PEERING_PLURAL)
    assert {"tsnet2-test", "tsnet2-other"} <= {o["metadata"]["name"] for o in objects["items"]}


def test_start_injector_reads_the_server_version(apiserver: KubeAPIServer) -> None:
    """``native_sidecar: auto`` asks the real API server (>= 1.29: native)."""
    config = OperatorConfig(
        sidecar=SidecarConfig(control_url="http://tsnet2-control.tsnet2-system.svc:8440"),
        webhook_cert_file="/nonexistent/tls.crt", webhook_key_file="/nonexistent/tls.key",
        metrics_addr="")
    injector = handlers.Injector(config, InjectorMetrics(),
                                 lambda: KubeLookups(admin_client(apiserver)))
    settings = kopf.OperatorSettings()

    async def start_stop() -> None:
        await handlers.start_injector(param=injector, settings=settings, logger=LOG)
        assert injector.lookups is not None
        assert await injector.lookups.server_version() >= (1, 29)
        await handlers.stop_injector(param=injector)

    asyncio.run(start_stop())
    assert injector.native_sidecar is True and injector.lookups is None


def test_state_claim_handlers(api_client: k8s.ApiClient) -> None:
    """A persistent pod's watch event creates its claim; once the pod is gone, an owner's
    deletion event collects the claim."""
    namespace = f"h-{secrets.token_hex(4)}"
    core = k8s.CoreV1Api(api_client)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    pod = core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "db", "annotations": {"tsnet2.io/state": "persistent",
                                                   "tsnet2.io/hostname": "db-1"}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
    })
    raw = api_client.sanitize_for_serialization(pod)
    runtime = ControlRuntime(api_client, ControlSettings(namespace="tsnet2-system"))

    asyncio.run(control.injected_pod_event(param=runtime, event={"type": "ADDED", "object": raw}))
    claim = core.read_namespaced_persistent_volume_claim("tsnet2-state-db-1", namespace)
    [owner] = claim.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == ("Pod", "db", pod.metadata.uid)

    asyncio.run(control.owner_event(param=runtime, event={"type": "DELETED"},
                                    namespace=namespace))
    core.read_namespaced_persistent_volume_claim("tsnet2-state-db-1", namespace)  # owner alive
    core.delete_namespaced_pod("db", namespace, grace_period_seconds=0)
    asyncio.run(control.owner_event(param=runtime, event={"type": "DELETED"},
                                    namespace=namespace))
    try:
        claim = core.read_namespaced_persistent_volume_claim("tsnet2-state-db-1", namespace)
    except ApiException as exc:
        assert exc.status == 404
    else:  # no garbage collector here: the claim may linger with its deletion timestamp
        assert claim.metadata.deletion_timestamp is not None
