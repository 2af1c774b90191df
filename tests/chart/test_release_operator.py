"""The operator of a Helm release, run for real, with pods created through its webhook.

``helm install`` puts the chart into a real API server started with
``--enable-aggregator-routing``: the API server then calls a webhook Service at an address of
the Service's EndpointSlice instead of its ClusterIP (which is not on this machine). The test
plays the kubelet for one operator pod: it runs ``python -m tsnet2_operator`` with the
Deployment's args and env, its ConfigMap and Secret volumes written out under a temporary
root, and a token of the release's ServiceAccount, so the operator has exactly the chart's
RBAC. Its webhook listens on an address of a veth interface the test creates (an
EndpointSlice may not name a loopback address), and the EndpointSlice names that address:
the API server's calls stay on this machine.

Then real pods are created (no kubelet: they stay Pending) and the chart's selectors and
failure policies are checked as the API server applies them: opted-in namespaces, the
pod-annotation opt-in elsewhere, kube-system and the release namespace never sent, the
``tsnet2.io/inject=disabled`` objectSelector, ``Fail`` vs ``Ignore`` with the operator down,
and ``kubectl debug``-style ephemeral containers through the chart's ``/ephemeral`` webhook.
Needs root (the veth interface) and the binaries of ``tests/k8s/build-tools.sh``.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tests.chart.conftest import CHART, NAMESPACE, RELEASE, Helm
from tests.k8s.apiserver import KubeAPIServer, admin_client, free_port, running_apiserver
from tests.k8s.operator_process import OperatorRun, create_pod, http_ok
from tests.require import needs
from tsnet2.node.wgkey import WireguardKey

REPO = Path(__file__).resolve().parents[2]
FULLNAME = f"{RELEASE}-tsnet2"
PEERING = f"{FULLNAME}-{NAMESPACE}"
OPTED_IN_NS = "apps-in"  # labelled tsnet2.io/inject=enabled
PLAIN_NS = "apps-plain"  # not labelled: only annotated pods are injected
INJECT = {"tsnet2.io/inject": "enabled"}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason=needs("root", "needs root: the webhook listens on a veth interface's address"),
)


@pytest.fixture(scope="module")
def apiserver() -> Iterator[KubeAPIServer]:
    """An API server that resolves webhook Services through their EndpointSlices."""
    with running_apiserver(["--enable-aggregator-routing=true"]) as api:
        yield api


@pytest.fixture(scope="module")
def api_client(apiserver: KubeAPIServer) -> Iterator[k8s.ApiClient]:
    """An admin client."""
    with admin_client(apiserver) as api:
        yield api


@pytest.fixture(scope="module")
def webhook_ip() -> Iterator[str]:
    """An address (TEST-NET-2) of this test's own: on the outer end of a veth pair whose
    other end sits in a network namespace made for it (no dummy module on every kernel).
    The namespace goes afterwards, and the pair with it."""
    tag = f"{random.randrange(1 << 16):04x}"
    ifname, netns = f"t2wh{tag}", f"tsnet2-wh-{tag}"
    taken = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True,
                           check=True).stdout
    ip = next(a for a in (f"198.51.100.{n}" for n in random.sample(range(1, 255), 254))
              if f" {a}/" not in taken)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "link", "add", ifname, "type", "veth", "peer", "name", "eth0",
                        "netns", netns], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up"], check=True)
        subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", ifname], check=True)
        subprocess.run(["ip", "link", "set", ifname, "up"], check=True)
        yield ip
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=True)
        subprocess.run(["ip", "link", "del", ifname], capture_output=True, check=False)


def _objects(manifest: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all(manifest) if d}


@pytest.fixture(scope="module")
def release(
    helm: Helm, apiserver: KubeAPIServer, api_client: k8s.ApiClient
) -> Iterator[dict[tuple[str, str], dict[str, Any]]]:
    """The chart installed with its defaults (webhook timeout 5 s); its objects by
    (kind, name). Uninstalled afterwards."""
    core = k8s.CoreV1Api(api_client)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=NAMESPACE)))
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(
        name=OPTED_IN_NS, labels={"tsnet2.io/inject": "enabled"})))
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=PLAIN_NS)))
    cluster_helm = helm.with_kubeconfig(apiserver.kubeconfig)
    cluster_helm.run("install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                     "--set", "webhook.timeoutSeconds=5")
    try:
        yield _objects(cluster_helm.run("get", "manifest", RELEASE, "--namespace", NAMESPACE))
    finally:
        cluster_helm.run("uninstall", RELEASE, "--namespace", NAMESPACE)


@dataclass
class Operator(OperatorRun):
    """The release's operator, run as a local process."""

    liveness: str
    control_url: str
    metrics_url: str


def _materialise_volumes(
    api: k8s.ApiClient, pod_spec: dict[str, Any], container: dict[str, Any], root: Path
) -> None:
    """Write the container's ConfigMap and Secret volumes under ``root`` + mountPath, as
    the kubelet would (every key a file)."""
    core = k8s.CoreV1Api(api)
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            data = core.read_namespaced_config_map(volume["configMap"]["name"], NAMESPACE).data
            files = {k: v.encode() for k, v in data.items()}
        elif "secret" in volume:
            data = core.read_namespaced_secret(volume["secret"]["secretName"], NAMESPACE).data
            files = {k: base64.b64decode(v) for k, v in data.items()}
        else:
            continue  # emptyDir: the directory is enough
        for key, content in files.items():
            (target / key).write_bytes(content)


def _rebase_paths(config_file: Path, root: Path) -> None:
    """Point the config's absolute file paths into ``root``; each must exist there (a path
    the chart's config names but does not mount is a chart bug)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key, value in config.items():
        if isinstance(value, str) and value.startswith("/"):
            rebased = root / value.lstrip("/")
            assert rebased.is_file(), f"config {key}={value}: not mounted by the Deployment"
            config[key] = str(rebased)
    config_file.write_text(json.dumps(config), encoding="utf-8")


def _token_kubeconfig(api: k8s.ApiClient, apiserver: KubeAPIServer, sa: str, path: Path) -> None:
    """A kubeconfig authenticating as the ServiceAccount ``sa`` (a TokenRequest token)."""
    issued = k8s.CoreV1Api(api).create_namespaced_service_account_token(
        sa, NAMESPACE,
        k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(expiration_seconds=3600)))
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": apiserver.url, "certificate-authority": str(apiserver.ca_file)}}],
        "users": [{"name": sa, "user": {"token": issued.status.token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": sa}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


def _env(container: dict[str, Any], root: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            value = var["value"]
            env[var["name"]] = str(root / value.lstrip("/")) if value.startswith("/") else value
        else:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert field == "metadata.namespace", f"unexpected downward API field {field}"
            env[var["name"]] = NAMESPACE
    return env


def _add_endpoint_slice(api: k8s.ApiClient, service: dict[str, Any], ip: str,
                        container: dict[str, Any]) -> None:
    """What the EndpointSlice controller would write for one ready operator pod at ``ip``."""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    body = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{service['metadata']['name']}-local", "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": service["metadata"]["name"]}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
        "ports": [{"name": p["name"], "port": ports[p["targetPort"]], "protocol": "TCP"}
                  for p in service["spec"]["ports"]],
    }
    k8s.DiscoveryV1Api(api).create_namespaced_endpoint_slice(NAMESPACE, body)


@pytest.fixture(scope="module")
def operator(
    release: dict[tuple[str, str], dict[str, Any]],
    apiserver: KubeAPIServer,
    api_client: k8s.ApiClient,
    webhook_ip: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Operator]:
    """The release's operator pod, played by a local process (see the module doc)."""
    tmp = tmp_path_factory.mktemp("release-operator")
    root = tmp / "root"
    deployment = release[("Deployment", f"{FULLNAME}-operator")]
    pod_spec = deployment["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert container["command"] == ["tsnet2-operator"]
    _materialise_volumes(api_client, pod_spec, container, root)
    env = _env(container, root)
    _rebase_paths(Path(env["TSNET2_OPERATOR_CONFIG"]), root)
    kubeconfig = tmp / "kubeconfig"
    _token_kubeconfig(api_client, apiserver, pod_spec["serviceAccountName"], kubeconfig)
    _add_endpoint_slice(api_client, release[("Service", f"{FULLNAME}-webhook")], webhook_ip,
                        container)
    control_port, metrics_port, live_port = free_port(), free_port(), free_port()
    args = list(container["args"])
    liveness = f"http://127.0.0.1:{live_port}/healthz"
    args[args.index("--liveness") + 1] = liveness
    env.update({
        # Where this "pod" listens: its addresses, not 0.0.0.0 of the host.
        "TSNET2_WEBHOOK_ADDR": webhook_ip,
        "TSNET2_CONTROL_ADDR": f"127.0.0.1:{control_port}",
        "TSNET2_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
        "KUBECONFIG": str(kubeconfig),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "operator")]),
    })
    log_path = tmp / "operator.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "tsnet2_operator", "--verbose", *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
            start_new_session=True,
        )
    op = Operator(popen, log_path, liveness, f"http://127.0.0.1:{control_port}",
                  f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        took = op.wait(lambda: http_ok(liveness) and http_ok(f"{op.control_url}/healthz"),
                       60, "liveness and the control server's /healthz")
        print(f"release operator ready after {took:.1f}s")
        yield op
    finally:
        op.stop()


def _injected(pod: dict[str, Any]) -> bool:
    spec = pod["spec"]
    names = [c["name"] for c in spec.get("initContainers", []) + spec["containers"]]
    has_status = "tsnet2.io/status" in (pod["metadata"].get("annotations") or {})
    assert ("tsnet2d" in names) is has_status, "sidecar and status annotation go together"
    return "tsnet2d" in names


def _webhook_calls(op: Operator) -> float:
    """tsnet2_injector_requests_total summed over every (result, reason)."""
    with urllib.request.urlopen(op.metrics_url, timeout=5) as resp:
        text = resp.read(1 << 20).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tsnet2_injector_requests_total{"))


def test_operator_creates_its_peering_object(operator: Operator,
                                             api_client: k8s.ApiClient) -> None:
    """The chart installs kopf's CRD but no peering object: the operator creates it (with the
    chart's RBAC) and takes part in the peering."""
    custom = k8s.CustomObjectsApi(api_client)

    def present() -> bool:
        try:
            custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", PEERING)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    operator.wait(present, 30, f"the peering object {PEERING}")

    def announced() -> bool:
        obj = custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", PEERING)
        return bool(obj.get("status"))

    operator.wait(announced, 30, "the operator's record in the peering object's status")


def test_opted_in_namespace_is_injected(operator: Operator, api_client: k8s.ApiClient) -> None:
    """A pod of a namespace labelled tsnet2.io/inject=enabled gets the sidecar (the webhook
    with failurePolicy Fail, reached through the EndpointSlice)."""
    pod = create_pod(api_client, OPTED_IN_NS, "web")
    assert _injected(pod)
    env = {e["name"]: e.get("value") for c in pod["spec"].get("initContainers", [])
           + pod["spec"]["containers"] if c["name"] == "tsnet2d" for e in c.get("env", [])}
    assert env.get("TS_CONTROL_URL") == f"http://{FULLNAME}-control.{NAMESPACE}.svc:80"


def test_annotated_pod_elsewhere_is_injected(operator: Operator,
                                             api_client: k8s.ApiClient) -> None:
    """Outside opted-in namespaces the pod annotation opts in; without it, nothing."""
    assert _injected(create_pod(api_client, PLAIN_NS, "annotated", annotations=INJECT))
    assert not _injected(create_pod(api_client, PLAIN_NS, "plain"))


def test_excluded_pods_never_reach_the_webhook(operator: Operator,
                                               api_client: k8s.ApiClient) -> None:
    """kube-system, the release namespace and pods labelled tsnet2.io/inject=disabled are
    not sent to the webhook at all (the injector's request counter does not move), even
    when annotated."""
    before = _webhook_calls(operator)
    assert not _injected(create_pod(api_client, "kube-system", "sys", annotations=INJECT))
    assert not _injected(create_pod(api_client, NAMESPACE, "own", annotations=INJECT))
    assert not _injected(create_pod(api_client, OPTED_IN_NS, "optout", annotations=INJECT,
                                     labels={"tsnet2.io/inject": "disabled"}))
    assert _webhook_calls(operator) == before
    create_pod(api_client, PLAIN_NS, "counted", annotations=INJECT)
    assert _webhook_calls(operator) > before  # the counter does count calls


def test_release_rbac_is_enough(operator: Operator, api_client: k8s.ApiClient) -> None:
    """With only the chart's RBAC, the watch handlers create a persistent pod's state claim
    and the control server authenticates a pod token (TokenReview) and stores its node."""
    core = k8s.CoreV1Api(api_client)
    pod = create_pod(api_client, OPTED_IN_NS, "db",
                      annotations={"tsnet2.io/state": "persistent"})
    assert _injected(pod)

    def claimed() -> bool:
        claims = core.list_namespaced_persistent_volume_claim(OPTED_IN_NS).items
        return any(c.metadata.name == "tsnet2-state-db" for c in claims)

    took = operator.wait(claimed, 30, "the state claim tsnet2-state-db")
    print(f"state claim created {took:.2f}s after the pod")
    core.create_namespaced_service_account(
        OPTED_IN_NS, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="default")))
    token = core.create_namespaced_service_account_token("default", OPTED_IN_NS,
        k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(
            audiences=["tsnet2"], expiration_seconds=600,
            bound_object_ref=k8s.V1BoundObjectReference(
                api_version="v1", kind="Pod", name="db", uid=pod["metadata"]["uid"])))
    ).status.token
    request = urllib.request.Request(
        f"{operator.control_url}/v1/register",
        data=json.dumps({"public_key": str(WireguardKey.generate().public_key()),
                         "hostname": "db"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        reply = json.loads(resp.read(1 << 20))
    assert reply["node"]["name"] == "db" and reply["node"]["ephemeral"] is False
    # The node's certificate: the first one creates the tailnet CA Secret (get + create on
    # Secrets in the release namespace, by the chart's Role).
    fqdn = reply["node"]["fqdn"].rstrip(".")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, fqdn)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(fqdn)]), critical=False)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    request = urllib.request.Request(
        f"{operator.control_url}/v1/cert", data=json.dumps({"csr": csr}).encode(),
        headers={"Authorization": f"Bearer {reply['node_credential']}",
                 "Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        chain = json.loads(resp.read(1 << 20))["cert_chain"]
    with urllib.request.urlopen(f"{operator.control_url}/v1/ca", timeout=30) as resp:
        ca_pem = resp.read(1 << 20).decode()
    assert chain.endswith(ca_pem) and chain.count("BEGIN CERTIFICATE") == 2
    secret = core.read_namespaced_secret("tsnet2-tailnet-ca", NAMESPACE)
    assert base64.b64decode(secret.data["tls.crt"]).decode() == ca_pem
    log = operator.log()
    assert "Forbidden" not in log and " 403" not in log, log[-6000:]


def _debug(api: k8s.ApiClient, namespace: str, pod: str, container: dict[str, Any]) -> None:
    """Add an ephemeral container as kubectl debug does (``pods/ephemeralcontainers``)."""
    k8s.CoreV1Api(api).patch_namespaced_pod_ephemeralcontainers(
        pod, namespace, {"spec": {"ephemeralContainers": [container]}},
        _content_type="application/strategic-merge-patch+json")


def test_debug_containers_go_through_the_charts_webhook(operator: Operator,
                                                        api_client: k8s.ApiClient) -> None:
    """The chart routes UPDATE pods/ephemeralcontainers to the operator's /ephemeral with no
    objectSelector: on an injected pod a SYS_PTRACE debug container is refused even after the
    pod was labelled tsnet2.io/inject=disabled (which keeps pod *creation* away from the
    webhook); a harmless one is admitted with NET_RAW dropped."""
    core = k8s.CoreV1Api(api_client)
    assert _injected(create_pod(api_client, PLAIN_NS, "debugged", annotations=INJECT))
    core.patch_namespaced_pod("debugged", PLAIN_NS,
                              {"metadata": {"labels": {"tsnet2.io/inject": "disabled"}}})
    with pytest.raises(ApiException) as info:
        _debug(api_client, PLAIN_NS, "debugged", {
            "name": "general", "image": "busybox:1",
            "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}}})
    assert info.value.status == 400
    assert 'container \\"general\\" adds capability SYS_PTRACE' in info.value.body
    _debug(api_client, PLAIN_NS, "debugged", {"name": "baseline", "image": "busybox:1"})
    (stored,) = core.read_namespaced_pod("debugged", PLAIN_NS).spec.ephemeral_containers
    assert stored.name == "baseline"
    assert stored.security_context.capabilities.drop == ["NET_RAW"]


def test_failure_policies_with_the_operator_down(operator: Operator,
                                                 api_client: k8s.ApiClient) -> None:
    """Operator down: opted-in namespaces get no un-injected pod (Fail); an annotated pod
    elsewhere is admitted without the sidecar (Ignore); no debug container is added to an
    injected pod unchecked (the ephemeral webhook's Fail)."""
    assert _injected(create_pod(api_client, PLAIN_NS, "before-outage", annotations=INJECT))
    assert operator.stop() == 0
    with pytest.raises(ApiException) as info:
        create_pod(api_client, OPTED_IN_NS, "refused")
    assert info.value.status == 500 and "failed calling webhook" in str(info.value.body)
    assert not _injected(create_pod(api_client, PLAIN_NS, "admitted", annotations=INJECT))
    with pytest.raises(ApiException) as info:
        _debug(api_client, PLAIN_NS, "before-outage", {"name": "dbg", "image": "busybox:1"})
    assert info.value.status == 500 and "ephemeral.inject.tsnet2.io" in str(info.value.body)
    assert "Traceback" not in operator.log(), operator.log()[-6000:]
