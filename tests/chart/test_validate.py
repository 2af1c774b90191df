"""Offline schema validation of every rendered object, by a real kube-apiserver.

There is no kubeconform here (it downloads its schemas at run time), so every object
rendered (``helm template``) from every values file in tests/chart/values/ is sent to a real
kube-apiserver as a server-side dry run with ``fieldValidation=Strict`` (unknown or
duplicate fields are errors), after creating the chart's CRDs for real (strictly
validated too) so the custom resources can be checked. The kinds whose CRDs are not
available offline (cert-manager ``Certificate``/``Issuer``, Prometheus-operator
``ServiceMonitor``) are only checked by ``test_render.py``. Its own API server: the CRDs it
creates are never deleted (deleting a CRD seconds after creating it can stall on
"storage is (re)initializing").
"""

from __future__ import annotations

import re

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from tests.chart.conftest import NAMESPACE, REPO, VALUES_FILES, Helm, values_args
from tests.chart.test_install import (
    _dry_run_create,
    _ensure_namespace,
    _wait_established,
)

UNVALIDATED_GROUPS = ("cert-manager.io", "monitoring.coreos.com")


@pytest.fixture(scope="module")
def dynamic(api_client: k8s.ApiClient) -> DynamicClient:
    """A dynamic client (discovery-based) on the admin connection."""
    return DynamicClient(api_client)


def test_every_rendered_object_is_valid(
    helm: Helm, api_client: k8s.ApiClient, dynamic: DynamicClient
) -> None:
    """Server-side strict dry run of every object of every values file (see module doc)."""
    _ensure_namespace(api_client, NAMESPACE)
    ext = k8s.ApiextensionsV1Api(api_client)
    # The CRDs (identical in every file but for labels) are created for real, strictly
    # validated, and must become Established (a structural-schema error shows only then).
    crds = [o for o in helm.template() if o["kind"] == "CustomResourceDefinition"]
    for crd in crds:
        _dry_run_create(api_client, dynamic, crd)
        ext.create_custom_resource_definition(crd, field_validation="Strict")
    _wait_established(api_client, [c["metadata"]["name"] for c in crds])
    dynamic.resources.invalidate_cache()
    validated: dict[str, int] = {}
    skipped: set[str] = set()
    for values_file in VALUES_FILES:
        for obj in helm.template(*values_args(values_file)):
            group = obj["apiVersion"].rpartition("/")[0]
            if group in UNVALIDATED_GROUPS:
                skipped.add(obj["kind"])
                continue
            where = f"{values_file.name}: {obj['kind']}/{obj['metadata']['name']}"
            try:
                _dry_run_create(api_client, dynamic, obj)
            except ApiException as exc:
                if exc.status == 409 and obj["kind"] == "CustomResourceDefinition":
                    continue  # created above, strictly validated then
                pytest.fail(f"{where}: the API server refused it: {exc.status} "
                            f"{exc.__cause__}")
            validated[obj["kind"]] = validated.get(obj["kind"], 0) + 1
    assert skipped == {"Certificate", "Issuer", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert {"Deployment", "MutatingWebhookConfiguration", "ClusterRole", "Role", "Service",
            "Secret", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy",
            "ServiceAccount"} <= set(validated)


def test_readme_manifests_are_valid(
    api_client: k8s.ApiClient, dynamic: DynamicClient
) -> None:
    """Every ```yaml block of the README (the sample workload a new user copies) passes a
    strict server-side dry run."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert blocks, "the README's Kubernetes section lost its sample manifest"
    for block in blocks:
        obj = yaml.safe_load(block)
        obj["metadata"].setdefault("namespace", "default")
        try:
            _dry_run_create(api_client, dynamic, obj)
        except ApiException as exc:
            pytest.fail(f"README {obj['kind']}/{obj['metadata']['name']}: {exc.__cause__}")
