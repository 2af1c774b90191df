"""The kind end-to-end suite (opt-in: ``scripts/e2e-kind``; see docs/kind-e2e.md).

One kind cluster for the module: the image built with docker and loaded into the nodes, the
chart installed with helm, the two sample apps (tests/e2e/kind/manifests.py) deployed into a
namespace labelled for injection. Then, in order:

1. the client's request and the reply cross WireGuard between the two pods' sidecars; the
   server's WhoIs names the client pod; the server's traffic log holds the flow (open with
   the client's WhoIs, both payloads, the close with the byte counts); its /metrics agree;
2. a rolling update of the persistent server: the new pod comes back as the same node (same
   TailnetNode, node key and tailnet address, bound to the new pod), there is still one node
   for it (no cloned identity), and its traffic log survived in the state volume;
3. deleting the client pod removes its ephemeral node (the operator's node GC); the
   Deployment's next client pod gets a node of its own and talks to the updated server.

Skipped unless ``TSNET2_E2E_KIND=1`` and docker (with an engine), kind and helm are there;
the skip message says which is missing. The cluster is deleted at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from kubernetes import client as k8s

from tests.e2e.kind import checks, manifests
from tests.e2e.kind.cluster import (
    IMAGE,
    IMAGE_REPOSITORY,
    IMAGE_TAG,
    OPERATOR_NAMESPACE,
    RELEASE,
    KindCluster,
    Tools,
    helm_install_argv,
    say,
    why_skip,
)
from tests.e2e.kind.kube import (
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

_skip = why_skip()
pytestmark = [
    pytest.mark.skipif(_skip is not None, reason=_skip or ""),
    # The first test's time includes creating the cluster and building the image.
    pytest.mark.timeout(3000),
]

NS = manifests.APPS_NAMESPACE
SIDECAR = "tsnet2d"
TRAFFIC_LOG = "/var/lib/tsnet2/traffic.jsonl"
METRICS = ("python3", "-c", "import urllib.request as u; print(u.urlopen("
           "'http://127.0.0.1:9464/metrics', timeout=5).read().decode())")
SERVER_SELECTOR = f"app.kubernetes.io/name={manifests.SERVER}"
CLIENT_SELECTOR = f"app.kubernetes.io/name={manifests.CLIENT}"
APP_WAIT = 300.0
GC_WAIT = 90.0  # pod DELETED event: at once; the sweep: every 10 s


@dataclass
class Env:
    """The running cluster, as the tests see it."""

    cluster: KindCluster
    api: k8s.ApiClient
    domain: str

    def detail(self) -> str:
        """Pods and events of the apps' and the operator's namespaces, and the nodes."""
        nodes = "\n".join(node_summary(n) for n in tailnet_nodes(self.api, OPERATOR_NAMESPACE))
        return (f"{describe(self.api, NS)}\n{describe(self.api, OPERATOR_NAMESPACE)}\n"
                f"-- tailnet nodes\n{nodes}")

    def logs(self, pod: str, container: str = manifests.APP_CONTAINER) -> str:
        """A container's log."""
        return pod_logs(self.api, NS, pod, container)

    def app_result(self, pod: str) -> dict[str, Any] | None:
        """The ``RESULT`` line of a pod's app, if printed yet."""
        return checks.result_of(self.logs(pod))

    def traffic(self, pod: str) -> list[dict[str, Any]]:
        """The pod's traffic log (read in its sidecar)."""
        return checks.traffic_records(exec_in(self.api, NS, pod, SIDECAR, ("cat", TRAFFIC_LOG)))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """Cluster + image + chart, the operator ready; the cluster is deleted afterwards."""
    workdir = tmp_path_factory.mktemp("kind")
    with KindCluster(Tools.find(), workdir) as cluster:
        cluster.build_and_load(IMAGE)
        backend = os.environ.get("TSNET2_E2E_BACKEND", "userspace")
        values = workdir / "values.yaml"
        values.write_text(yaml.safe_dump(manifests.helm_values(IMAGE_REPOSITORY, IMAGE_TAG,
                                                               backend=backend)))
        extra = [Path(p) for p in os.environ.get("TSNET2_E2E_VALUES", "").split(":") if p]
        cluster.helm(*helm_install_argv(values, *extra))
        with cluster.api_client() as api:

            def operator_available() -> bool:
                dep = get(api, "apps/v1", "Deployment", f"{RELEASE}-operator",
                          OPERATOR_NAMESPACE)
                want = int(dep["spec"].get("replicas", 1))
                return want > 0 and dep.get("status", {}).get("availableReplicas") == want

            wait_for(operator_available, 300, "the operator Deployment to be available",
                     lambda: describe(api, OPERATOR_NAMESPACE))
            cm = get(api, "v1", "ConfigMap", f"{RELEASE}-config", OPERATOR_NAMESPACE)
            domain = str(json.loads(cm["data"]["config.json"])["domain"])
            say(f"operator ready; tailnet domain {domain}")
            yield Env(cluster, api, domain)


@pytest.fixture(scope="module")
def deployed(env: Env) -> Env:
    """The sample apps created (their pods are awaited by the tests)."""
    for obj in (manifests.apps_namespace(), manifests.server_statefulset(IMAGE),
                manifests.client_deployment(IMAGE)):
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


def _exchange(env: Env, client_pod: str, server_pod: str) -> tuple[dict[str, Any], int]:
    """Wait for the client's reply and the server's result; check echo and WhoIs.
    Returns the server's result and how many tries the client needed."""
    got = wait_for(lambda: env.app_result(client_pod), APP_WAIT, f"{client_pod}'s reply",
                   lambda: env.logs(client_pod) + env.logs(server_pod) + env.detail())
    assert got["reply"] == f"pong: ping from {client_pod}\n", (got, env.logs(server_pod))
    seen = wait_for(lambda: env.app_result(server_pod), 60, f"{server_pod}'s result",
                    lambda: env.logs(server_pod))
    assert seen["got"] == f"ping from {client_pod}\n", seen
    # WhoIs names the client pod: its tailnet name is the pod name.
    assert seen["whois"]["Node"]["Name"] == f"{client_pod}.{env.domain}.", seen["whois"]
    return seen, int(got["tries"])


def _server_nodes(env: Env) -> list[dict[str, Any]]:
    """Every TailnetNode that is, or could be a clone of, the server's identity."""
    host = manifests.SERVER_POD
    return [n for n in tailnet_nodes(env.api, OPERATOR_NAMESPACE)
            if str(n["spec"].get("name", "")).startswith(host)
            or (n["spec"].get("pod") or {}).get("name") == host]


def test_echo_whois_traffic_log_and_metrics(deployed: Env) -> None:
    env = deployed
    server = wait_for(lambda: _one_pod(env, SERVER_SELECTOR), APP_WAIT, "the server pod",
                      env.detail)
    client = wait_for(lambda: _one_pod(env, CLIENT_SELECTOR), APP_WAIT, "the client pod",
                      env.detail)
    srv, cli = _name(server), _name(client)
    assert srv == manifests.SERVER_POD
    # Both were injected through the webhook, the server with its state claim.
    for pod in (server, client):
        status = json.loads(pod["metadata"]["annotations"]["tsnet2.io/status"])
        sidecars = status["initContainers"] + status["containers"]
        assert sidecars == [SIDECAR], status
    claims = [v["persistentVolumeClaim"]["claimName"] for v in server["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [f"tsnet2-state-{srv}"], server["spec"]["volumes"]
    pvc = get(env.api, "v1", "PersistentVolumeClaim", claims[0], NS)
    assert pvc["status"]["phase"] == "Bound", pvc["status"]
    assert not [v for v in client["spec"]["volumes"] if "persistentVolumeClaim" in v]

    seen, tries = _exchange(env, cli, srv)
    say(f"client tries: {tries}; flows the server saw cut: {seen['aborted']}")

    # The server's traffic log holds the exchange, both directions, with the payload.
    flow = wait_for(lambda: (lambda f: f if f.closed else None)(
        checks.served_flow(env.traffic(srv), f"{cli}.{env.domain}.")), 30,
        "the flow's close record")
    assert flow.remote_ip == seen["remote"]
    assert flow.peer_to_app == f"ping from {cli}\n".encode()
    assert flow.app_to_peer == f"pong: ping from {cli}\n".encode()
    records = env.traffic(srv)
    opens = [r for r in records if r["kind"] == "open" and r["dir"] == "in"]
    assert len(opens) == seen["aborted"] + 1, records  # one per try the server accepted
    # ... and its /metrics count the same flows and bytes.
    samples = checks.metric_samples(exec_in(env.api, NS, srv, SIDECAR, METRICS))
    problems = checks.metrics_problems(samples, records)
    assert not problems, (problems, samples)


def test_rolling_update_keeps_the_server_identity(deployed: Env) -> None:
    env = deployed
    old = wait_for(lambda: _one_pod(env, SERVER_SELECTOR), APP_WAIT, "the server pod",
                   env.detail)
    before = _server_nodes(env)
    assert len(before) == 1, [node_summary(n) for n in before]
    node = before[0]
    assert node["spec"]["pod"]["uid"] == _uid(old), node_summary(node)
    assert node["spec"]["ephemeral"] is False, node_summary(node)

    strategic_patch(env.api, "apps/v1", "StatefulSet", manifests.SERVER,
                    manifests.restart_patch(time.strftime("%Y-%m-%dT%H:%M:%SZ")), NS)
    new = wait_for(lambda: _one_pod(env, SERVER_SELECTOR, not_uid=_uid(old)), APP_WAIT,
                   "the rolled server pod", env.detail)
    assert _name(new) == manifests.SERVER_POD
    wait_for(lambda: "LISTENING" in env.logs(_name(new)), APP_WAIT,
             "the new server to listen", lambda: env.logs(_name(new)) + env.detail())

    def rebound() -> list[dict[str, Any]] | None:
        nodes = _server_nodes(env)
        bound = [n for n in nodes if (n["spec"].get("pod") or {}).get("uid") == _uid(new)]
        return nodes if bound else None

    after = wait_for(rebound, 60, "the server's node to name the new pod", env.detail)
    # One node, the same one: the new pod took the identity over from the state volume.
    assert len(after) == 1, [node_summary(n) for n in after]
    same = after[0]
    assert same["metadata"]["name"] == node["metadata"]["name"], node_summary(same)
    assert same["spec"]["publicKey"] == node["spec"]["publicKey"], node_summary(same)
    assert same["spec"]["ipv4"] == node["spec"]["ipv4"], node_summary(same)
    assert same["spec"]["name"] == manifests.SERVER_POD
    # The traffic log lives in the state volume too: the first exchange is still there.
    client = _one_pod(env, CLIENT_SELECTOR)
    assert client is not None
    checks.served_flow(env.traffic(_name(new)), f"{_name(client)}.{env.domain}.")


def test_deleting_the_client_pod_removes_its_node(deployed: Env) -> None:
    env = deployed
    old = wait_for(lambda: _one_pod(env, CLIENT_SELECTOR), APP_WAIT, "the client pod",
                   env.detail)
    mine = [n for n in tailnet_nodes(env.api, OPERATOR_NAMESPACE)
            if (n["spec"].get("pod") or {}).get("uid") == _uid(old)]
    assert len(mine) == 1, env.detail()
    node = mine[0]
    assert node["spec"]["ephemeral"] is True, node_summary(node)
    assert node["spec"]["name"] == _name(old)

    request(env.api, "DELETE", f"/api/v1/namespaces/{NS}/pods/{_name(old)}")

    def gone() -> bool:
        names = {n["metadata"]["name"] for n in tailnet_nodes(env.api, OPERATOR_NAMESPACE)}
        return node["metadata"]["name"] not in names

    wait_for(gone, GC_WAIT, f"node {node_summary(node)} to be removed", env.detail)

    # The Deployment's next pod joins as a node of its own and reaches the updated server.
    new = wait_for(lambda: _one_pod(env, CLIENT_SELECTOR, not_uid=_uid(old)),
                   APP_WAIT, "the next client pod", env.detail)
    _exchange(env, _name(new), manifests.SERVER_POD)
    nodes = tailnet_nodes(env.api, OPERATOR_NAMESPACE)
    assert sorted(n["spec"]["name"] for n in nodes) == sorted(
        [manifests.SERVER_POD, _name(new)]), [node_summary(n) for n in nodes]
