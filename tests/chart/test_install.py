"""The chart against a real kube-apiserver: install, upgrade, uninstall.

(Schema validation of every rendered object is in test_validate.py.)
The real ``helm install``/``upgrade``/``uninstall`` run against the API server (no
kubelet or controllers). No pod is created here: with this API server's default
(ClusterIP) service resolution, a webhook call would go to an address not on this machine.
test_release_operator.py runs the release's operator and creates pods through its webhook,
with the API server resolving the Service through an EndpointSlice. Uninstall must
leave nothing of the release; CRDs stay with ``crds.keep`` (default) and go with
``crds.keep=false``. The chart creates no kopf peering object (the operator does, once its CRD
is established): a first install has no race against the CRD.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from tests.chart.conftest import (
    CHART,
    NAMESPACE,
    RELEASE,
    VALUES_DIR,
    VALUES_FILES,
    Helm,
    one,
)
from tests.k8s.apiserver import KubeAPIServer

WAIT = 90.0  # a CRD's deletion (its finalizer drains storage) can take tens of seconds
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dynamic(api_client: k8s.ApiClient) -> DynamicClient:
    """A dynamic client (discovery-based) on the admin connection."""
    return DynamicClient(api_client)


@pytest.fixture(scope="module")
def cluster_helm(helm: Helm, apiserver: KubeAPIServer) -> Helm:
    """helm using the API server's admin kubeconfig."""
    return helm.with_kubeconfig(apiserver.kubeconfig)


def _ensure_namespace(api: k8s.ApiClient, name: str, labels: dict[str, str] | None = None) -> None:
    body = k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels=labels))
    try:
        k8s.CoreV1Api(api).create_namespace(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        if labels:
            k8s.CoreV1Api(api).patch_namespace(name, {"metadata": {"labels": labels}})


def _wait_established(api: k8s.ApiClient, names: list[str]) -> None:
    ext = k8s.ApiextensionsV1Api(api)
    deadline = time.monotonic() + WAIT
    for name in names:
        while True:
            crd = ext.read_custom_resource_definition(name)
            conds = (crd.status.conditions if crd.status else None) or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                break
            assert time.monotonic() < deadline, f"CRD {name} not established"
            time.sleep(0.1)


def _dry_run_create(api: k8s.ApiClient, dynamic: DynamicClient, obj: dict[str, Any]) -> None:
    """POST ``obj`` with dryRun=All and fieldValidation=Strict; raises ApiException."""
    resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    path = resource.path(namespace=obj["metadata"].get("namespace"))
    url = f"{api.configuration.host}{path}?dryRun=All&fieldValidation=Strict"
    resp = api.call_api(
        "POST", url,
        header_params={"Content-Type": "application/json", "Accept": "application/json"},
        body=obj,
    )
    resp.read()
    if not 200 <= resp.status < 300:
        raise ApiException(status=resp.status, reason=resp.reason) from ValueError(
            resp.data.decode("utf-8", "replace"))


# --- install / upgrade / uninstall ------------------------------------------------------------

Ref = tuple[str, str, str | None, str]  # apiVersion, kind, namespace, name


def _refs(manifest: str) -> list[Ref]:
    refs = []
    for doc in yaml.safe_load_all(manifest):
        if doc:
            meta = doc["metadata"]
            refs.append((doc["apiVersion"], doc["kind"], meta.get("namespace"), meta["name"]))
    return refs


def _get(dynamic: DynamicClient, ref: Ref) -> Any:
    api_version, kind, namespace, name = ref
    resource = dynamic.resources.get(api_version=api_version, kind=kind)
    return resource.get(name=name, namespace=namespace)


def _exists(dynamic: DynamicClient, ref: Ref) -> bool:
    try:
        _get(dynamic, ref)
    except NotFoundError:
        return False
    return True


def _describe(dynamic: DynamicClient, ref: Ref) -> str:
    try:
        obj = _get(dynamic, ref)
    except NotFoundError:
        return "gone"
    status = obj.to_dict().get("status", {})
    return (f"deletionTimestamp={obj.metadata.deletionTimestamp} "
            f"finalizers={obj.metadata.finalizers} conditions={status.get('conditions')}")


def _wait_gone(dynamic: DynamicClient, refs: list[Ref]) -> None:
    deadline = time.monotonic() + WAIT
    left = list(refs)
    while left:
        left = [r for r in left if _exists(dynamic, r)]
        if left:
            assert time.monotonic() < deadline, "still present: " + "; ".join(
                f"{r}: {_describe(dynamic, r)}" for r in left)
            time.sleep(0.2)


def _leftovers(dynamic: DynamicClient, kinds: set[tuple[str, str]]) -> list[str]:
    """Objects labelled with the release instance, of any kind the chart renders."""
    found = []
    for api_version, kind in sorted(kinds):
        try:
            resource = dynamic.resources.get(api_version=api_version, kind=kind)
        except Exception:  # the kind's CRD is gone: no objects of it either
            continue
        items = resource.get(label_selector=f"app.kubernetes.io/instance={RELEASE}").items
        found += [f"{kind}/{i.metadata.name}" for i in items]
    return found


def _secret_data(api: k8s.ApiClient, name: str) -> dict[str, str]:
    data: dict[str, str] = k8s.CoreV1Api(api).read_namespaced_secret(name, NAMESPACE).data
    return data


def _install(cluster_helm: Helm, *args: str) -> str:
    """``helm install`` the chart as RELEASE into NAMESPACE (a first install: no retry)."""
    return cluster_helm.run("install", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)


@pytest.fixture(scope="module")
def installed(
    cluster_helm: Helm, api_client: k8s.ApiClient
) -> Iterator[str]:
    """The release installed with the defaults (webhook timeout 2 s); its output."""
    _ensure_namespace(api_client, NAMESPACE)
    out = _install(cluster_helm, "--set", "webhook.timeoutSeconds=2")
    yield out


def test_install_creates_every_object(
    installed: str, cluster_helm: Helm, dynamic: DynamicClient
) -> None:
    """Every object of the release manifest exists; the release has no hooks (the peering
    object is the operator's to create: its CRD is not established yet while Helm installs)."""
    refs = _refs(cluster_helm.run("get", "manifest", RELEASE, "--namespace", NAMESPACE))
    kinds = {r[1] for r in refs}
    assert {"CustomResourceDefinition", "Deployment", "ConfigMap", "Secret", "Service",
            "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
            "MutatingWebhookConfiguration", "PodDisruptionBudget"} <= kinds
    missing = [r for r in refs if not _exists(dynamic, r)]
    assert missing == []
    assert cluster_helm.run("get", "hooks", RELEASE, "--namespace", NAMESPACE).strip() == ""
    notes = installed[installed.index("NOTES:"):]
    assert "tsnet2.io/inject: enabled" in notes
    assert "tsnet2\\.io/status" in notes and "reason=Injected" in notes


def test_webhook_points_at_the_release_service(
    installed: str, api_client: k8s.ApiClient
) -> None:
    """The stored webhook configuration names the release's Service (which exists and
    targets the operator's webhook port) and carries the CA of the served certificate."""
    config = k8s.AdmissionregistrationV1Api(api_client).read_mutating_webhook_configuration(
        f"{RELEASE}-tsnet2-injector")
    svc = k8s.CoreV1Api(api_client).read_namespaced_service(f"{RELEASE}-tsnet2-webhook",
                                                            NAMESPACE)
    assert svc.spec.ports[0].target_port == "webhook"
    assert svc.spec.cluster_ip
    ca = _secret_data(api_client, f"{RELEASE}-tsnet2-webhook-tls")["ca.crt"]
    paths = {"namespaces.inject.tsnet2.io": "/inject", "pods.inject.tsnet2.io": "/inject",
             "ephemeral.inject.tsnet2.io": "/ephemeral"}
    assert sorted(h.name for h in config.webhooks) == sorted(paths)
    for hook in config.webhooks:
        ref = hook.client_config.service
        assert (ref.name, ref.namespace, ref.path, ref.port) == (
            svc.metadata.name, NAMESPACE, paths[hook.name], svc.spec.ports[0].port)
        assert hook.client_config.ca_bundle == ca  # base64 PEM, as in the Secret


def test_upgrade_keeps_certificates_and_updates_crds_and_config(
    installed: str, cluster_helm: Helm, api_client: k8s.ApiClient, dynamic: DynamicClient
) -> None:
    """An upgrade reuses the self-signed certificate (lookup), updates the CRDs (they are
    templates) and the settings, and rolls the pods (checksum annotation)."""
    secret = f"{RELEASE}-tsnet2-webhook-tls"
    before = _secret_data(api_client, secret)
    deploy_ref = ("apps/v1", "Deployment", NAMESPACE, f"{RELEASE}-tsnet2-operator")
    checksum = _get(dynamic, deploy_ref).spec.template.metadata.annotations["checksum/config"]
    revision = _revision(cluster_helm)
    cluster_helm.run("upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE,
                     "-f", str(VALUES_DIR / "kernel.yaml"),
                     "--set", "webhook.timeoutSeconds=2",
                     "--set", "global.commonLabels.upgraded=yes")
    assert _secret_data(api_client, secret) == before
    config = k8s.AdmissionregistrationV1Api(api_client).read_mutating_webhook_configuration(
        f"{RELEASE}-tsnet2-injector")
    assert all(h.client_config.ca_bundle == before["ca.crt"] for h in config.webhooks)
    crd = k8s.ApiextensionsV1Api(api_client).read_custom_resource_definition(
        "tailnetnodes.tsnet2.io")
    assert crd.metadata.labels.get("upgraded") == "yes"
    cm = k8s.CoreV1Api(api_client).read_namespaced_config_map(f"{RELEASE}-tsnet2-config",
                                                              NAMESPACE)
    assert '"backend": "kernel"' in cm.data["config.json"]
    after = _get(dynamic, deploy_ref).spec.template.metadata.annotations["checksum/config"]
    assert after != checksum
    status = cluster_helm.run("status", RELEASE, "--namespace", NAMESPACE)
    assert "STATUS: deployed" in status and _revision(cluster_helm) == revision + 1


def _revision(cluster_helm: Helm) -> int:
    status = cluster_helm.run("status", RELEASE, "--namespace", NAMESPACE)
    return int(status.split("REVISION:")[1].split()[0])


def _uninstall_and_check(cluster_helm: Helm, dynamic: DynamicClient,
                         keep_crds: bool) -> None:
    refs = _refs(cluster_helm.run("get", "manifest", RELEASE, "--namespace", NAMESPACE))
    crds = [r for r in refs if r[1] == "CustomResourceDefinition"]
    others = [r for r in refs if r[1] != "CustomResourceDefinition"]
    out = cluster_helm.run("uninstall", RELEASE, "--namespace", NAMESPACE)
    assert "uninstalled" in out
    _wait_gone(dynamic, others)
    kinds = {(r[0], r[1]) for r in others}
    if keep_crds:
        assert all(_exists(dynamic, r) for r in crds)
        assert sorted(_leftovers(dynamic, kinds)) == []
    else:
        # Helm deletes the CRDs; the API server's finalizer then deletes their objects and
        # the CRDs. That finalizer sometimes fails once with
        # "storage is (re)initializing" right after the CRDs changed and retries with a
        # long backoff, so a CRD may still be terminating: that is Helm's part done.
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and any(_exists(dynamic, r) for r in crds):
            time.sleep(0.2)
        for ref in crds:
            if _exists(dynamic, ref):
                assert _get(dynamic, ref).metadata.deletionTimestamp, f"{ref} not deleted"
        terminating = [r for r in crds if _exists(dynamic, r)]
        if not terminating:
            dynamic.resources.invalidate_cache()
            assert _leftovers(dynamic, kinds | {(r[0], r[1]) for r in crds}) == []
        else:
            assert _leftovers(dynamic, kinds) == []
    with pytest.raises(Exception, match="not found"):
        cluster_helm.run("status", RELEASE, "--namespace", NAMESPACE)


def test_uninstall_keeps_only_the_crds(
    installed: str, cluster_helm: Helm, dynamic: DynamicClient
) -> None:
    """crds.keep (default): uninstall removes every release object but the CRDs."""
    _uninstall_and_check(cluster_helm, dynamic, keep_crds=True)


def test_reinstall_adopts_kept_crds_then_removes_them(
    cluster_helm: Helm, dynamic: DynamicClient, api_client: k8s.ApiClient
) -> None:
    """Installing again adopts the kept CRDs; with crds.keep=false uninstall removes them:
    nothing of the release is left."""
    _install(cluster_helm, "-f", str(VALUES_DIR / "crds-removed-on-uninstall.yaml"))
    # The adopted live CRDs still say "keep" (a three-way merge does not drop it); Helm's
    # uninstall decides from the release manifest, which does not.
    manifest = cluster_helm.run("get", "manifest", RELEASE, "--namespace", NAMESPACE)
    assert "CustomResourceDefinition" in manifest and "resource-policy" not in manifest
    _uninstall_and_check(cluster_helm, dynamic, keep_crds=False)


def test_install_without_crds(
    cluster_helm: Helm, dynamic: DynamicClient, api_client: k8s.ApiClient
) -> None:
    """crds.install=false creates no CRD (the operator would) and leaves nothing behind."""
    out = _install(cluster_helm, "-f", str(VALUES_DIR / "no-crds.yaml"))
    assert "crds.install=false" in out
    manifest = cluster_helm.run("get", "manifest", RELEASE, "--namespace", NAMESPACE)
    assert "CustomResourceDefinition" not in manifest
    assert cluster_helm.run("get", "hooks", RELEASE, "--namespace", NAMESPACE).strip() == ""
    names = [c.metadata.name for c in
             k8s.ApiextensionsV1Api(api_client).list_custom_resource_definition().items
             if not c.metadata.deletion_timestamp]  # (those of the test above may linger)
    assert names == []
    _uninstall_and_check(cluster_helm, dynamic, keep_crds=True)


def test_values_dir_is_the_matrix() -> None:
    """The matrix covers the cases the chart promises (a guard against silent removals)."""
    assert {p.stem for p in VALUES_FILES} >= {
        "defaults", "cert-manager", "no-crds", "monitoring", "kernel", "native-off",
        "crds-removed-on-uninstall"}
    assert all(isinstance(yaml.safe_load(Path(p).read_text()) or {}, dict)
               for p in VALUES_FILES)
    assert one([{"kind": "x", "metadata": {"name": "a"}}], "x")["metadata"]["name"] == "a"
