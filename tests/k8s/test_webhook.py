"""The injector behind a real kube-apiserver: kopf's webhook server, our registry, real pods.

The operator runs in-process (``kopf.testing.KopfRunner``) with the registry from
``build_registry``; kopf serves HTTPS on 127.0.0.1 with a certificate from tests/k8s/pki.py.
The test creates the MutatingWebhookConfiguration itself (as the chart will): a
namespaceSelector on ``tsnet2.io/inject=enabled`` and ``reinvocationPolicy: IfNeeded``. A
second, test-only webhook (``/relabel``) mutates every pod after ours, so the API server
re-invokes the injector, which must not add a second sidecar. A third webhook sends UPDATEs of
``pods/ephemeralcontainers`` (what ``kubectl debug`` does) to ``/ephemeral``, from every
namespace, as the chart does. No kubelet: pods stay Pending.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from kopf.testing import KopfRunner
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from tsnet2_operator.config import OperatorConfig, SidecarConfig
from tsnet2_operator.handlers import build_registry
from tsnet2_operator.metrics import InjectorMetrics

from tests.k8s.apiserver import (
    KubeAPIServer,
    free_port,
)
from tests.k8s.pki import CertificateAuthority

OPTED = "tsnet2-opted"
PLAIN = "tsnet2-plain"
RELABEL_LABEL = "test.tsnet2.io/relabelled"




def _wait_tls(port: int, ca: Path, timeout: float = 30.0) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"webhook server on 127.0.0.1:{port} never answered TLS: {last}")


@pytest.fixture(scope="module")
def operator(
    apiserver: KubeAPIServer, api_client: k8s.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InjectorMetrics]:
    """The kopf operator serving /inject (and the test's /relabel), plus the webhook config."""
    pki = tmp_path_factory.mktemp("webhook-pki")
    ca = CertificateAuthority("tsnet2-webhook-test-ca")
    ca_file = ca.write_cert(pki / "ca.crt")
    pair = ca.issue(
        pki, "webhook", common_name="tsnet2-injector", server=True, ip_addresses=("127.0.0.1",)
    )
    port = free_port()
    config = OperatorConfig(
        sidecar=SidecarConfig(
            image="registry.example/tsnet2-sidecar:0.1.0",
            control_url="http://tsnet2-control.tsnet2-system.svc:8080",
        ),
        native_sidecar="auto",
        webhook_addr="127.0.0.1",
        webhook_port=port,
        webhook_cert_file=str(pair.cert_file),
        webhook_key_file=str(pair.key_file),
        metrics_addr="127.0.0.1:0",
    )
    metrics = InjectorMetrics()
    registry = build_registry(config, metrics=metrics)

    @kopf.on.mutate("pods", operations=["CREATE"], id="relabel", registry=registry)
    def relabel(patch: kopf.Patch, **_: Any) -> None:
        """Test-only second webhook: any change here makes the API server re-invoke ours."""
        patch.metadata.labels[RELABEL_LABEL] = "yes"

    core = k8s.CoreV1Api(api_client)
    for name, labels in ((OPTED, {"tsnet2.io/inject": "enabled"}), (PLAIN, {})):
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels=labels)))
    ca_bundle = base64.b64encode(ca.cert_pem).decode()
    rule = {
        "apiGroups": [""],
        "apiVersions": ["v1"],
        "operations": ["CREATE"],
        "resources": ["pods"],
    }

    def hook(name: str, path: str, reinvocation: str,
             rules: list[dict[str, Any]] | None = None,
             labels: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "name": name,
            "clientConfig": {"url": f"https://127.0.0.1:{port}/{path}", "caBundle": ca_bundle},
            "rules": rules or [rule],
            "namespaceSelector": {"matchLabels": {"tsnet2.io/inject": "enabled"}
                                  if labels is None else labels},
            "reinvocationPolicy": reinvocation,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
        }

    webhook_config = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "tsnet2-injector"},
        "webhooks": [
            hook("inject.tsnet2.io", "inject", "IfNeeded"),
            hook("relabel.test.tsnet2.io", "relabel", "Never"),
            hook("ephemeral.inject.tsnet2.io", "ephemeral", "IfNeeded", labels={}, rules=[{
                **rule, "operations": ["UPDATE"], "resources": ["pods/ephemeralcontainers"]}]),
        ],
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBECONFIG", str(apiserver.kubeconfig))
        with KopfRunner(
            ["run", "--standalone", "--all-namespaces", "--verbose"], registry=registry, timeout=60
        ) as runner:
            _wait_tls(port, ca_file)
            k8s.AdmissionregistrationV1Api(api_client).create_mutating_webhook_configuration(
                webhook_config
            )
            _wait_webhook_active(api_client, OPTED)
            yield metrics
    assert runner.exception is None, runner.output


def _pod(name: str, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}], **spec},
    }


def _create(api: k8s.ApiClient, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
    """Create through the API server; return the stored object as plain JSON."""
    core = k8s.CoreV1Api(api)
    resp = core.create_namespaced_pod(namespace, pod, _preload_content=False)
    try:
        created: dict[str, Any] = json.loads(resp.data)
    finally:
        resp.release_conn()
    return created


def _wait_webhook_active(api: k8s.ApiClient, namespace: str, timeout: float = 30.0) -> None:
    """Return once the API server calls our webhooks for pods in ``namespace``.

    The API server loads MutatingWebhookConfigurations asynchronously (an informer), so a
    create right after ours may be admitted without them. Probe with ``dryRun=All`` creates
    (nothing is stored and the injector posts no Event for a dry run) until one comes back
    with the sidecar; fail with the last answer after ``timeout``. The configuration is one
    object, so its other webhooks are active from the same moment.
    """
    core = k8s.CoreV1Api(api)
    start = time.monotonic()
    last = "no answer"
    probes = 0
    while time.monotonic() - start < timeout:
        probes += 1
        try:
            resp = core.create_namespaced_pod(
                namespace, _pod("webhook-probe"), dry_run="All", _preload_content=False
            )
            try:
                probe: dict[str, Any] = json.loads(resp.data)
            finally:
                resp.release_conn()
        except ApiException as exc:  # e.g. the webhook's server answering 503 while starting
            last = f"HTTP {exc.status}: {exc.body!r}"
        else:
            names = [c["name"] for c in probe["spec"].get("initContainers", [])]
            if "tsnet2d" in names:
                return
            last = f"admitted unmutated (init containers {names})"
        time.sleep(0.1)
    raise AssertionError(
        f"the API server did not call the injector for a dry-run pod in {namespace} within "
        f"{timeout}s of creating the MutatingWebhookConfiguration ({probes} probes); last "
        f"probe: {last}"
    )


def _events(
    api: k8s.ApiClient, namespace: str, name: str, reason: str, timeout: float = 15.0
) -> list[str]:
    core = k8s.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    while True:
        items = core.list_namespaced_event(namespace).items
        found = [e.message for e in items if e.involved_object.name == name and e.reason == reason]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_annotated_pod_gets_one_native_sidecar(
    operator: InjectorMetrics, api_client: k8s.ApiClient
) -> None:
    """The stored pod carries tsnet2d once, even though the API server re-invoked us."""
    skipped_before = operator.value("skipped", "already_injected")
    pod = _create(
        api_client,
        OPTED,
        _pod(
            "web",
            {
                "tsnet2.io/inject": "enabled",
                "tsnet2.io/hostname": "web-1",
                "tsnet2.io/tags": "tag:web",
                "tsnet2.io/traffic-log": "metadata",
            },
        ),
    )
    spec = pod["spec"]
    # The API server is 1.37 (>= 1.29): a native sidecar.
    sidecars = [c for c in spec.get("initContainers", []) if c["name"] == "tsnet2d"]
    assert len(sidecars) == 1
    assert all(c["name"] != "tsnet2d" for c in spec["containers"])
    sidecar = sidecars[0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"][sidecar["args"].index("--hostname") + 1] == "web-1"
    assert sidecar["args"][sidecar["args"].index("--advertise-tags") + 1] == "tag:web"
    assert sidecar["args"][sidecar["args"].index("--traffic-log-mode") + 1] == "metadata"
    assert sidecar["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_BIND_SERVICE"]
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    app = spec["containers"][0]
    assert {"name": "TSNET2_SOCKET", "value": "/var/run/tsnet2/tsnet2.sock"} in app["env"]
    assert any(m["mountPath"] == "/var/run/tsnet2" for m in app["volumeMounts"])
    assert app["securityContext"]["capabilities"]["drop"] == ["NET_RAW"]
    token = next(v for v in spec["volumes"] if v["name"] == "tsnet2-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "tsnet2"
    status = json.loads(pod["metadata"]["annotations"]["tsnet2.io/status"])
    assert status["sidecar"] == "native" and status["netRawDropped"] == ["app"]
    # The test webhook ran after ours, and the API server re-invoked the injector.
    assert pod["metadata"]["labels"][RELABEL_LABEL] == "yes"
    assert operator.value("skipped", "already_injected") == skipped_before + 1
    assert operator.value("injected", "pod_annotation") >= 1
    messages = _events(api_client, OPTED, "web", "Injected")
    assert messages and "dropped NET_RAW from app" in messages[0]


def test_namespace_label_alone_opts_in(
    operator: InjectorMetrics, api_client: k8s.ApiClient
) -> None:
    """Without a pod annotation the injector reads the namespace's label from the API."""
    before = operator.value("injected", "namespace_label")
    pod = _create(api_client, OPTED, _pod("plain"))
    names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert names == ["tsnet2d"]
    assert operator.value("injected", "namespace_label") == before + 1


def test_pod_in_plain_namespace_is_untouched(
    operator: InjectorMetrics, api_client: k8s.ApiClient
) -> None:
    """The namespaceSelector keeps the webhook away: the stored pod is as sent."""
    sent = _pod("web", {"tsnet2.io/inject": "enabled"})
    pod = _create(api_client, PLAIN, sent)
    assert "initContainers" not in pod["spec"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app"]
    assert "tsnet2.io/status" not in pod["metadata"]["annotations"]
    assert RELABEL_LABEL not in (pod["metadata"].get("labels") or {})


def test_invalid_annotation_is_rejected_with_message(
    operator: InjectorMetrics, api_client: k8s.ApiClient
) -> None:
    """The API server refuses the pod and the user sees the annotation and allowed values."""
    before = operator.value("rejected", "invalid_annotation")
    with pytest.raises(ApiException) as info:
        _create(api_client, OPTED, _pod("bad", {"tsnet2.io/state": "durable"}))
    assert info.value.status == 400
    body = str(info.value.body)
    assert "tsnet2.io/state" in body and "ephemeral, persistent" in body
    assert operator.value("rejected", "invalid_annotation") == before + 1
    with pytest.raises(ApiException) as info:
        k8s.CoreV1Api(api_client).read_namespaced_pod("bad", OPTED)
    assert info.value.status == 404


def test_host_network_pod_is_skipped_with_event(
    operator: InjectorMetrics, api_client: k8s.ApiClient
) -> None:
    """hostNetwork pods are admitted unchanged, with an InjectionSkipped Event."""
    pod = _create(api_client, OPTED, _pod("hostnet", hostNetwork=True))
    assert "initContainers" not in pod["spec"]
    assert "tsnet2.io/status" not in (pod["metadata"].get("annotations") or {})
    messages = _events(api_client, OPTED, "hostnet", "InjectionSkipped")
    assert messages and "host_network" in messages[0]


def _debug(api: k8s.ApiClient, namespace: str, pod: str,
           container: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Add an ephemeral container the way ``kubectl debug`` does (a strategic merge patch of
    the ``pods/ephemeralcontainers`` subresource); the stored pod and the API's warnings."""
    resp = k8s.CoreV1Api(api).patch_namespaced_pod_ephemeralcontainers(
        pod, namespace, {"spec": {"ephemeralContainers": [container]}},
        _content_type="application/strategic-merge-patch+json", _preload_content=False)
    try:
        stored: dict[str, Any] = json.loads(resp.data)
        warnings = list(resp.headers.getlist("Warning"))
    finally:
        resp.release_conn()
    return stored, warnings


def _ephemeral(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["spec"]["ephemeralContainers"] if c["name"] == name)


@pytest.mark.parametrize(("capability", "name"), [("NET_RAW", "raw"), ("cap_sys_ptrace", "pt")])
def test_dangerous_debug_container_is_refused(
    operator: InjectorMetrics, api_client: k8s.ApiClient, capability: str, name: str
) -> None:
    """kubectl debug with NET_RAW or SYS_PTRACE on an injected pod: the real API server calls
    /ephemeral for the subresource and refuses the update with our message; the stored pod
    has no such container."""
    pod = f"dbg-{name}"
    _create(api_client, OPTED, _pod(pod))
    before = operator.value("rejected", "unconfinable_container")
    with pytest.raises(ApiException) as info:
        _debug(api_client, OPTED, pod, {
            "name": "debugger", "image": "busybox:1", "stdin": True, "tty": True,
            "securityContext": {"capabilities": {"add": [capability]}}})
    assert info.value.status == 400
    body = json.loads(info.value.body)["message"]
    setting = capability.upper().removeprefix("CAP_")
    assert f'container \\"debugger\\" adds capability {setting}, which' in json.dumps(body)
    assert "--profile=baseline" in body
    assert operator.value("rejected", "unconfinable_container") == before + 1
    stored = k8s.CoreV1Api(api_client).read_namespaced_pod(pod, OPTED)
    assert not stored.spec.ephemeral_containers


def test_harmless_debug_container_is_admitted_without_net_raw(
    operator: InjectorMetrics, api_client: k8s.ApiClient
) -> None:
    """A debug container without dangerous settings is admitted with NET_RAW dropped and the
    socket mounted; the API server keeps our patch (only spec.ephemeralContainers may change
    on this subresource), warns the user, and an Event records it."""
    _create(api_client, OPTED, _pod("dbg-ok"))
    before = operator.value("injected", "ephemeral_container")
    stored, warnings = _debug(api_client, OPTED, "dbg-ok", {
        "name": "debugger", "image": "busybox:1", "targetContainerName": "app"})
    debugger = _ephemeral(stored, "debugger")
    assert debugger["securityContext"]["capabilities"]["drop"] == ["NET_RAW"]
    assert {"name": "TSNET2_SOCKET", "value": "/var/run/tsnet2/tsnet2.sock"} in debugger["env"]
    assert {"name": "tsnet2-socket", "mountPath": "/var/run/tsnet2", "readOnly": True} \
        in debugger["volumeMounts"]
    assert any("dropped capability NET_RAW from container(s) debugger" in w for w in warnings)
    assert operator.value("injected", "ephemeral_container") == before + 1
    messages = _events(api_client, OPTED, "dbg-ok", "EphemeralContainerChecked")
    assert messages and "dropped NET_RAW from debugger" in messages[0]


def test_debug_container_is_stripped_under_policy_strip(
    operator: InjectorMetrics, api_client: k8s.ApiClient
) -> None:
    """kubectl debug --profile=netadmin on a pod with policy strip: admitted without NET_ADMIN
    and NET_RAW, with a warning per removal."""
    _create(api_client, OPTED, _pod("dbg-strip", {"tsnet2.io/audit-bypass-policy": "strip"}))
    stored, warnings = _debug(api_client, OPTED, "dbg-strip", {
        "name": "netshoot", "image": "netshoot:1",
        "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}}})
    caps = _ephemeral(stored, "netshoot")["securityContext"]["capabilities"]
    assert caps.get("add", []) == [] and caps["drop"] == ["NET_RAW"]
    assert sum("tsnet2.io/audit-bypass-policy: strip" in w for w in warnings) == 2
    messages = _events(api_client, OPTED, "dbg-strip", "EphemeralContainerChecked")
    assert messages and "stripped NET_ADMIN from netshoot" in messages[0]


def test_pod_refused_for_capabilities_at_creation(
    operator: InjectorMetrics, api_client: k8s.ApiClient
) -> None:
    """The same rules at creation: a privileged app container is refused; stripped under
    policy strip, recorded in the stored status annotation."""
    privileged = {"name": "app", "image": "example/app:1",
                  "securityContext": {"privileged": True}}
    with pytest.raises(ApiException) as info:
        _create(api_client, OPTED, {**_pod("priv"), "spec": {"containers": [privileged]}})
    assert info.value.status == 400 and 'container \\"app\\" is privileged' in info.value.body
    pod = _create(api_client, OPTED, {
        **_pod("priv-strip", {"tsnet2.io/audit-bypass-policy": "strip"}),
        "spec": {"containers": [privileged]}})
    assert pod["spec"]["containers"][0]["securityContext"]["privileged"] is False
    status = json.loads(pod["metadata"]["annotations"]["tsnet2.io/status"])
    assert [(s["container"], s["setting"]) for s in status["stripped"]] == [("app", "privileged")]


def test_debug_container_of_a_pod_without_sidecar_is_left_alone(
    operator: InjectorMetrics, api_client: k8s.ApiClient
) -> None:
    """The ephemeral webhook sees every namespace, but a pod without tsnet2d is not ours."""
    _create(api_client, PLAIN, _pod("dbg-plain"))
    before = operator.value("skipped", "no_sidecar")
    stored, _warnings = _debug(api_client, PLAIN, "dbg-plain", {
        "name": "debugger", "image": "busybox:1",
        "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}}})
    assert _ephemeral(stored, "debugger")["securityContext"] == {
        "capabilities": {"add": ["SYS_PTRACE"]}}
    assert operator.value("skipped", "no_sidecar") == before + 1
