"""The end-to-end suite on a real Kubernetes cluster: one suite, two cluster drivers.

* **local** (default; part of ``make test``): a single-node cluster with a real kubelet,
  containerd, kube-proxy and CoreDNS inside a network namespace of its own
  (tests/e2e/cluster/; ``make cluster-up`` / ``make cluster-down`` by hand);
* **kind** (``make e2e-kind``, ``TSNET2_E2E_KIND=1``): a throwaway kind cluster on a Docker
  engine (tests/e2e/kind/).

One cluster for the module. In order, as a user meets the product:

1. the README's ``helm install``, verbatim (only the image repository and tag set); the
   operator becomes Available; the commands ``helm status`` prints (NOTES) work;
2. two annotated workloads, a persistent StatefulSet and an ephemeral Deployment with
   non-root apps, get the (native) sidecar, go Ready and echo over the tailnet by hostname;
   WhoIs names the caller; their ``TailnetNode`` objects exist;
3. the server's traffic log leaves the pod through its container log: the kubelet's CRI
   file on the node (what a log collector reads) holds the flow and passes ``tsnet2 log
   verify`` as it is; the server's sink is ``both``, and the file in its state volume holds
   the same records; its ``/metrics``, scraped over the pod network by a pod (as Prometheus
   would), agree;
4. ``kubectl exec`` of ``tsnet2 status`` / ``tsnet2 whois`` into the app container, and a
   second client process in it, leave the pod serving (the sidecar is a shared service);
5. the operator's pods are deleted: the pods keep talking meanwhile; the new operator
   injects and coordinates (a new pod joins and talks);
6. a rolling update of the persistent server keeps its identity (same node, key and IP, no
   ``-1`` hostname), and its log's chain: what a collector following the old pod's container
   log got verifies whole and ends in the ``close`` checkpoint the new daemon's ``start``
   continues from; deleting the ephemeral client's pod while a flow is open loses nothing a
   collector following its container log already held (every open has its close, the
   chain ends in a ``close`` checkpoint), and removes its node;
7. ``helm upgrade`` with a changed value (the operator's uid: any uid works); then apps that
   don't import tsnet2: a stock ``python3 -m http.server`` served on the tailnet by
   ``tsnet2.io/serve``, reached by an unmodified client through its sidecar's egress proxy
   (``tsnet2.io/egress``) by tailnet name, which its resolver (``tsnet2.io/dns``, with the
   chart's ``dns.upstream`` set by a second upgrade) answers too; both traffic logs hold
   the flows;
8. TLS and UDP between two more pods (issue 15): sidecars that got their certificates on
   their own, ``listen_tls`` reached by ``ssl`` trusting only ``$TSNET2_CA_BUNDLE`` (the
   server's log has the plaintext), a UDP echo whose records count every datagram; and
   ``helm uninstall``, which leaves only what charts/tsnet2/README.md says it leaves.

The skip message says what is missing; with ``TSNET2_REQUIRE`` naming ``cluster`` (as
``.ci/run`` sets it) a missing part fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from kubernetes import client as k8s

from tests.e2e import checks, manifests, podlogs
from tests.e2e.cluster import driver as local
from tests.e2e.kind import cluster as kind
from tests.e2e.kube import (
    KubeError,
    create,
    describe,
    exec_in,
    get,
    list_pods,
    node_summary,
    pod_logs,
    pod_ready,
    request,
    strategic_patch,
    tailnet_nodes,
    wait_for,
)
from tests.image import apps
from tests.require import needs
from tsnet2.proto import tailscale

REPO = Path(__file__).resolve().parents[2]
KIND = os.environ.get(kind.OPT_IN_ENV) == "1"
_skip = kind.why_skip() if KIND else local.why_skip()
pytestmark = [
    pytest.mark.skipif(_skip is not None, reason=needs("cluster", _skip or "")),
    # The first test's time includes bringing the cluster up (and, on kind, the image build).
    pytest.mark.timeout(1800),
]

NS = manifests.APPS_NAMESPACE
RELEASE = kind.RELEASE
OPERATOR_NS = kind.OPERATOR_NAMESPACE
OPERATOR = f"{RELEASE}-operator"
SIDECAR = "tsnet2d"
TRAFFIC_LOG = "/var/lib/tsnet2/traffic.jsonl"  # the file sink (tsnet2.io/traffic-log-sink)
TSNET2 = Path(sys.executable).with_name("tsnet2")  # the CLI of the tree under test
METRICS_PORT = 9464
SERVER_SELECTOR = f"app.kubernetes.io/name={manifests.SERVER}"
CLIENT_SELECTOR = f"app.kubernetes.io/name={manifests.CLIENT}"
RELEASE_SELECTOR = f"app.kubernetes.io/instance={RELEASE}"
APP_WAIT = 300.0
GC_WAIT = 90.0  # pod DELETED event: at once; the sweep: every 10 s
SCRAPER_NS = "default"  # not opted in: the scraper is a plain pod
KEEP_ENV = "TSNET2_E2E_KEEP"  # 1: leave the release and the apps for a look (local driver)


class Cluster(Protocol):
    """What the suite needs of a cluster driver (local.LocalCluster, kind.KindCluster)."""

    driver: str
    image: str
    image_repository: str
    image_tag: str
    sidecar_image: str  # the sidecar image, where the chart finds it by default
    kubeconfig: Path

    def prepare_image(self) -> None: ...
    def helm(self, *argv: str, timeout: float = 300) -> str: ...
    def kubectl_argv(self) -> list[str]: ...
    def api_client(self) -> Any: ...
    def read_container_log(self, namespace: str, pod: str, uid: str, container: str) -> str: ...
    def follow_container_log(self, namespace: str, pod: str, uid: str,
                             container: str) -> podlogs.Follower: ...


def readme_helm_install(repository: str, tag: str) -> list[str]:
    """The ``helm install`` command of README.md's Kubernetes section, word for word, with
    ``REGISTRY/tsnet2`` and ``0.1.0`` replaced by the image the cluster has."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Kubernetes"):]
    found = re.search(r"^helm install .*?[^\\]$", section, re.M | re.S)
    assert found, "README.md's Kubernetes section has no `helm install` command"
    command = found.group(0).replace("\\\n", " ")
    assert "REGISTRY/tsnet2" in command and "0.1.0" in command, command
    command = command.replace("REGISTRY/tsnet2", repository).replace("0.1.0", tag)
    argv = shlex.split(command)
    assert argv[:2] == ["helm", "install"], argv
    return argv[1:]


@dataclass
class Env:
    """The running cluster with the chart installed, as the tests see it."""

    cluster: Cluster
    api: k8s.ApiClient
    domain: str

    def kubectl(self, *argv: str, timeout: float = 120) -> str:
        """Run kubectl against the cluster; its stdout (fails with its stderr)."""
        cmd = [*self.cluster.kubectl_argv(), *argv]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`kubectl {' '.join(argv)}` ran over {timeout:.0f}s") from None
        assert proc.returncode == 0, f"`kubectl {' '.join(argv)}` exited {proc.returncode}: " \
                                     f"{proc.stderr[-2000:]}"
        return proc.stdout

    def exec(self, pod: str, container: str, argv: list[str], timeout: float = 60) -> str:
        """``kubectl exec`` in a container of an apps' pod; its stdout."""
        return exec_in(self.cluster.kubectl_argv(), NS, pod, container, argv, timeout)

    def detail(self) -> str:
        """Pods and events of the apps' and the operator's namespaces, and the nodes."""
        try:
            nodes = "\n".join(node_summary(n) for n in tailnet_nodes(self.api, OPERATOR_NS))
        except KubeError as exc:
            nodes = str(exc)
        return (f"{describe(self.api, NS)}\n{describe(self.api, OPERATOR_NS)}\n"
                f"-- tailnet nodes\n{nodes}")

    def logs(self, pod: str, container: str = manifests.APP_CONTAINER) -> str:
        """A container's log."""
        return pod_logs(self.api, NS, pod, container)

    def results(self, pod: str) -> list[dict[str, Any]]:
        """Every ``RESULT`` line of a pod's app so far."""
        return checks.results_of(self.logs(pod))

    def container_log(self, pod: str, uid: str = "") -> str:
        """The sidecar's container log as the node holds it (the kubelet's CRI files, oldest
        first): what a log collector reads."""
        uid = uid or _uid(get(self.api, "v1", "Pod", pod, NS))
        return self.cluster.read_container_log(NS, pod, uid, SIDECAR)

    def follow(self, pod: dict[str, Any]) -> podlogs.Follower:
        """Follow the sidecar's container log on the node, as a collector does."""
        return self.cluster.follow_container_log(NS, _name(pod), _uid(pod), SIDECAR)

    def traffic(self, pod: str) -> list[dict[str, Any]]:
        """The pod's traffic log: the sidecar's standard output (the default sink), from its
        container log on the node."""
        return checks.traffic_records(checks.cri_stdout(self.container_log(pod)))

    def traffic_file(self, pod: str) -> list[dict[str, Any]]:
        """The pod's traffic-log file (sink ``file`` or ``both``; read in its sidecar)."""
        return checks.traffic_records(self.exec(pod, SIDECAR, ["cat", TRAFFIC_LOG]))

    def server(self) -> dict[str, Any]:
        """The server's pod, once it is the only one and ready."""
        return wait_for(lambda: _one_pod(self, SERVER_SELECTOR), APP_WAIT, "the server pod",
                        self.detail)

    def client(self) -> dict[str, Any]:
        """The client Deployment's pod, once it is the only one and ready."""
        return wait_for(lambda: _one_pod(self, CLIENT_SELECTOR), APP_WAIT, "the client pod",
                        self.detail)

    def ping(self, pod: str, target: str, message: str) -> str:
        """A second client process in ``pod``'s app container (``kubectl exec``): dial
        ``target`` through the pod's sidecar, send ``message``, return the reply."""
        out = self.exec(pod, manifests.APP_CONTAINER,
                        ["python3", "-c", apps.PING, target, message])
        return str(json.loads(out.strip().splitlines()[-1])["reply"])


def verify_log(text: str, *, key: str, allow_open: bool = False) -> str:
    """``tsnet2 log verify --key KEY`` (the CLI of the tree under test, on the host) over
    collected text; its report. Fails with the report unless it exits 0."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "collected.log"
        path.write_text(text, encoding="utf-8")
        argv = [str(TSNET2), "log", "verify", "--key", key,
                *(["--allow-open"] if allow_open else []), str(path)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                              stdin=subprocess.DEVNULL)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, (f"`tsnet2 log verify` exited {proc.returncode}:\n"
                                  f"{report[-4000:]}\ncollected (tail):\n{text[-3000:]}")
    return report


def log_key(env: Env, pod: str, *, asked_from: str) -> str:
    """``pod``'s traffic-log public key as the tailnet knows it: ``tsnet2 whois`` run in
    another pod's app container (the control server's record, not the pod's own word)."""
    who = json.loads(env.exec(asked_from, manifests.APP_CONTAINER,
                              ["tsnet2", "whois", pod, "--json"]))
    key = tailscale.traffic_log_key(who["Node"].get("CapMap"))
    assert key, who["Node"]
    return key


def operator_available(api: k8s.ApiClient) -> bool:
    """The operator Deployment has all its replicas available and up to date."""
    dep = get(api, "apps/v1", "Deployment", OPERATOR, OPERATOR_NS)
    want = int(dep["spec"].get("replicas", 1))
    status = dep.get("status", {})
    return (want > 0 and status.get("availableReplicas") == want
            and status.get("updatedReplicas") == want
            and status.get("observedGeneration") == dep["metadata"]["generation"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The cluster of the chosen driver, up for the module, down afterwards."""
    workdir = tmp_path_factory.mktemp("cluster")
    if KIND:
        with kind.KindCluster(kind.Tools.find(), workdir) as c:
            yield c
    else:
        with local.LocalCluster(workdir) as lc:
            yield lc


def _cleanup(cluster: Cluster, api: k8s.ApiClient) -> None:
    """Remove what the suite made, also on a reused developer cluster: the release first (no
    operator may write tailnet state meanwhile), then the apps' and the operator's namespaces
    (with them every tsnet2.io object: nodes and the name and address claims), and wait until
    they are gone."""
    try:
        cluster.helm("uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait",
                     timeout=300)
    except kind.ClusterError as exc:
        if "not found" not in str(exc):
            raise
    paths = [f"/api/v1/namespaces/{NS}", f"/api/v1/namespaces/{OPERATOR_NS}",
             f"/api/v1/namespaces/{SCRAPER_NS}/pods/metrics-scraper"]
    for path in paths:
        try:
            request(api, "DELETE", path)
        except KubeError as exc:
            if exc.status != 404:
                raise
    for path in paths:
        wait_for(lambda p=path: _gone(api, p), 180, f"{path} to be deleted")


@pytest.fixture(scope="module")
def env(cluster: Cluster) -> Iterator[Env]:
    """The README's ``helm install`` done and the operator Available."""
    cluster.prepare_image()
    with cluster.api_client() as api:
        _cleanup(cluster, api)  # a developer's cluster may hold a release from a killed run
        try:
            cluster.helm(*readme_helm_install(cluster.image_repository, cluster.image_tag))
            wait_for(lambda: operator_available(api), 300,
                     "the operator Deployment to be available",
                     lambda: describe(api, OPERATOR_NS))
            cm = get(api, "v1", "ConfigMap", f"{RELEASE}-config", OPERATOR_NS)
            domain = str(json.loads(cm["data"]["config.json"])["domain"])
            kind.say(f"operator ready; tailnet domain {domain}")
            yield Env(cluster, api, domain)
        finally:
            if os.environ.get(KEEP_ENV) == "1":
                kind.say(f"{KEEP_ENV}=1: the release and the apps are left in the cluster")
            else:
                _cleanup(cluster, api)


def _gone(api: k8s.ApiClient, path: str) -> bool:
    try:
        request(api, "GET", path)
    except KubeError as exc:
        if exc.status == 404:
            return True
        raise
    return False


@pytest.fixture(scope="module")
def deployed(env: Env) -> Env:
    """The sample apps created (their pods are awaited by the tests)."""
    for obj in (manifests.apps_namespace(), manifests.server_statefulset(env.cluster.image),
                manifests.client_deployment(env.cluster.image)):
        create(env.api, obj)
    return env


def _one_pod(env: Env, selector: str, *, not_uid: str = "") -> dict[str, Any] | None:
    """The one pod of a workload, when it is ready (and is not ``not_uid``)."""
    pods = [p for p in list_pods(env.api, NS, selector)
            if p["metadata"]["uid"] != not_uid and not p["metadata"].get("deletionTimestamp")]
    return pods[0] if len(pods) == 1 and pod_ready(pods[0]) else None


def _name(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["name"])


def _uid(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["uid"])


def _served(env: Env, server_pod: str, message: str) -> dict[str, Any]:
    """The server's RESULT for the connection that sent ``message``."""
    def find() -> dict[str, Any] | None:
        hits = [r for r in env.results(server_pod) if r.get("got") == message + "\n"]
        return hits[-1] if hits else None

    return wait_for(find, 60, f"{server_pod} to answer {message!r}",
                    lambda: env.logs(server_pod))


def _exchange(env: Env, client_pod: str, server_pod: str) -> dict[str, Any]:
    """Wait for the client app's reply and the server's result; check echo and WhoIs."""
    got = wait_for(lambda: checks.result_of(env.logs(client_pod)), APP_WAIT,
                   f"{client_pod}'s reply",
                   lambda: env.logs(client_pod) + env.logs(server_pod) + env.detail())
    assert got["reply"] == f"pong: ping from {client_pod}\n", (got, env.logs(server_pod))
    seen = _served(env, server_pod, f"ping from {client_pod}")
    assert seen["error"] is None, seen
    # WhoIs names the client pod: its tailnet name is the pod name.
    assert seen["whois"]["Node"]["Name"] == f"{client_pod}.{env.domain}.", seen["whois"]
    return seen


def _server_nodes(env: Env) -> list[dict[str, Any]]:
    """Every TailnetNode that is, or could be a clone of, the server's identity."""
    host = manifests.SERVER_POD
    return [n for n in tailnet_nodes(env.api, OPERATOR_NS)
            if str(n["spec"].get("name", "")).startswith(host)
            or (n["spec"].get("pod") or {}).get("name") == host]


# ---- 1. install ---------------------------------------------------------------------------

def test_readme_install_gives_an_available_operator(env: Env) -> None:
    """The README's command installed the chart; the operator runs with the chart's
    defaults: the image's uid, no Service-link variables, Available; NOTES say true things."""
    pods = list_pods(env.api, OPERATOR_NS, f"app.kubernetes.io/component=operator,"
                     f"{RELEASE_SELECTOR}")
    assert len(pods) == 2, describe(env.api, OPERATOR_NS)  # two replicas with peering
    for pod in pods:
        spec = pod["spec"]
        assert spec["enableServiceLinks"] is False
        assert spec["securityContext"]["runAsUser"] == manifests.APP_UID
        restarts = [cs["restartCount"] for cs in pod["status"]["containerStatuses"]]
        assert restarts == [0], describe(env.api, OPERATOR_NS)  # no crash loop
    notes = env.cluster.helm("status", RELEASE, "--namespace", OPERATOR_NS)
    assert "STATUS: deployed" in notes, notes
    # The README's install sets the operator's image only: the sidecar is the sidecar image.
    assert f"Sidecar: {env.cluster.sidecar_image}, backend userspace" in notes, notes
    # NOTES step 1: the rollout command it prints works.
    step1 = re.search(r"^\s+(kubectl -n \S+ rollout status deployment/\S+)$", notes, re.M)
    assert step1, notes
    out = env.kubectl(*shlex.split(step1.group(1))[1:], "--timeout=120s")
    assert "successfully rolled out" in out, out
    logs = env.kubectl("-n", OPERATOR_NS, "logs", f"deployment/{OPERATOR}")
    assert "Traceback" not in logs, logs[-3000:]


# ---- 2. two workloads ---------------------------------------------------------------------

def test_two_workloads_get_the_sidecar_and_talk(deployed: Env) -> None:
    env = deployed
    server, client = env.server(), env.client()
    srv, cli = _name(server), _name(client)
    assert srv == manifests.SERVER_POD
    for pod in (server, client):
        # Injected through the webhook, as a native sidecar (an init container that keeps
        # running) on this Kubernetes; the app runs as the non-root uid it asked for.
        status = json.loads(pod["metadata"]["annotations"]["tsnet2.io/status"])
        assert status["initContainers"] + status["containers"] == [SIDECAR], status
        (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == SIDECAR]
        assert sidecar["restartPolicy"] == "Always", sidecar
        assert sidecar["image"] == env.cluster.sidecar_image, sidecar
        app = next(c for c in pod["spec"]["containers"] if c["name"] == "app")
        assert app["securityContext"]["runAsUser"] == manifests.APP_UID
    claims = [v["persistentVolumeClaim"]["claimName"] for v in server["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [f"tsnet2-state-{srv}"], server["spec"]["volumes"]
    pvc = get(env.api, "v1", "PersistentVolumeClaim", claims[0], NS)
    assert pvc["status"]["phase"] == "Bound", pvc["status"]
    assert not [v for v in client["spec"]["volumes"] if "persistentVolumeClaim" in v]

    _exchange(env, cli, srv)

    # NOTES step 3, as printed: the status annotation, the Injected event, the nodes.
    jsonpath = env.kubectl("-n", NS, "get", "pod", srv, "-o",
                           r"jsonpath={.metadata.annotations.tsnet2\.io/status}")
    assert json.loads(jsonpath)["containers"] + json.loads(jsonpath)["initContainers"] == [
        SIDECAR]
    events = env.kubectl("-n", NS, "get", "events", "--field-selector",
                         f"involvedObject.name={srv},reason=Injected")
    assert f"pod {srv}: added sidecar tsnet2d (native)" in events, events
    # The client's name was generated: its Event is on its ReplicaSet, as NOTES say.
    (owner,) = client["metadata"]["ownerReferences"]
    events = env.kubectl("-n", NS, "get", "events", "--field-selector",
                         f"involvedObject.name={owner['name']},reason=Injected")
    assert f"pod {owner['name']}-<new pod>: added sidecar tsnet2d (native)" in events, events
    listed = env.kubectl("-n", OPERATOR_NS, "get", "tailnetnodes")
    nodes = tailnet_nodes(env.api, OPERATOR_NS)
    by_pod = {(n["spec"].get("pod") or {}).get("name"): n for n in nodes}
    assert by_pod[srv]["spec"]["ephemeral"] is False, node_summary(by_pod[srv])
    assert by_pod[cli]["spec"]["ephemeral"] is True, node_summary(by_pod[cli])
    for n in (by_pod[srv], by_pod[cli]):
        assert n["metadata"]["name"] in listed, listed


def _scrape(env: Env, pod_ip: str) -> str:
    """GET http://POD_IP:9464/metrics from a pod of its own, over the pod network (the way
    Prometheus scrapes the sidecar's container port); the body."""
    name = "metrics-scraper"
    code = ("import sys, urllib.request as u; sys.stdout.write(u.urlopen("
            f"'http://{pod_ip}:{METRICS_PORT}/metrics', timeout=20).read().decode())")
    create(env.api, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": SCRAPER_NS},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "scrape", "image": env.cluster.image, "imagePullPolicy": "IfNotPresent",
            "command": ["python3", "-c", code],
            "securityContext": {"runAsUser": manifests.APP_UID, "runAsNonRoot": True,
                                "allowPrivilegeEscalation": False}}]},
    })
    path = f"/api/v1/namespaces/{SCRAPER_NS}/pods/{name}"
    try:
        phase = wait_for(lambda: (lambda p: p if p in ("Succeeded", "Failed") else None)(
            request(env.api, "GET", path).get("status", {}).get("phase")), 120,
            "the scraper pod to finish", lambda: describe(env.api, SCRAPER_NS))
        body = pod_logs(env.api, SCRAPER_NS, name, "scrape")
        assert phase == "Succeeded", body
        return body
    finally:
        request(env.api, "DELETE", path, query={"gracePeriodSeconds": "0"})
        wait_for(lambda: _gone(env.api, path), 60, "the scraper pod to go")


def test_traffic_log_and_metrics_from_the_running_pod(deployed: Env) -> None:
    """The server's traffic log leaves the pod through its container log: the kubelet's
    CRI file on the node (what Fluent Bit or Vector read) holds the exchange and passes
    `tsnet2 log verify` as it is; `kubectl logs` shows it too. The server's sink is `both`:
    the file in the state volume holds the same records and verifies in the sidecar. Its
    /metrics, scraped over the pod network, agree."""
    env = deployed
    server, client = env.server(), env.client()
    srv, cli = _name(server), _name(client)
    seen = _exchange(env, cli, srv)
    # The container log on the node holds the exchange, both directions, with the payload.
    flow = wait_for(lambda: (lambda f: f if f.closed else None)(
        checks.served_flow(env.traffic(srv), f"{cli}.{env.domain}.")), 30,
        "the flow's close record")
    assert flow.remote_ip == seen["remote"]
    assert flow.peer_to_app == f"ping from {cli}\n".encode()
    assert flow.app_to_peer == f"pong: ping from {cli}\n".encode()
    # The raw CRI file passes `tsnet2 log verify` as a collector found it.
    raw = env.container_log(srv, _uid(server))
    assert " stdout F {" in raw, raw[-2000:]
    key = log_key(env, srv, asked_from=cli)
    verify_log(raw, key=key, allow_open=True)
    records = checks.traffic_records(checks.cri_stdout(raw))
    assert checks.chained(records), records[-5:]
    # `kubectl logs` (the kubelet's API over the same file) shows the records; the daemon's
    # own messages go to stderr, which this merges in, so only JSON lines are records.
    shown = env.kubectl("-n", NS, "logs", srv, "-c", SIDECAR)
    api = "".join(line + "\n" for line in shown.splitlines() if line.startswith("{"))
    assert checks.served_flow(checks.traffic_records(api), f"{cli}.{env.domain}.").closed
    verify_log(shown, key=key, allow_open=True)  # as NOTES and the docs show it
    # Sink `both`: the file in the state volume has the same records and verifies in the
    # sidecar (with the sidecar's own tsnet2).
    in_file = env.traffic_file(srv)
    assert checks.served_flow(in_file, f"{cli}.{env.domain}.").closed
    problems = checks.same_records_problems(records, in_file)
    assert not problems, problems
    env.exec(srv, SIDECAR, ["tsnet2", "log", "verify", "--allow-open", TRAFFIC_LOG])
    # ... and its /metrics, scraped over the pod network, count the same flows and bytes.
    records = env.traffic(srv)
    samples = checks.metric_samples(_scrape(env, str(server["status"]["podIP"])))
    problems = checks.metrics_problems(samples, records)
    assert not problems, (problems, samples)


# ---- 3. a shared sidecar --------------------------------------------------------------------

def test_kubectl_exec_cli_leaves_the_pod_serving(deployed: Env) -> None:
    """`tsnet2 status` / `tsnet2 whois` run by `kubectl exec` in the app container (the CLI
    is one more client of the sidecar) and a second client process: the apps keep their
    node, the server keeps serving."""
    env = deployed
    server, client = env.server(), env.client()
    srv, cli = _name(server), _name(client)
    status = json.loads(env.exec(srv, "app", ["tsnet2", "status", "--json"]))
    assert status["Self"]["HostName"] == srv, status["Self"]
    assert status["BackendState"] == "Running", status
    who = json.loads(env.exec(srv, "app", ["tsnet2", "whois", cli, "--json"]))
    assert who["Node"]["Name"] == f"{cli}.{env.domain}.", who
    text = env.exec(cli, "app", ["tsnet2", "status"])
    assert srv in text, text
    # Both pods still serve: a second client process in the client pod talks to the server.
    for i in range(2):
        message = f"exec ping {i} from {cli}"
        assert env.ping(cli, f"{srv}:{manifests.APP_PORT}", message) == f"pong: {message}\n"
        assert _served(env, srv, message)["whois"]["Node"]["Name"] == f"{cli}.{env.domain}."
    # Neither pod restarted a container.
    for pod in (srv, cli):
        obj = get(env.api, "v1", "Pod", pod, NS)
        statuses = obj["status"]["containerStatuses"] + obj["status"]["initContainerStatuses"]
        assert all(cs["restartCount"] == 0 for cs in statuses), statuses


# ---- 4. the operator restarts ---------------------------------------------------------------

def test_operator_restart(deployed: Env) -> None:
    """Delete every operator pod: established pods keep talking meanwhile; the new pods
    inject and coordinate (a new pod joins and talks)."""
    env = deployed
    srv, cli = _name(env.server()), _name(env.client())
    old = {_uid(p) for p in list_pods(env.api, OPERATOR_NS, RELEASE_SELECTOR)}
    env.kubectl("-n", OPERATOR_NS, "delete", "pod", "-l",
                f"app.kubernetes.io/component=operator,{RELEASE_SELECTOR}", "--wait=false")
    message = f"during the operator restart, from {cli}"
    assert env.ping(cli, f"{srv}:{manifests.APP_PORT}", message) == f"pong: {message}\n"

    def replaced() -> bool:
        pods = list_pods(env.api, OPERATOR_NS, f"app.kubernetes.io/component=operator,"
                         f"{RELEASE_SELECTOR}")
        return (operator_available(env.api) and len(pods) == 2
                and not {_uid(p) for p in pods} & old)

    wait_for(replaced, 300, "new operator pods to be available",
             lambda: describe(env.api, OPERATOR_NS))
    # Injection and coordination work again: a new client pod gets its sidecar, joins the
    # tailnet and talks to the server. "Available" comes before the webhook answers: the
    # operator's readiness is its control server, and kopf starts the webhook server only
    # after its start-up handlers and resource discovery (a known gap, see the issue note),
    # so wait for the event itself: a dry-run create comes back injected.
    pod = manifests.client_pod("echo-client-after-restart", env.cluster.image)

    def injects() -> bool:
        try:
            made = create(env.api, pod, dry_run=True)
        except KubeError as exc:
            if exc.status == 500 and "failed calling webhook" in str(exc):
                return False
            raise
        return "tsnet2.io/status" in made["metadata"].get("annotations", {})

    wait_for(injects, 120, "the webhook to inject again", lambda: describe(env.api, OPERATOR_NS))
    create(env.api, pod)
    name = pod["metadata"]["name"]
    wait_for(lambda: pod_ready(get(env.api, "v1", "Pod", name, NS)), APP_WAIT,
             f"{name} to be ready", env.detail)
    _exchange(env, name, srv)
    request(env.api, "DELETE", f"/api/v1/namespaces/{NS}/pods/{name}")
    wait_for(lambda: _gone(env.api, f"/api/v1/namespaces/{NS}/pods/{name}"), 120,
             f"{name} to go")


# ---- 5. identity across restarts, node GC -------------------------------------------------

def test_rolling_update_keeps_the_server_identity(deployed: Env) -> None:
    env = deployed
    old = env.server()
    before = _server_nodes(env)
    assert len(before) == 1, [node_summary(n) for n in before]
    node = before[0]
    assert node["spec"]["pod"]["uid"] == _uid(old), node_summary(node)
    assert node["spec"]["ephemeral"] is False, node_summary(node)

    # A collector follows the old pod's container log through the roll.
    client = _one_pod(env, CLIENT_SELECTOR)
    assert client is not None
    key = log_key(env, _name(old), asked_from=_name(client))
    # The node's TLS key lives in the persistent state volume too (written by the sidecar
    # running in the pod's fsGroup): the new pod serves with the same key.
    tls_key = wait_for(lambda: _node_key_digest(env, _name(old)), 120,
                       "the server's TLS key", lambda: env.logs(_name(old), SIDECAR)[-3000:])
    follower = env.follow(old)
    try:
        strategic_patch(env.api, "apps/v1", "StatefulSet", manifests.SERVER,
                        manifests.restart_patch(time.strftime("%Y-%m-%dT%H:%M:%SZ")), NS)
        new = wait_for(lambda: _one_pod(env, SERVER_SELECTOR, not_uid=_uid(old)), APP_WAIT,
                       "the rolled server pod", env.detail)
        collected = follower.stop()  # the old pod is gone: the StatefulSet replaced it
    finally:
        follower.close()
    assert _name(new) == manifests.SERVER_POD
    # What the collector has of the old pod is whole and ends in the daemon's close
    # checkpoint; the new daemon's chain starts from it (persistent state).
    closing = _whole_and_closed(collected, key)
    first = checks.chained(checks.traffic_records(checks.cri_stdout(
        wait_for(lambda: (lambda t: t if " stdout F {" in t else None)(
            env.container_log(_name(new), _uid(new))), 60, "the new sidecar's first record")
    )))[0]
    assert (first["kind"], first.get("reason")) == ("checkpoint", "start"), first
    assert (first.get("prev_seq"), first.get("prev_hash")) == (
        closing["log_seq"], closing["log_hash"]), (first, closing)
    wait_for(lambda: "LISTENING" in env.logs(_name(new)), APP_WAIT,
             "the new server to listen", lambda: env.logs(_name(new)) + env.detail())

    def rebound() -> list[dict[str, Any]] | None:
        nodes = _server_nodes(env)
        bound = [n for n in nodes if (n["spec"].get("pod") or {}).get("uid") == _uid(new)]
        return nodes if bound else None

    after = wait_for(rebound, 60, "the server's node to name the new pod", env.detail)
    # One node, the same one: the new pod took the identity over from the state volume,
    # under the same name (no "echo-server-0-1").
    assert len(after) == 1, [node_summary(n) for n in after]
    same = after[0]
    assert same["metadata"]["name"] == node["metadata"]["name"], node_summary(same)
    assert same["spec"]["publicKey"] == node["spec"]["publicKey"], node_summary(same)
    assert same["spec"]["ipv4"] == node["spec"]["ipv4"], node_summary(same)
    assert same["spec"]["name"] == manifests.SERVER_POD
    status = json.loads(env.exec(_name(new), "app", ["tsnet2", "status", "--json"]))
    assert status["Self"]["HostName"] == manifests.SERVER_POD, status["Self"]
    assert _node_key_digest(env, _name(new)) == tls_key
    cert = json.loads(wait_for(lambda: _cert_shown(env, _name(new), "--json"), 60,
                               "the rolled server's certificate"))
    assert cert["names"] == [f"{manifests.SERVER_POD}.{env.domain}"], cert
    assert status["Self"]["DNSName"] == f"{manifests.SERVER_POD}.{env.domain}.", status["Self"]
    # The traffic-log file (sink `both`) lives in the state volume too: the first exchange
    # is still there; and the client reaches the new pod by the same name.
    client = _one_pod(env, CLIENT_SELECTOR)
    assert client is not None
    cli = _name(client)
    checks.served_flow(env.traffic_file(_name(new)), f"{cli}.{env.domain}.")
    message = f"after the rolling update, from {cli}"
    target = f"{manifests.SERVER_POD}:{manifests.APP_PORT}"
    reply = wait_for(lambda: _try_ping(env, cli, target, message), 60,
                     "the client to reach the rolled server")
    assert reply == f"pong: {message}\n"


def _node_key_digest(env: Env, pod: str) -> str | None:
    """SHA-256 of the node's TLS key file in the pod's sidecar (never the key itself), or
    None while there is none yet."""
    code = ("import hashlib, os, sys; p = '/var/lib/tsnet2/tls/node.key'; "
            "print(hashlib.sha256(open(p, 'rb').read()).hexdigest() if os.path.exists(p) "
            "else '')")
    return env.exec(pod, SIDECAR, ["python3", "-c", code]).strip() or None


def _whole_and_closed(collected: str, key: str) -> dict[str, Any]:
    """Check what a collector read of a deleted pod's sidecar: it passes `tsnet2 log verify`
    (checkpoints signed by ``key``) with no flow left open, and the chain ends in the
    daemon's ``close`` checkpoint (written on SIGTERM, after the close records of the flows
    it had). Returns that checkpoint."""
    verify_log(collected, key=key)
    records = checks.traffic_records(checks.cri_stdout(collected))
    assert not checks.unclosed(records), (checks.unclosed(records), records[-5:])
    chain = checks.chained(records)
    assert chain, collected[-3000:]
    last = dict(chain[-1])
    assert (last["kind"], last.get("reason")) == ("checkpoint", "close"), chain[-3:]
    return last


# Holds one flow open through the client's sidecar: the line is never finished, so the
# server keeps reading (up to its 30 s timeout) and neither side closes.
HOLD = r'''
import sys, time, tsnet2
target, message = sys.argv[1], sys.argv[2].encode()
with tsnet2.Server(join=False) as srv:
    conn = srv.dial("tcp", target, timeout=20)
    conn.sendall(message)
    print("HELD", flush=True)
    time.sleep(3600)
'''


# Sends one line longer than the runtime's 16 KiB log line: the sidecar logs it in data
# records of up to 16 KiB of payload (about 22 KB of JSON each), which the runtime splits
# into partial (P) container-log lines. The server answers after 4 KiB and closes, so the
# rest may be reset: that is fine, the flow still ends with its close.
BIG = r'''
import sys, tsnet2
target, size = sys.argv[1], int(sys.argv[2])
with tsnet2.Server(join=False) as srv:
    with srv.dial("tcp", target, timeout=20) as conn:
        conn.settimeout(30)
        try:
            conn.sendall(b"x" * size + b"\n")
            while conn.recv(65536):
                pass
        except OSError:
            pass
print("SENT", flush=True)
'''


def _try_ping(env: Env, pod: str, target: str, message: str) -> str | None:
    """:meth:`Env.ping`, or None while the peer is not reachable yet (its new endpoint
    reaches the client's netmap a little after the pod is ready)."""
    try:
        return env.ping(pod, target, message)
    except AssertionError as exc:
        if "peer_offline" in str(exc) or "no_such_peer" in str(exc) or "timed out" in str(exc):
            return None
        raise


def test_deleting_the_client_pod_removes_its_node(deployed: Env) -> None:
    env = deployed
    old = env.client()
    mine = [n for n in tailnet_nodes(env.api, OPERATOR_NS)
            if (n["spec"].get("pod") or {}).get("uid") == _uid(old)]
    assert len(mine) == 1, env.detail()
    node = mine[0]
    assert node["spec"]["ephemeral"] is True, node_summary(node)
    assert node["spec"]["name"] == _name(old)

    # The done-when of the stdout sink: a collector follows the sidecar's container log on
    # the node while a flow is open; the pod is deleted; what it collected verifies whole.
    path = f"/api/v1/namespaces/{NS}/pods/{_name(old)}"
    target = f"{manifests.SERVER_POD}:{manifests.APP_PORT}"
    key = log_key(env, _name(old), asked_from=manifests.SERVER_POD)
    follower = env.follow(old)
    # A record longer than a container-log line first: the runtime splits it into pieces.
    env.exec(_name(old), manifests.APP_CONTAINER, ["python3", "-c", BIG, target, "40000"])

    def long_flow_closed() -> bool:
        text = follower.text()
        records = checks.traffic_records(checks.cri_stdout(text))
        return " stdout P {" in text and not checks.unclosed(records)

    wait_for(long_flow_closed, 60, "the long flow's close in the container log",
             lambda: follower.text()[-3000:])
    with tempfile.TemporaryFile() as out:
        held = subprocess.Popen(
            [*env.cluster.kubectl_argv(), "exec", "-n", NS, _name(old), "-c",
             manifests.APP_CONTAINER, "--", "python3", "-c", HOLD, target,
             f"held open by {_name(old)}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            def held_open() -> list[Any]:
                return checks.unclosed(checks.traffic_records(checks.cri_stdout(
                    follower.text())))

            def detail() -> str:
                out.seek(0)
                return (f"exec: {out.read().decode('utf-8', 'replace')[-2000:]}\n"
                        f"collected: {follower.text()[-2000:]}")

            (held_id,) = wait_for(held_open, 60, "the held flow's open record", detail)
            request(env.api, "DELETE", path)
            wait_for(lambda: _gone(env.api, path), 120, f"{_name(old)} to be deleted",
                     env.detail)
            collected = follower.stop()
        finally:
            follower.close()
            if held.poll() is None:
                held.kill()
            held.wait(30)
    _whole_and_closed(collected, key)
    records = checks.traffic_records(checks.cri_stdout(collected))
    closes = [r for r in records if r.get("kind") == "close" and r.get("conn_id") == held_id]
    assert len(closes) == 1, closes
    # The long records came in pieces and were joined whole.
    assert " stdout P {" in collected, collected[-2000:]
    assert any(r.get("kind") == "data" and r.get("dir") == "app->peer" and r["len"] == 16384
               for r in records), [r for r in records if r.get("kind") == "data"]

    def gone() -> bool:
        names = {n["metadata"]["name"] for n in tailnet_nodes(env.api, OPERATOR_NS)}
        return node["metadata"]["name"] not in names

    wait_for(gone, GC_WAIT, f"node {node_summary(node)} to be removed", env.detail)

    # The Deployment's next pod joins as a node of its own and reaches the updated server.
    new = wait_for(lambda: _one_pod(env, CLIENT_SELECTOR, not_uid=_uid(old)),
                   APP_WAIT, "the next client pod", env.detail)
    _exchange(env, _name(new), manifests.SERVER_POD)
    nodes = tailnet_nodes(env.api, OPERATOR_NS)
    assert sorted(n["spec"]["name"] for n in nodes) == sorted(
        [manifests.SERVER_POD, _name(new)]), [node_summary(n) for n in nodes]


# ---- 6. upgrade, uninstall ------------------------------------------------------------------

def test_helm_upgrade_with_a_changed_value(deployed: Env) -> None:
    """Upgrade with the operator's uid changed to one the image has no passwd entry for
    (what OpenShift-style arbitrary uids do): the operator rolls, stays up and injects."""
    env = deployed
    env.cluster.helm("upgrade", RELEASE, str(kind.CHART), "--namespace", OPERATOR_NS,
                     "--reuse-values", "--set", "operator.podSecurityContext.runAsUser=65532",
                     "--set", "operator.podSecurityContext.runAsGroup=65532")

    def rolled() -> bool:
        pods = list_pods(env.api, OPERATOR_NS, f"app.kubernetes.io/component=operator,"
                         f"{RELEASE_SELECTOR}")
        return operator_available(env.api) and len(pods) == 2 and all(
            p["spec"]["securityContext"]["runAsUser"] == 65532 and pod_ready(p)
            for p in pods)

    wait_for(rolled, 300, "the upgraded operator to be available",
             lambda: describe(env.api, OPERATOR_NS))
    history = env.cluster.helm("history", RELEASE, "--namespace", OPERATOR_NS)
    assert re.search(r"^2\s.*deployed\s.*Upgrade complete", history, re.M), history
    pod = manifests.client_pod("echo-client-after-upgrade", env.cluster.image)
    create(env.api, pod)
    name = pod["metadata"]["name"]
    wait_for(lambda: pod_ready(get(env.api, "v1", "Pod", name, NS)), APP_WAIT,
             f"{name} to be ready", env.detail)
    _exchange(env, name, manifests.SERVER_POD)
    request(env.api, "DELETE", f"/api/v1/namespaces/{NS}/pods/{name}")


# ---- 7. apps that don't import tsnet2: serve, egress, DNS ------------------------------------

# Run in the plain client's app container: the standard library only, no tsnet2. Through the
# sidecar's egress proxy as TSNET2_EGRESS_PROXY names it (socks5h: the proxy resolves the
# tailnet name), then the same proxy as an HTTP proxy (absolute-form, what HTTP_PROXY
# users send); then the pod's resolver (tsnet2.io/dns): the tailnet name and a cluster name.
PLAIN_CLIENT = r'''
import json, os, socket, sys, urllib.request
name, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
proxy = os.environ["TSNET2_EGRESS_PROXY"]
assert proxy.startswith("socks5h://"), proxy
host, _, pport = proxy[len("socks5h://"):].rpartition(":")

def exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise SystemExit(f"SOCKS5: connection closed after {data!r}")
        data += chunk
    return data

out = {"egress_socket": os.environ.get("TSNET2_EGRESS_SOCKET"),
       "http_proxy_env": sorted(k for k in os.environ if k.lower() in (
           "http_proxy", "https_proxy", "all_proxy"))}
with socket.create_connection((host, int(pport)), timeout=30) as s:
    s.sendall(b"\x05\x01\x00")
    assert exactly(s, 2) == b"\x05\x00", "SOCKS5: no-auth refused"
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name.encode()
              + port.to_bytes(2, "big"))
    head = exactly(s, 4)
    if head[1] != 0:
        raise SystemExit(f"SOCKS5: CONNECT {name}:{port} failed with reply {head[1]}")
    exactly(s, {1: 4, 4: 16}.get(head[3]) or exactly(s, 1)[0])
    exactly(s, 2)
    s.sendall(f"GET {path} HTTP/1.0\r\nHost: {name}\r\n\r\n".encode())
    got = b""
    while chunk := s.recv(65536):
        got += chunk
out["socks5h"] = got.decode("utf-8", "replace")
opener = urllib.request.build_opener(
    urllib.request.ProxyHandler({"http": f"http://{host}:{pport}"}))
with opener.open(f"http://{name}:{port}{path}", timeout=30) as r:
    out["http_proxy"] = [r.status, r.read().decode("utf-8", "replace")]
def addrs(n):
    return sorted({a[4][0] for a in socket.getaddrinfo(n, 80, type=socket.SOCK_STREAM)})
out["dns_tailnet"] = addrs(name)
out["dns_tailnet_fqdn"] = addrs(sys.argv[4])
out["dns_cluster"] = addrs("kubernetes.default")
print(json.dumps(out))
'''


def _cluster_dns(env: Env, pod: str) -> str:
    """The cluster DNS server as the kubelet gives it to a ClusterFirst pod (its
    resolv.conf): what the chart's dns.upstream names."""
    conf = env.exec(pod, manifests.APP_CONTAINER, ["cat", "/etc/resolv.conf"])
    found = re.findall(r"^nameserver\s+(\S+)", conf, re.M)
    assert found, conf
    return found[0]


def _operator_pods(env: Env) -> list[dict[str, Any]]:
    return list_pods(env.api, OPERATOR_NS, f"app.kubernetes.io/component=operator,"
                     f"{RELEASE_SELECTOR}")


def test_unmodified_apps_serve_and_reach_the_tailnet(deployed: Env) -> None:
    """An unmodified web server (a stock ``python3 -m http.server`` on 127.0.0.1:8080) with
    ``tsnet2.io/serve: "80=127.0.0.1:8080"`` serves on the tailnet; an unmodified client
    with ``tsnet2.io/egress`` and ``tsnet2.io/dns`` reaches it by tailnet name through its
    sidecar's proxy (SOCKS5 by name, and HTTP absolute-form), and its resolver answers the
    tailnet name and still the cluster's names. Both sidecars' traffic logs hold the flows,
    opened and closed, with the request and the response."""
    env = deployed
    # tsnet2.io/dns forwards to the cluster DNS: the chart value, set the way an admin would
    # (the local cluster has no kube-dns Service for the operator to find).
    upstream = _cluster_dns(env, manifests.SERVER_POD)
    old = {_uid(p) for p in _operator_pods(env)}
    env.cluster.helm("upgrade", RELEASE, str(kind.CHART), "--namespace", OPERATOR_NS,
                     "--reuse-values", "--set", f"dns.upstream={upstream}")

    def rolled() -> bool:
        pods = _operator_pods(env)
        return (operator_available(env.api) and len(pods) == 2
                and not {_uid(p) for p in pods} & old)

    wait_for(rolled, 300, "the operator to roll with dns.upstream",
             lambda: describe(env.api, OPERATOR_NS))
    web, client = (manifests.plain_web_pod(env.cluster.image),
                   manifests.plain_client_pod(env.cluster.image))

    def injects() -> bool:  # the new operator's webhook answers (see test_operator_restart)
        try:
            made = create(env.api, client, dry_run=True)
        except KubeError as exc:
            if exc.status == 500 and "failed calling webhook" in str(exc):
                return False
            raise
        return "tsnet2.io/status" in made["metadata"].get("annotations", {})

    wait_for(injects, 120, "the webhook to inject again", lambda: describe(env.api, OPERATOR_NS))
    for pod in (web, client):
        create(env.api, pod)
    srv, cli = manifests.PLAIN_WEB, manifests.PLAIN_CLIENT

    def sidecar_logs() -> str:
        """The two sidecars' logs (why one does not start, e.g. a flag it does not know)."""
        out = []
        for name in (srv, cli):
            try:  # a crash-looping sidecar's last run
                text = env.kubectl("-n", NS, "logs", name, "-c", SIDECAR, "--previous")
            except AssertionError:
                try:
                    text = env.logs(name, SIDECAR)
                except KubeError as exc:
                    text = str(exc)
            out.append(f"-- {name}/{SIDECAR} log (tail)\n{text[-3000:]}")
        return "\n".join(out)

    try:
        for name in (srv, cli):
            wait_for(lambda n=name: pod_ready(get(env.api, "v1", "Pod", n, NS)), APP_WAIT,
                     f"{name} to be ready", lambda: sidecar_logs() + "\n" + env.detail())
        # What the injector made of the annotations.
        made = {n: get(env.api, "v1", "Pod", n, NS) for n in (srv, cli)}
        sidecars = {n: next(c for c in p["spec"]["initContainers"] if c["name"] == SIDECAR)
                    for n, p in made.items()}
        args = sidecars[srv]["args"]
        assert args[args.index("--serve") + 1] == "80=127.0.0.1:8080", args
        args = sidecars[cli]["args"]
        assert args[args.index("--egress-listen") + 1] == "127.0.0.1:1055", args
        assert args[args.index("--dns-upstream") + 1] == upstream, args
        assert made[cli]["spec"]["dnsPolicy"] == "None", made[cli]["spec"]
        assert made[cli]["spec"]["dnsConfig"]["nameservers"] == ["127.0.0.1"]
        app_env = {e["name"]: e.get("value") for e in made[cli]["spec"]["containers"][0]["env"]}
        assert app_env["TSNET2_EGRESS_PROXY"] == "socks5h://127.0.0.1:1055", app_env
        assert "HTTP_PROXY" not in app_env and "ALL_PROXY" not in app_env, app_env

        fqdn = f"{srv}.{env.domain}"
        path = f"/{manifests.PLAIN_FILE}"
        argv = ["python3", "-c", PLAIN_CLIENT, srv, str(manifests.PLAIN_PORT), path, fqdn]
        tries: list[str] = []

        def fetched() -> dict[str, Any] | None:
            try:
                out = env.exec(cli, manifests.APP_CONTAINER, argv, timeout=90)
            except AssertionError as exc:  # the peer may not be in the netmap yet
                tries.append(str(exc)[-1500:])
                return None
            doc: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
            return doc

        got = wait_for(fetched, 120, "the plain client to fetch through its sidecar",
                       lambda: "\n".join(tries[-2:]) + env.logs(srv) + env.detail())
        body = manifests.plain_body(srv)
        assert got["socks5h"].startswith("HTTP/1.0 200"), got
        assert got["socks5h"].endswith(body), got
        assert got["http_proxy"] == [200, body], got
        assert got["egress_socket"] == "/var/run/tsnet2/egress.sock", got
        assert got["http_proxy_env"] == [], got  # the injector sets no HTTP_PROXY & co.
        tailnet_ip = _tailnet_ipv4(env, srv)
        assert tailnet_ip in got["dns_tailnet"], (got, tailnet_ip)
        assert tailnet_ip in got["dns_tailnet_fqdn"], (got, tailnet_ip)
        assert got["dns_cluster"], got  # cluster names still resolve, forwarded upstream

        # The web server's sidecar logged both inbound flows: from the client's node, to
        # tailnet port 80, the request in and the file out, each closed.
        def served() -> list[checks.Flow] | None:
            found = [f for f in checks.flows(env.traffic(srv), "in")
                     if (f.open.get("whois") or {}).get("node") == f"{cli}.{env.domain}."]
            return found if len(found) >= 2 and all(f.closed for f in found) else None

        inbound = wait_for(served, 30, "the web server's flows, closed",
                           lambda: json.dumps(env.traffic(srv))[-3000:])
        for flow in inbound:
            assert str(flow.open["local"]).endswith(f":{manifests.PLAIN_PORT}"), flow.open
            assert f"GET {path}".encode() in flow.peer_to_app, flow
            assert body.encode() in flow.app_to_peer, flow
        # The client's sidecar logged the same flows outbound, to the server's tailnet
        # address, port 80, each closed.
        def dialled() -> list[checks.Flow] | None:
            found = [f for f in checks.flows(env.traffic(cli), "out")
                     if f.open.get("remote") == f"{tailnet_ip}:{manifests.PLAIN_PORT}"]
            return found if len(found) >= 2 and all(f.closed for f in found) else None

        outbound = wait_for(dialled, 30, "the client's flows, closed",
                            lambda: json.dumps(env.traffic(cli))[-3000:])
        for flow in outbound:
            assert f"GET {path}".encode() in flow.app_to_peer, flow
            assert body.encode() in flow.peer_to_app, flow
    finally:
        for name in (srv, cli):
            request(env.api, "DELETE", f"/api/v1/namespaces/{NS}/pods/{name}")
        for name in (srv, cli):
            wait_for(lambda n=name: _gone(env.api, f"/api/v1/namespaces/{NS}/pods/{n}"), 120,
                     f"{name} to go")


def _tailnet_ipv4(env: Env, pod: str) -> str:
    """The tailnet IPv4 of ``pod``'s node, from its TailnetNode."""
    nodes = [n for n in tailnet_nodes(env.api, OPERATOR_NS)
             if (n["spec"].get("pod") or {}).get("name") == pod]
    assert len(nodes) == 1, [node_summary(n) for n in nodes]
    return str(nodes[0]["spec"]["ipv4"])


# ---- 8. TLS and UDP between pods ------------------------------------------------------------

CA_BUNDLE = "/var/run/tsnet2/tailnet-ca.pem"  # what the injector sets as $TSNET2_CA_BUNDLE
NODE_KEY = "/var/lib/tsnet2/tls/node.key"  # the node's TLS key, in the sidecar's state volume
SIDECAR_METRICS = ("import urllib.request as u; print(u.urlopen("
                   f"'http://127.0.0.1:{METRICS_PORT}/metrics', timeout=20).read().decode())")
UDP_COUNT, UDP_BURST = 5, 20
UDP_IDLE_WAIT = 180.0  # a listener's UDP flow closes when idle for 60 s (--udp-idle-timeout)


def _ensure_apps_namespace(env: Env) -> None:
    """The apps' namespace (made by the ``deployed`` fixture, unless run alone with -k)."""
    try:
        create(env.api, manifests.apps_namespace())
    except KubeError as exc:
        if exc.status != 409:
            raise


def _cert_shown(env: Env, pod: str, *flags: str) -> str | None:
    """``tsnet2 cert [flags]`` in the pod's sidecar (the node's certificate), or None while
    it has none yet."""
    try:
        return env.exec(pod, SIDECAR, ["tsnet2", "cert", *flags])
    except AssertionError as exc:
        # "the node has no cert domains", or the LocalAPI's 503 while none is issued yet
        text = str(exc).lower()
        if "cert" in text and "invalid choice" not in text:
            return None
        raise


def test_tls_and_udp_between_pods(env: Env) -> None:
    """Issue 15 in a real cluster. Both sidecars get their node certificates with no app
    action (the client's app only sleeps); the injector gives the apps
    ``$TSNET2_CA_BUNDLE``. TLS: the server's app serves ``listen_tls("tcp", ":443")`` (the
    daemon terminates TLS); the client's app dials it by FQDN with a plain ``dial`` and does
    TLS itself with Python's ``ssl`` trusting only the tailnet CA; the server's sidecar log
    holds the plaintext and an ``open`` with ``tls``, the client's only ciphertext; a wrong
    name fails verification. UDP: ``dial("udp")`` to the server's ``listen_packet`` echo,
    request/response and a burst; replies match, an oversized datagram is refused, and both
    sidecars' logs hold open/data/close with ``proto: udp`` and matching counts."""
    _ensure_apps_namespace(env)
    srv, cli = manifests.SECURE_SERVER, manifests.SECURE_CLIENT
    fqdn = f"{srv}.{env.domain}"
    cli_node = f"{cli}.{env.domain}."
    for pod in (manifests.secure_server_pod(env.cluster.image),
                manifests.secure_client_pod(env.cluster.image)):
        create(env.api, pod)
    try:
        for name in (srv, cli):
            wait_for(lambda n=name: pod_ready(get(env.api, "v1", "Pod", n, NS)), APP_WAIT,
                     f"{name} to be ready", env.detail)
        made = get(env.api, "v1", "Pod", cli, NS)
        app_env = {e["name"]: e.get("value") for e in made["spec"]["containers"][0]["env"]}
        assert app_env["TSNET2_CA_BUNDLE"] == CA_BUNDLE, app_env

        # Each sidecar has its certificate for its own name; the client's app never asked.
        shown = {n: wait_for(lambda n=n: _cert_shown(env, n), 120,
                             f"{n}'s sidecar to have its certificate",
                             lambda n=n: env.logs(n, SIDECAR)[-3000:])
                 for n in (cli, srv)}
        for name, text in shown.items():
            assert f"{name}.{env.domain}" in text, text
        # The key stays in the sidecar's state volume, owner-only; no app container mounts
        # that volume.
        stat = f"import os; print(oct(os.stat({NODE_KEY!r}).st_mode & 0o777))"
        for name in (srv, cli):
            assert env.exec(name, SIDECAR, ["python3", "-c", stat]).strip() == "0o600"
            app = get(env.api, "v1", "Pod", name, NS)["spec"]["containers"][0]
            assert "tsnet2-state" not in {m["name"] for m in app["volumeMounts"]}, app
        # The CA bundle the client's app sees is the tailnet CA the server's sidecar knows.
        bundle = wait_for(lambda: _try_exec(env, cli, ["cat", CA_BUNDLE]), 60,
                          "the tailnet CA bundle in the client's socket volume")
        assert "BEGIN CERTIFICATE" in bundle
        assert bundle.strip() == env.exec(srv, SIDECAR, ["tsnet2", "cert", "--ca"]).strip()
        metrics = checks.metric_samples(env.exec(srv, SIDECAR, ["python3", "-c",
                                                                SIDECAR_METRICS]))
        expiry = metrics.get("tsnet2_tls_cert_expiry_timestamp_seconds", 0.0)
        assert expiry > time.time() + 86400, metrics  # the chart's 90 days, not nearly over

        # TLS: the client does TLS itself, over a plain dial, by the server's FQDN.
        wait_for(lambda: "LISTENING" in env.logs(srv), APP_WAIT, f"{srv} to listen",
                 lambda: env.logs(srv) + env.detail())
        tries: list[str] = []

        def tls_exchange() -> dict[str, Any] | None:
            message = f"tls hello {len(tries)} from {cli}"
            out = _try_exec(env, cli, ["python3", "-c", apps.TLS_CLIENT, fqdn,
                                       str(manifests.TLS_PORT), message], tries)
            return {**json.loads(out.strip().splitlines()[-1]), "message": message} \
                if out else None

        got = wait_for(tls_exchange, 120, "the client's TLS exchange",
                       lambda: "\n".join(tries[-2:]) + env.logs(srv) + env.detail())
        message = got["message"]
        assert got["reply"] == f"tls pong: {message}\n", got
        assert got["trusted"]["x509_ca"] == 1, got  # the tailnet CA, nothing else
        assert got["san"] == [fqdn], got
        assert got["version"] in ("TLSv1.2", "TLSv1.3"), got
        assert "Hostname mismatch" in got["wrong_name"], got
        seen = wait_for(lambda: next((r for r in env.results(srv) if r.get("kind") == "tls"
                                      and r.get("got") == message + "\n"), None), 60,
                        f"{srv}'s RESULT for {message!r}", lambda: env.logs(srv))
        assert seen["error"] is None, seen
        assert seen["whois"]["Node"]["Name"] == cli_node, seen["whois"]
        assert seen["tls"]["sni"] == fqdn and seen["tls"]["version"] == got["version"], seen
        # The server's sidecar log: the plaintext, and an open that says TLS; the
        # wrong-name handshake is a reject.
        def tls_flow() -> checks.Flow | None:
            found = [f for f in checks.flows(env.traffic(srv), "in")
                     if (f.open.get("whois") or {}).get("node") == cli_node
                     and f.peer_to_app == f"{message}\n".encode()]
            return found[0] if found and found[0].closed else None

        flow = wait_for(tls_flow, 60, "the TLS flow, closed, in the server's log",
                        lambda: json.dumps(env.traffic(srv))[-3000:])
        assert flow.app_to_peer == f"tls pong: {message}\n".encode(), flow
        assert str(flow.open["local"]).endswith(f":{manifests.TLS_PORT}"), flow.open
        tls = flow.open["tls"]
        assert (tls["version"], tls["sni"], tls["cipher"]) == (
            got["version"], fqdn, got["cipher"]), tls
        assert [r for r in env.traffic(srv) if r.get("kind") == "reject"
                and r.get("reason") == "tls_failed"], env.traffic(srv)[-5:]
        # The client's sidecar relayed ciphertext it cannot read: no tls, no plaintext.
        srv_ip = _tailnet_ipv4(env, srv)
        sealed = [f for f in checks.flows(env.traffic(cli), "out")
                  if f.open.get("remote") == f"{srv_ip}:{manifests.TLS_PORT}"]
        assert sealed and all("tls" not in f.open for f in sealed), [f.open for f in sealed]
        assert all(message.encode() not in f.app_to_peer for f in sealed)
        assert any(len(f.app_to_peer) > len(message) for f in sealed)

        # UDP: request/response, then a burst, by name; an oversized datagram is refused.
        out = env.exec(cli, manifests.APP_CONTAINER,
                       ["python3", "-c", apps.UDP_CLIENT, srv, str(manifests.UDP_PORT),
                        str(UDP_COUNT), str(UDP_BURST), cli], timeout=90)
        udp = json.loads(out.strip().splitlines()[-1])
        assert udp["replies"] == [f"echo {q}" for q in udp["sent"]], udp
        assert sorted(udp["burst_replies"]) == sorted(f"echo {q}" for q in udp["burst_sent"])
        assert 1000 < udp["max_datagram"] < 65507, udp
        assert udp["too_large"][0] == udp["max_datagram"], udp
        assert udp["bypass"][0] == "blocked", udp  # a plain UDP socket: the guard stops it
        sent = [q.encode() for q in udp["sent"] + udp["burst_sent"]]
        echoed = [b"echo " + q for q in sent]
        # The client's sidecar: one outbound flow to the server's :5353, closed with the
        # dial; the server's: one inbound flow from the client's node, closed when idle.
        def udp_closed(pod: str, direction: str) -> checks.UdpFlow | None:
            found = [f for f in checks.udp_flows(env.traffic(pod), direction)
                     if set(f.peer_to_app + f.app_to_peer) & set(sent)]
            return found[0] if len(found) == 1 and found[0].close is not None else None

        for pod, direction, ins, outs in ((cli, "out", echoed, sent),
                                          (srv, "in", sent, echoed)):
            flow_u = wait_for(lambda p=pod, d=direction: udp_closed(p, d), UDP_IDLE_WAIT,
                              f"{pod}'s UDP flow, closed",
                              lambda p=pod: json.dumps(env.traffic(p))[-3000:])
            assert sorted(flow_u.peer_to_app) == sorted(ins), flow_u
            assert sorted(flow_u.app_to_peer) == sorted(outs), flow_u
            assert flow_u.open["proto"] == "udp", flow_u.open
            problems = checks.udp_close_problems(flow_u)
            assert not problems, (problems, flow_u.close)
            assert flow_u.close is not None
            assert flow_u.close["datagrams_in"] == flow_u.close["datagrams_out"] == len(sent)
        inbound = udp_closed(srv, "in")
        assert inbound is not None
        assert (inbound.open.get("whois") or {}).get("node") == cli_node, inbound.open
        assert str(inbound.open["local"]).endswith(f":{manifests.UDP_PORT}"), inbound.open
        outbound = udp_closed(cli, "out")
        assert outbound is not None
        assert outbound.open["remote"] == f"{srv_ip}:{manifests.UDP_PORT}", outbound.open
        # The datagram sent around the daemon (a minute ago) never reached the server's app.
        assert not [r for r in env.results(srv) if "bypass" in str(r.get("got"))], \
            env.logs(srv)[-2000:]
    finally:
        nodes = [n["metadata"]["name"] for n in tailnet_nodes(env.api, OPERATOR_NS)
                 if (n["spec"].get("pod") or {}).get("name") in (srv, cli)]
        for name in (srv, cli):
            request(env.api, "DELETE", f"/api/v1/namespaces/{NS}/pods/{name}")
        for name in (srv, cli):
            wait_for(lambda n=name: _gone(env.api, f"/api/v1/namespaces/{NS}/pods/{n}"), 120,
                     f"{name} to go")
        wait_for(lambda: not {n["metadata"]["name"] for n in tailnet_nodes(
            env.api, OPERATOR_NS)} & set(nodes), GC_WAIT, "their nodes to be removed",
            env.detail)


def _try_exec(env: Env, pod: str, argv: list[str], errors: list[str] | None = None) -> str:
    """``kubectl exec`` in the pod's app container; its output, or "" when it failed (the
    error is kept in ``errors``): for what works once something else has happened (the
    peer is in the netmap, the CA file is written)."""
    try:
        return env.exec(pod, manifests.APP_CONTAINER, argv, timeout=90)
    except AssertionError as exc:
        if errors is not None:
            errors.append(str(exc)[-1500:])
        return ""


NAMESPACED_KINDS = ("deployments.apps", "services", "configmaps", "secrets", "serviceaccounts",
                    "roles.rbac.authorization.k8s.io",
                    "rolebindings.rbac.authorization.k8s.io",
                    "poddisruptionbudgets.policy", "networkpolicies.networking.k8s.io")
CLUSTER_KINDS = ("clusterroles.rbac.authorization.k8s.io",
                 "clusterrolebindings.rbac.authorization.k8s.io",
                 "mutatingwebhookconfigurations.admissionregistration.k8s.io")


def test_helm_uninstall_leaves_only_what_the_docs_say(deployed: Env) -> None:
    """charts/tsnet2/README.md: uninstall removes every object of the release; with
    ``crds.keep: true`` (the default) the CRDs stay, and with them the tailnet state and the
    kopf peering object."""
    env = deployed
    env.cluster.helm("uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait")
    wait_for(lambda: not list_pods(env.api, OPERATOR_NS, RELEASE_SELECTOR), 120,
             "the operator pods to go", lambda: describe(env.api, OPERATOR_NS))
    left = env.kubectl("get", ",".join(NAMESPACED_KINDS), "--all-namespaces", "-l",
                       RELEASE_SELECTOR, "-o", "name")
    assert left.strip() == "", left
    left = env.kubectl("get", ",".join(CLUSTER_KINDS), "-l", RELEASE_SELECTOR, "-o", "name")
    assert left.strip() == "", left
    crds = env.kubectl("get", "crd", "-o", "name")
    assert "tailnetnodes.tsnet2.io" in crds, crds
    assert tailnet_nodes(env.api, OPERATOR_NS), "the tailnet state went with the release"
    peerings = env.kubectl("get", "clusterkopfpeerings", "-o", "name")
    assert f"{RELEASE}-{OPERATOR_NS}" in peerings, peerings
    # The workloads keep running (without coordination now); nothing else was touched.
    assert _one_pod(env, SERVER_SELECTOR) is not None, env.detail()
