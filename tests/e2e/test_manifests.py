"""What of the kind suite runs without a cluster: its skip detection, command lines, build
context and manifests, and a strict server-side dry run of everything it would apply.

The dry runs use the repo's real kube-apiserver (tests/k8s/apiserver.py) and the real helm
(tests/k8s/build-tools.sh builds both; skipped with that message when they are not built):
every object ``helm template`` renders from the suite's values, the apps' namespace,
StatefulSet and Deployment, the restart patch of the rolling update, and the two pods as the
operator's real ``inject()`` turns them out with the rendered sidecar settings.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml  # type: ignore[import-untyped]
from kubernetes import client as k8s
from tsnet2_operator.config import load_config, parse_server_version, resolve_native_sidecar
from tsnet2_operator.inject import DEFAULT_CONTAINER, SIDECAR_NAME, inject
from tsnet2_operator.store import crd_manifests

from tests.e2e import manifests
from tests.e2e.kind import cluster
from tests.e2e.kube import (
    KubeError,
    create,
    get,
    list_pods,
    pod_logs,
    request,
    strategic_patch,
)
from tests.image import apps
from tests.k8s.apiserver import KubeAPIServer, admin_client, running_apiserver

IMAGE = cluster.IMAGE
SIDECAR_IMAGE = cluster.SIDECAR_IMAGE


# ---- skip detection -----------------------------------------------------------------------

def _exe(directory: Path, name: str, body: str) -> Path:
    """A small executable standing in for a tool in a PATH of the test's own."""
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_not_opted_in_says_how_to_run_and_looks_at_nothing(tmp_path: Path) -> None:
    message = cluster.why_skip({}, path=str(tmp_path), cache=tmp_path,
                               helm=tmp_path / "helm")
    assert message is not None
    assert "opt-in" in message and "make e2e-kind" in message and "TSNET2_E2E_KIND=1" in message
    assert "docker" not in message
    assert cluster.why_skip({"TSNET2_E2E_KIND": "0"}) == message


def test_opted_in_names_every_missing_tool(tmp_path: Path) -> None:
    message = cluster.why_skip({"TSNET2_E2E_KIND": "1"}, path=str(tmp_path), cache=tmp_path,
                               helm=tmp_path / "helm")
    assert message is not None
    assert "docker is not installed" in message
    assert f"kind is not installed (not on PATH nor in {tmp_path}/kind-v0.33.0)" in message
    assert "install Go or kind" in message
    assert f"helm is not built ({tmp_path}/helm missing)" in message
    assert "kubectl is not installed (not on PATH)" in message


def test_a_docker_client_without_engine_is_not_enough(tmp_path: Path) -> None:
    _exe(tmp_path, "docker", "echo 'Cannot connect to the Docker daemon at "
         "unix:///var/run/docker.sock. Is the docker daemon running?' >&2; exit 1")
    _exe(tmp_path, "go", "exit 0")
    message = cluster.why_skip({"TSNET2_E2E_KIND": "1"}, path=str(tmp_path), cache=tmp_path,
                               helm=tmp_path / "helm")
    assert message is not None
    assert ("no Docker engine: `docker info` failed (Cannot connect to the Docker daemon at "
            "unix:///var/run/docker.sock. Is the docker daemon running?); start a Docker "
            "engine") in message
    assert "Go is on PATH, so scripts/e2e-kind installs it" in message


def test_engine_kind_kubectl_and_helm_present_means_run(tmp_path: Path) -> None:
    _exe(tmp_path, "docker", '[ "$1 $2 $3" = "info --format {{.ServerVersion}}" ] && echo 28.1.1')
    _exe(tmp_path, "kubectl", "exit 0")  # the suite runs `kubectl exec`
    cache = tmp_path / "cache"
    cluster.kind_cache_dir(cache).mkdir(parents=True)
    kind = _exe(cluster.kind_cache_dir(cache), "kind", "exit 0")
    helm = _exe(tmp_path, "helm", "exit 0")
    assert cluster.find_kind(path=str(tmp_path), cache=cache) == kind
    assert cluster.why_skip({"TSNET2_E2E_KIND": "1"}, path=str(tmp_path), cache=cache,
                            helm=helm) is None
    on_path = _exe(tmp_path, "kind", "exit 0")  # PATH wins over the cache
    assert cluster.find_kind(path=str(tmp_path), cache=cache) == on_path


def test_the_real_docker_client_here() -> None:
    """On a machine with the docker client but no engine (this one), the real client's
    failure is what the skip message reports."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    problem = cluster.docker_engine_problem(docker)
    if problem is None:
        pytest.skip("a Docker engine is running here")
    assert problem.startswith("no Docker engine: `docker info` ")
    message = cluster.why_skip({"TSNET2_E2E_KIND": "1"})
    assert message is not None and problem in message


# ---- command lines and build context --------------------------------------------------------

def test_cluster_names() -> None:
    name = cluster.cluster_name({})
    assert name.startswith("tsnet2-e2e-") and len(name) == len("tsnet2-e2e-") + 6
    assert cluster.cluster_name({}) != name
    assert cluster.cluster_name({"TSNET2_E2E_CLUSTER": "tsnet2-e2e-ci-7"}) == "tsnet2-e2e-ci-7"
    for bad in ("prod", "tsnet2-e2e-A", "tsnet2-e2e-a;rm", "tsnet2-e2e-" + "x" * 40):
        with pytest.raises(cluster.ClusterError, match="TSNET2_E2E_CLUSTER"):
            cluster.cluster_name({"TSNET2_E2E_CLUSTER": bad})


def test_command_lines(tmp_path: Path) -> None:
    kind, docker, cfg = Path("/k/kind"), Path("/d/docker"), tmp_path / "kubeconfig"
    assert cluster.kind_create_argv(kind, "tsnet2-e2e-x", cfg) == [
        "/k/kind", "create", "cluster", "--name", "tsnet2-e2e-x", "--kubeconfig", str(cfg),
        "--wait", "120s"]
    assert cluster.kind_create_argv(kind, "n", cfg, node_image="kindest/node:v1.33.1")[-2:] == [
        "--image", "kindest/node:v1.33.1"]
    assert cluster.kind_delete_argv(kind, "n", cfg) == [
        "/k/kind", "delete", "cluster", "--name", "n", "--kubeconfig", str(cfg)]
    assert cluster.kind_load_argv(kind, "n", "tsnet2:kind-e2e") == [
        "/k/kind", "load", "docker-image", "tsnet2:kind-e2e", "--name", "n"]
    assert cluster.kind_install_argv("/usr/local/go/bin/go") == [
        "/usr/local/go/bin/go", "install", "sigs.k8s.io/kind@v0.33.0"]
    argv = cluster.docker_build_argv(docker, IMAGE, tmp_path, revision="abc")
    assert argv[:6] == ["/d/docker", "build", "-f", str(tmp_path / "Containerfile"),
                        "-t", IMAGE]
    assert argv[-1] == str(tmp_path)
    assert "REVISION=abc" in argv and not [a for a in argv if a.startswith("BASE=")]
    assert "--target" not in argv  # the default target: the full image
    based = cluster.docker_build_argv(docker, IMAGE, tmp_path, base="debian:bookworm")
    assert based[based.index("BASE=debian:bookworm") - 1] == "--build-arg"
    sidecar = cluster.docker_build_argv(docker, SIDECAR_IMAGE, tmp_path, target="sidecar")
    assert sidecar[sidecar.index("--target") + 1] == "sidecar"
    assert sidecar[sidecar.index("-t") + 1] == SIDECAR_IMAGE == "tsnet2-sidecar:kind-e2e"
    values, extra = tmp_path / "v.yaml", tmp_path / "more.yaml"
    assert cluster.helm_install_argv(values, extra) == [
        "install", "tsnet2", str(cluster.CHART), "--namespace", "tsnet2-system",
        "--create-namespace", "-f", str(values), "-f", str(extra)]


def test_build_context_is_what_the_containerfile_copies(tmp_path: Path) -> None:
    allowed = [line[1:] for line in (cluster.REPO / ".containerignore").read_text().splitlines()
               if line.startswith("!")]
    assert sorted(allowed) == sorted(cluster.BUILD_CONTEXT)
    context = cluster.make_build_context(tmp_path / "ctx")
    assert sorted(p.name for p in context.iterdir()) == sorted(cluster.BUILD_CONTEXT)
    assert (context / "tsnet2" / "__init__.py").read_bytes() == (
        cluster.REPO / "tsnet2" / "__init__.py").read_bytes()
    assert (context / "operator" / "tsnet2_operator" / "crds" / "tailnetnodes.yaml").is_file()
    leftovers = [p for p in context.rglob("*")
                 if p.name == "__pycache__" or p.suffix == ".pyc" or p.name.endswith(
                     ".egg-info")]
    assert leftovers == []


# ---- manifests --------------------------------------------------------------------------------

def test_sample_apps() -> None:
    server = manifests.server_statefulset(IMAGE)
    client = manifests.client_deployment(IMAGE)
    ann = server["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"tsnet2.io/inject": "enabled", "tsnet2.io/state": "persistent",
                   "tsnet2.io/traffic-log-sink": "both"}
    assert "tsnet2.io/traffic-log-sink" not in client["spec"]["template"]["metadata"][
        "annotations"]  # the default: stdout
    assert client["spec"]["template"]["metadata"]["annotations"]["tsnet2.io/inject"] == (
        "enabled")
    (srv_c,) = server["spec"]["template"]["spec"]["containers"]
    (cli_c,) = client["spec"]["template"]["spec"]["containers"]
    assert srv_c["command"] == ["python3", "-c", apps.SERVER]
    assert cli_c["command"] == ["python3", "-c", apps.CLIENT]
    for c in (srv_c, cli_c):  # non-root apps, no group of the sidecar's
        assert c["securityContext"]["runAsUser"] == 10001
        assert "runAsGroup" not in c["securityContext"]
        assert c["image"] == IMAGE and c["imagePullPolicy"] == "IfNotPresent"
    assert server["spec"]["template"]["spec"]["securityContext"] == {"fsGroup": 10001}
    assert "securityContext" not in client["spec"]["template"]["spec"]
    env = {e["name"]: e for e in cli_c["env"]}
    assert env["SERVER_HOST"]["value"] == manifests.SERVER_POD == "echo-server-0"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert server["spec"]["selector"]["matchLabels"] == server["spec"]["template"]["metadata"][
        "labels"]
    ns = manifests.apps_namespace()
    assert ns["metadata"]["labels"]["tsnet2.io/inject"] == "enabled"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert manifests.restart_patch("t")["spec"]["template"]["metadata"]["annotations"] == {
        "kubectl.kubernetes.io/restartedAt": "t"}


def test_helm_values() -> None:
    values = manifests.helm_values("tsnet2", "kind-e2e", backend="kernel")
    image = {"repository": "tsnet2", "tag": "kind-e2e", "pullPolicy": "IfNotPresent"}
    assert values == {"operator": {"image": image},
                      "sidecar": {"image": {**image, "repository": "tsnet2-sidecar"},
                                  "backend": "kernel"}}


# ---- against the real helm and kube-apiserver ------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """``helm template`` (the real helm, built by tests/k8s/build-tools.sh) of the chart with
    the suite's values and install arguments, as the suite installs it."""
    helm = cluster.helm_binary()
    if not os.access(helm, os.X_OK):
        pytest.skip(f"helm not built ({helm} missing); run tests/k8s/build-tools.sh")
    work = tmp_path_factory.mktemp("helm")
    values = work / "values.yaml"
    values.write_text(yaml.safe_dump(manifests.helm_values(
        cluster.IMAGE_REPOSITORY, cluster.IMAGE_TAG)))
    argv = cluster.helm_install_argv(values)
    assert argv[0] == "install"
    out = cluster.run([str(helm), "template", *argv[1:]], timeout=120,
                      env=cluster.helm_env(work / "home"), what="helm template")
    docs: list[dict[str, Any]] = [doc for doc in yaml.safe_load_all(out) if doc]
    return docs


@pytest.fixture(scope="module")
def api() -> Iterator[k8s.ApiClient]:
    """An admin client of a real kube-apiserver with the two namespaces created."""
    server: KubeAPIServer
    with running_apiserver() as server, admin_client(server) as client:
        create(client, {"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": cluster.OPERATOR_NAMESPACE}})
        create(client, manifests.apps_namespace())
        yield client


def _dry_run_create(api: k8s.ApiClient, obj: dict[str, Any]) -> None:
    """The suite's own create, as a dry run (strict validation); fail with the reason."""
    try:
        create(api, obj, dry_run=True)
    except KubeError as exc:
        pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')}: the API server refused it: "
                    f"{exc}")


def test_the_kube_helpers_speak_to_a_real_api_server(api: k8s.ApiClient) -> None:
    """create (strict), get, list, strategic patch and the error path, for real."""
    ns = manifests.APPS_NAMESPACE
    assert get(api, "v1", "Namespace", ns)["metadata"]["labels"]["tsnet2.io/inject"] == (
        "enabled")
    with pytest.raises(KubeError, match="unknown field") as info:
        create(api, {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "x", "namespace": ns}, "dataa": {}}, dry_run=True)
    assert info.value.status == 400
    with pytest.raises(KubeError) as missing:
        get(api, "v1", "ConfigMap", "absent", ns)
    assert missing.value.status == 404
    assert list_pods(api, ns) == []
    assert request(api, "GET", f"/api/v1/namespaces/{ns}/configmaps")["items"] == []


def _open_sockets() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def test_the_kube_helpers_leave_no_socket_open(api: k8s.ApiClient) -> None:
    """Each request closes its connection before returning: no socket is left to the
    garbage collector, whose ResourceWarning (an error under ``filterwarnings = error``)
    used to fail whichever test ran at the time. The client's own pool kept them open."""
    before = _open_sockets()
    for _ in range(5):
        list_pods(api, manifests.APPS_NAMESPACE)
        assert pod_logs(api, manifests.APPS_NAMESPACE, "no-such-pod", "app") == ""
        with pytest.raises(KubeError):
            get(api, "v1", "Pod", "no-such-pod", manifests.APPS_NAMESPACE)
    assert _open_sockets() - before == set()


def test_the_chart_with_the_suites_values_is_valid(
        api: k8s.ApiClient, rendered: list[dict[str, Any]]) -> None:
    kinds = []
    for obj in rendered:
        _dry_run_create(api, obj)
        kinds.append(obj["kind"])
    assert {"Deployment", "MutatingWebhookConfiguration", "ConfigMap",
            "CustomResourceDefinition"} <= set(kinds)
    (dep,) = [o for o in rendered if o["kind"] == "Deployment"]
    assert dep["metadata"]["name"] == f"{cluster.RELEASE}-operator"
    (op,) = dep["spec"]["template"]["spec"]["containers"]
    assert (op["image"], op["imagePullPolicy"]) == (IMAGE, "IfNotPresent")
    config = _rendered_config(rendered)
    assert (config.sidecar.image, config.sidecar.image_pull_policy) == (
        SIDECAR_IMAGE, "IfNotPresent")


def _rendered_config(rendered: list[dict[str, Any]]) -> Any:
    (cm,) = [o for o in rendered if o["kind"] == "ConfigMap"
             and o["metadata"]["name"] == f"{cluster.RELEASE}-config"]
    text = cm["data"]["config.json"]
    return load_config({"TSNET2_OPERATOR_CONFIG": "config.json"}, read=lambda _: text)


def test_the_sample_apps_are_valid(api: k8s.ApiClient) -> None:
    for obj in (manifests.server_statefulset(IMAGE), manifests.client_deployment(IMAGE)):
        _dry_run_create(api, obj)
    # The rolling update's patch, on a real (controller-less: nothing runs) StatefulSet.
    ns = manifests.APPS_NAMESPACE
    created = create(api, manifests.server_statefulset(IMAGE))
    try:
        patched = strategic_patch(api, "apps/v1", "StatefulSet", manifests.SERVER,
                                  manifests.restart_patch("2030-01-01"), ns, dry_run=True)
        template = patched["spec"]["template"]
        assert template["metadata"]["annotations"] == {
            **created["spec"]["template"]["metadata"]["annotations"],
            manifests.RESTARTED_AT: "2030-01-01"}
        assert template["spec"] == created["spec"]["template"]["spec"]  # merged, not replaced
    finally:
        request(api, "DELETE", f"/apis/apps/v1/namespaces/{ns}/statefulsets/{manifests.SERVER}")


def _pod_from(workload: dict[str, Any], name: str | None) -> dict[str, Any]:
    """The pod a controller would create from ``workload``'s template."""
    template = deepcopy(workload["spec"]["template"])
    meta = {**template["metadata"], "namespace": workload["metadata"]["namespace"]}
    if name:
        meta["name"] = name  # a StatefulSet names its pods
    else:
        meta["generateName"] = workload["metadata"]["name"] + "-7d9f8b6c5d-"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]}


def test_the_pods_as_injected_are_valid(api: k8s.ApiClient,
                                        rendered: list[dict[str, Any]]) -> None:
    """What the webhook makes of the two pods, with the chart's sidecar settings and this
    API server's native-sidecar support, is a Pod the API server accepts."""
    config = _rendered_config(rendered)
    version = request(api, "GET", "/version")
    native = resolve_native_sidecar(config.native_sidecar,
                                    parse_server_version(version["major"], version["minor"]))
    pods = {
        "server": _pod_from(manifests.server_statefulset(IMAGE), manifests.SERVER_POD),
        "client": _pod_from(manifests.client_deployment(IMAGE), None),
    }
    for role, pod in pods.items():
        decision = inject(pod, config.sidecar, native_sidecar=native,
                          namespace_labels=manifests.apps_namespace()["metadata"]["labels"])
        assert decision.result == "injected", decision
        out: dict[str, Any] = jsonpatch.apply_patch(pod, decision.patch)
        spec = out["spec"]
        sidecars = [c for c in spec.get("initContainers", []) + spec["containers"]
                    if c["name"] == SIDECAR_NAME]
        assert len(sidecars) == 1 and sidecars[0]["image"] == SIDECAR_IMAGE
        args = sidecars[0]["args"]
        assert args[args.index("--backend") + 1] == "userspace"
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v]
        sinks = [args[i + 1] for i, a in enumerate(args) if a == "--traffic-log"]
        if role == "server":
            assert claims == ["tsnet2-state-echo-server-0"]
            assert "--ephemeral" not in args and "echo-server-0" in args
            assert sinks == ["-", "/var/lib/tsnet2/traffic.jsonl"]
        else:
            assert claims == [] and "--ephemeral" in args and "$(POD_NAME)" in args
            assert sinks == ["-"] and "--traffic-log-max-bytes" not in args
        app = next(c for c in spec["containers"] if c["name"] == manifests.APP_CONTAINER)
        # The socket opens to the app: the server's fsGroup, else every uid of the pod.
        mode = args[args.index("--socket-mode") + 1]
        if role == "server":
            assert mode == "0660" and args[args.index("--socket-group") + 1] == "10001"
        else:
            assert mode == "0666" and "--socket-group" not in args
        assert "NET_RAW" in app["securityContext"]["capabilities"]["drop"]
        if not native:
            assert out["metadata"]["annotations"][DEFAULT_CONTAINER] == "app"
        _dry_run_create(api, out)


def test_the_plain_pods_as_injected_are_valid(api: k8s.ApiClient,
                                              rendered: list[dict[str, Any]]) -> None:
    """The apps that don't import tsnet2 (serve; egress and dns, with the dns.upstream the
    suite sets by upgrade) as the webhook makes them: Pods the API server accepts, with
    dnsPolicy None and the namespace's search list."""
    config = _rendered_config(rendered)
    sidecar = replace(config.sidecar, dns_upstream="10.96.0.10")
    web = manifests.plain_web_pod(IMAGE)
    client = manifests.plain_client_pod(IMAGE)
    assert web["metadata"]["annotations"]["tsnet2.io/serve"] == "80=127.0.0.1:8080"
    assert "--bind 127.0.0.1" in web["spec"]["containers"][0]["command"][2]
    for pod in (web, client):
        decision = inject(pod, sidecar, native_sidecar=True)
        assert decision.result == "injected", decision
        out: dict[str, Any] = jsonpatch.apply_patch(pod, decision.patch)
        if pod is client:
            assert out["spec"]["dnsPolicy"] == "None"
            assert out["spec"]["dnsConfig"]["searches"][0] == (
                f"{manifests.APPS_NAMESPACE}.svc.cluster.local")
        _dry_run_create(api, out)


def test_the_tls_udp_pods_as_injected_are_valid(api: k8s.ApiClient,
                                                rendered: list[dict[str, Any]]) -> None:
    """The TLS/UDP server and the sleeping client as the webhook makes them: Pods the API
    server accepts, whose app containers get $TSNET2_CA_BUNDLE next to the socket."""
    config = _rendered_config(rendered)
    server = manifests.secure_server_pod(IMAGE)
    client = manifests.secure_client_pod(IMAGE)
    assert server["spec"]["containers"][0]["command"] == ["python3", "-c", apps.SECURE_SERVER]
    assert client["spec"]["containers"][0]["command"] == ["sleep", "infinity"]
    for pod in (server, client):
        assert pod["metadata"]["annotations"]["tsnet2.io/state"] == "ephemeral"
        decision = inject(pod, config.sidecar, native_sidecar=True)
        assert decision.result == "injected", decision
        out: dict[str, Any] = jsonpatch.apply_patch(pod, decision.patch)
        app = out["spec"]["containers"][0]
        assert {"name": "TSNET2_CA_BUNDLE", "value": "/var/run/tsnet2/tailnet-ca.pem"} in (
            app["env"])
        _dry_run_create(api, out)


def test_the_node_fields_the_suite_reads_are_in_the_crd() -> None:
    (crd,) = [c for c in crd_manifests() if c["spec"]["names"]["kind"] == "TailnetNode"]
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for field in ("name", "publicKey", "ipv4", "ephemeral", "pod"):
        assert field in spec, field
    assert {"name", "uid"} <= set(spec["pod"]["properties"])
    assert json.dumps(spec["ephemeral"]).count("boolean") == 1
