"""The real entry point (``python -m tsnet2_operator``) as a subprocess behind a real API server.

One operator process serves the injector webhook, the control server (Kubernetes store,
TokenReview auth) and runs the state-claim and node GC handlers. The test plays the chart:
it creates the namespaces, the ServiceAccount and the MutatingWebhookConfiguration; the
operator installs the CRDs itself. No kubelet: pods stay Pending, which is all the
webhook, TokenRequest/TokenReview and the watch handlers need.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from tsnet2_operator.store import crd_manifests

from tests.k8s.apiserver import (
    KubeAPIServer,
    free_port,
)
from tests.k8s.operator_process import OperatorRun, create_pod, http_ok, log_tail
from tests.k8s.pki import CertificateAuthority
from tsnet2.node.wgkey import WireguardKey

REPO = Path(__file__).resolve().parents[2]
STORE_NS = "tsnet2-system"
APP_NS = "apps"
WEBHOOK_CONFIG = "tsnet2-injector-main"




def _descendants(pid: int) -> set[int]:
    """Pids of all processes below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@dataclass
class OperatorProcess(OperatorRun):
    """The operator subprocess and where it serves."""

    liveness: str
    control_url: str
    webhook_port: int
    ca_pem: bytes


@contextlib.contextmanager
def run_operator(
    apiserver: KubeAPIServer, tmp: Path, args: list[str], env_extra: dict[str, str] | None = None
) -> Iterator[OperatorProcess]:
    """Start ``python -m tsnet2_operator ARGS`` configured by env; yield once it is ready
    (liveness endpoint and the control server's /healthz answer); stop it by pid after."""
    ca = CertificateAuthority("tsnet2-operator-main-ca")
    pair = ca.issue(
        tmp, "webhook", common_name="tsnet2-injector", server=True, ip_addresses=("127.0.0.1",)
    )
    webhook_port, control_port, live_port = free_port(), free_port(), free_port()
    control_url = f"http://127.0.0.1:{control_port}"
    env = {
        **os.environ,
        "KUBECONFIG": str(apiserver.kubeconfig),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "operator")]),
        "TSNET2_CONTROL_URL": control_url,
        "TSNET2_WEBHOOK_ADDR": "127.0.0.1",
        "TSNET2_WEBHOOK_PORT": str(webhook_port),
        "TSNET2_WEBHOOK_CERT_FILE": str(pair.cert_file),
        "TSNET2_WEBHOOK_KEY_FILE": str(pair.key_file),
        "TSNET2_METRICS_ADDR": "",
        "TSNET2_SIDECAR_IMAGE": "registry.example/tsnet2-sidecar:0.1.0",
        "TSNET2_NAMESPACE": STORE_NS,
        "TSNET2_CONTROL_ADDR": f"127.0.0.1:{control_port}",
        "TSNET2_SWEEP_INTERVAL": "1",
        **(env_extra or {}),
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env.pop("TSNET2_OPERATOR_CONFIG", None)
    log_path = tmp / "operator.log"
    liveness = f"http://127.0.0.1:{live_port}/healthz"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "tsnet2_operator", "--verbose", "--liveness", liveness, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
            start_new_session=True,
        )
        op = OperatorProcess(popen, log_path, liveness, control_url, webhook_port, ca.cert_pem)
        try:
            took = op.wait(
                lambda: http_ok(liveness) and http_ok(f"{control_url}/healthz"),
                60,
                "the operator's liveness endpoint and the control server's /healthz",
            )
            print(f"operator ready after {took:.1f}s")
            yield op
        finally:
            op.stop()  # unless the test stopped it: by pid


@pytest.fixture(scope="module")
def operator(
    apiserver: KubeAPIServer, api_client: k8s.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The standalone operator, with the namespaces and ServiceAccount the chart would make."""
    core = k8s.CoreV1Api(api_client)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=STORE_NS)))
    core.create_namespace(
        k8s.V1Namespace(
            metadata=k8s.V1ObjectMeta(name=APP_NS, labels={"tsnet2.io/inject": "enabled"})
        )
    )
    # No controller-manager here: create the ServiceAccount the injector names.
    core.create_namespaced_service_account(
        APP_NS, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="default"))
    )
    try:
        with run_operator(apiserver, tmp_path_factory.mktemp("operator-main"), []) as op:
            yield op
    finally:
        try:
            k8s.AdmissionregistrationV1Api(api_client).delete_mutating_webhook_configuration(
                WEBHOOK_CONFIG
            )
        except ApiException as exc:
            if exc.status != 404:
                raise


def _register_webhook(api: k8s.ApiClient, op: OperatorProcess) -> None:
    rule = {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
            "resources": ["pods"]}
    body = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIG},
        "webhooks": [
            {
                "name": "inject.tsnet2.io",
                "clientConfig": {
                    "url": f"https://127.0.0.1:{op.webhook_port}/inject",
                    "caBundle": base64.b64encode(op.ca_pem).decode(),
                },
                "rules": [rule],
                "namespaceSelector": {"matchLabels": {"tsnet2.io/inject": "enabled"}},
                "reinvocationPolicy": "IfNeeded",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
            }
        ],
    }
    k8s.AdmissionregistrationV1Api(api).create_mutating_webhook_configuration(body)
    _wait_webhook_active(api, op)


def _wait_webhook_active(api: k8s.ApiClient, op: OperatorProcess, timeout: float = 30.0) -> None:
    """Return once the API server calls the operator's injector for pods in the app namespace.

    The API server loads MutatingWebhookConfigurations asynchronously (an informer), so a
    create right after ours may be admitted without the webhook. Probe with ``dryRun=All``
    creates (nothing is stored, the injector posts no Event for a dry run) until one comes
    back with the sidecar; fail with the last answer and the operator's log after ``timeout``.
    """
    core = k8s.CoreV1Api(api)
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "webhook-probe"},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
    }
    start = time.monotonic()
    last = "no answer"
    probes = 0
    while time.monotonic() - start < timeout:
        probes += 1
        if op.popen.poll() is not None:
            op.fail(f"operator exited with {op.popen.returncode} while waiting for its webhook")
        try:
            resp = core.create_namespaced_pod(APP_NS, body, dry_run="All", _preload_content=False)
            try:
                probe: dict[str, Any] = json.loads(resp.data)
            finally:
                resp.release_conn()
        except ApiException as exc:  # e.g. the injector answering 503 while it starts
            last = f"HTTP {exc.status}: {exc.body!r}"
        else:
            if _sidecars(probe):
                print(f"webhook active {time.monotonic() - start:.2f}s after its configuration "
                      f"(probe {probes})")
                return
            last = "admitted without the sidecar"
        time.sleep(0.1)
    op.fail(f"the API server did not call the injector for a dry-run pod in {APP_NS} within "
            f"{timeout}s of creating the MutatingWebhookConfiguration ({probes} probes); "
            f"last probe: {last}")


def _create_pod(api: k8s.ApiClient, name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return create_pod(api, APP_NS, name, annotations=annotations)


def _sidecars(pod: dict[str, Any]) -> list[str]:
    spec = pod["spec"]
    return [c["name"] for c in spec.get("initContainers", []) + spec["containers"]
            if c["name"] == "tsnet2d"]


def _pvc_names(api: k8s.ApiClient) -> set[str]:
    claims = k8s.CoreV1Api(api).list_namespaced_persistent_volume_claim(APP_NS)
    return {c.metadata.name for c in claims.items if c.metadata.deletion_timestamp is None}


def _nodes(api: k8s.ApiClient) -> list[dict[str, Any]]:
    listed = k8s.CustomObjectsApi(api).list_namespaced_custom_object(
        "tsnet2.io", "v1alpha1", STORE_NS, "tailnetnodes"
    )
    items: list[dict[str, Any]] = listed["items"]
    return items


def _pod_token(api: k8s.ApiClient, pod: dict[str, Any]) -> str:
    meta = pod["metadata"]
    request = k8s.AuthenticationV1TokenRequest(
        spec=k8s.V1TokenRequestSpec(
            audiences=["tsnet2"],
            expiration_seconds=600,
            bound_object_ref=k8s.V1BoundObjectReference(
                api_version="v1", kind="Pod", name=meta["name"], uid=meta["uid"]
            ),
        )
    )
    issued = k8s.CoreV1Api(api).create_namespaced_service_account_token(
        pod["spec"]["serviceAccountName"], APP_NS, request
    )
    token: str = issued.status.token
    return token


def _post_register(url: str, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}/v1/register",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read(1 << 20))
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read(1 << 20) or b"{}")


def test_operator_installs_the_crds(operator: OperatorProcess, api_client: k8s.ApiClient) -> None:
    ext = k8s.ApiextensionsV1Api(api_client)
    for doc in crd_manifests():
        crd = ext.read_custom_resource_definition(doc["metadata"]["name"])
        established = [c for c in crd.status.conditions or [] if c.type == "Established"]
        assert established and established[0].status == "True", doc["metadata"]["name"]


def test_persistent_pod_gets_sidecar_and_state_claim(
    operator: OperatorProcess, api_client: k8s.ApiClient
) -> None:
    _register_webhook(api_client, operator)
    pod = _create_pod(
        api_client, "db", {"tsnet2.io/inject": "enabled", "tsnet2.io/state": "persistent"}
    )
    assert _sidecars(pod) == ["tsnet2d"]
    assert "tsnet2.io/status" in pod["metadata"]["annotations"]
    state = next(v for v in pod["spec"]["volumes"] if v["name"] == "tsnet2-state")
    assert state["persistentVolumeClaim"]["claimName"] == "tsnet2-state-db"
    took = operator.wait(lambda: "tsnet2-state-db" in _pvc_names(api_client), 15,
                         "the state claim tsnet2-state-db")
    print(f"state claim created {took:.2f}s after the pod")
    claim = k8s.CoreV1Api(api_client).read_namespaced_persistent_volume_claim(
        "tsnet2-state-db", APP_NS
    )
    assert [(o.kind, o.name) for o in claim.metadata.owner_references] == [("Pod", "db")]


def test_pod_token_registers_and_node_goes_with_its_pod(
    operator: OperatorProcess, api_client: k8s.ApiClient
) -> None:
    pod = _create_pod(api_client, "web", {"tsnet2.io/inject": "enabled"})
    assert _sidecars(pod) == ["tsnet2d"], "the webhook (registered by the previous test) ran"
    token = _pod_token(api_client, pod)
    public_key = str(WireguardKey.generate().public_key())
    status, reply = _post_register(
        operator.control_url, token, {"public_key": public_key, "hostname": "web"}
    )
    assert status == 200, reply
    assert reply["node"]["name"] == "web" and reply["node"]["ephemeral"] is True
    nodes = [n for n in _nodes(api_client) if n["spec"]["name"] == "web"]
    assert len(nodes) == 1
    spec = nodes[0]["spec"]
    assert spec["publicKey"] == public_key
    assert spec["pod"]["name"] == "web" and spec["pod"]["uid"] == pod["metadata"]["uid"]
    # Without the pod's token (a wrong one), registration is refused.
    bad_status, _ = _post_register(
        operator.control_url, token[:-4] + "AAAA", {"public_key": public_key, "hostname": "web"}
    )
    assert bad_status == 401
    k8s.CoreV1Api(api_client).delete_namespaced_pod("web", APP_NS, grace_period_seconds=0)
    took = operator.wait(
        lambda: not any(n["spec"]["name"] == "web" for n in _nodes(api_client)),
        5,
        "the node of the deleted ephemeral pod to go",
    )
    print(f"ephemeral node removed {took:.2f}s after its pod was deleted")


def test_sigterm_stops_cleanly(operator: OperatorProcess) -> None:
    """Exit 0, no child process left, nothing listening any more."""
    popen = operator.popen
    assert popen.poll() is None, "operator still running before SIGTERM"
    children = _descendants(popen.pid)
    popen.send_signal(signal.SIGTERM)
    try:
        code = popen.wait(30)
    except subprocess.TimeoutExpired:
        operator.fail("operator did not stop within 30s of SIGTERM")
    if code != 0:
        operator.fail(f"operator exited with {code} after SIGTERM")
    left = {pid for pid in children if os.path.exists(f"/proc/{pid}")}
    assert not left, f"processes left behind: {left}"
    assert not http_ok(f"{operator.control_url}/healthz")
    assert not http_ok(operator.liveness)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", operator.webhook_port), timeout=2).close()
    log = operator.log_path.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log, log_tail(operator.log_path)


def test_peering_two_replicas(
    apiserver: KubeAPIServer,
    api_client: k8s.ApiClient,
    operator: OperatorProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """--peering: both replicas serve the control API; only the higher-priority one runs the
    watch handlers; when it stops, the other one takes over."""
    assert operator.popen.poll() is not None, "runs after the standalone operator stopped"
    core = k8s.CoreV1Api(api_client)
    namespace = "peered"  # not labelled: no webhook here, the pod is annotated by hand
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    with (
        run_operator(apiserver, tmp_path_factory.mktemp("replica-hi"),
                     ["--peering", "tsnet2", "--priority", "20"]) as high,
        run_operator(apiserver, tmp_path_factory.mktemp("replica-lo"),
                     ["--peering", "tsnet2", "--priority", "10"]) as low,
    ):
        peering = k8s.CustomObjectsApi(api_client).get_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", "tsnet2"
        )
        assert peering["metadata"]["name"] == "tsnet2"
        for replica in (high, low):
            assert http_ok(f"{replica.control_url}/healthz")

        def text(op: OperatorProcess) -> str:
            return op.log_path.read_text(encoding="utf-8", errors="replace")

        def make(name: str) -> None:
            core.create_namespaced_pod(namespace, k8s.V1Pod(
                metadata=k8s.V1ObjectMeta(name=name, annotations={
                    "tsnet2.io/status": '{"version":"test"}', "tsnet2.io/state": "persistent"}),
                spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="app", image="app")]),
            ))

        def claims() -> set[str]:
            return {c.metadata.name
                    for c in core.list_namespaced_persistent_volume_claim(namespace).items}

        make("vault-0")
        high.wait(lambda: claims() == {"tsnet2-state-vault-0"}, 15,
                  "the state claim created by the active replica")
        high.wait(lambda: "created state claim peered/tsnet2-state-vault-0" in text(high), 5,
                  "the active replica to log the claim it created")
        assert "created state claim" not in text(low)
        assert "Resuming operations" not in text(low)
        # The active replica leaves (it removes itself from the peering): the other resumes.
        high.popen.send_signal(signal.SIGTERM)
        assert high.popen.wait(30) == 0, log_tail(high.log_path)
        low.wait(lambda: "Resuming operations" in text(low), 30, "the other replica to resume")
        make("vault-1")
        low.wait(lambda: "tsnet2-state-vault-1" in claims(), 15, "the claim made after failover")
        low.wait(lambda: "created state claim peered/tsnet2-state-vault-1" in text(low), 5,
                 "the resumed replica to log the claim it created")
        low.popen.send_signal(signal.SIGTERM)
        assert low.popen.wait(30) == 0, log_tail(low.log_path)
