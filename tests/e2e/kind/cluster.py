"""The kind driver of the end-to-end suite: find the tools, say why the suite cannot run,
build the command lines, and own one kind cluster for its lifetime.

Nothing here runs at import. :func:`why_skip` is cheap enough for collection (one
``docker info`` when opted in). :class:`KindCluster` creates a cluster named
``tsnet2-e2e-<random>`` (or ``$TSNET2_E2E_CLUSTER``, which ``scripts/e2e-kind`` sets so its
exit trap can delete the same cluster), with its kubeconfig in a directory of its own (the
user's ``~/.kube/config`` is never touched), and deletes it on the way out, also after an
error, Ctrl-C or SIGTERM (turned into ``KeyboardInterrupt`` while the cluster exists).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from tests.e2e import podlogs
from tests.k8s.apiserver import default_bin_dir

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "tsnet2"

OPT_IN_ENV = "TSNET2_E2E_KIND"
CLUSTER_ENV = "TSNET2_E2E_CLUSTER"
RUN_HINT = "run `make e2e-kind` (scripts/e2e-kind)"
KIND_MODULE = "sigs.k8s.io/kind"
KIND_VERSION = "v0.33.0"
CLUSTER_PREFIX = "tsnet2-e2e-"
IMAGE_REPOSITORY = "tsnet2"
IMAGE_TAG = "kind-e2e"
IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
# The sidecar image (the Containerfile's `sidecar` target), where the chart looks for it by
# default: the operator's repository + "-sidecar", the operator's tag.
SIDECAR_IMAGE = f"{IMAGE_REPOSITORY}-sidecar:{IMAGE_TAG}"
SIDECAR_TARGET = "sidecar"
RELEASE = "tsnet2"
OPERATOR_NAMESPACE = "tsnet2-system"
NODE_POD_LOGS = "/var/log/pods"  # the kubelet's container logs in the node container
# What the Containerfile copies: the allow-list of .containerignore (a test checks both agree).
BUILD_CONTEXT = ("Containerfile", "pyproject.toml", "README.md", "image", "tsnet2", "operator")
_CONTEXT_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
_OUTPUT_TAIL = 4000


class ClusterError(RuntimeError):
    """A tool the suite drives failed; the message has the command and its output's tail."""


# ---- finding the tools ------------------------------------------------------------------

def tools_cache() -> Path:
    """``$TSNET2_TOOLS_CACHE`` or ``/var/cache/tsnet2-tools`` (shared with tests/k8s)."""
    return Path(os.environ.get("TSNET2_TOOLS_CACHE") or "/var/cache/tsnet2-tools")


def kind_cache_dir(cache: Path | None = None) -> Path:
    """Where ``scripts/e2e-kind`` installs kind: ``<cache>/kind-<version>``."""
    return (cache or tools_cache()) / f"kind-{KIND_VERSION}"


def find_kind(path: str | None = None, cache: Path | None = None) -> Path | None:
    """kind on ``path`` (default ``$PATH``), else the cached one; None when neither exists."""
    found = shutil.which("kind", path=path)
    if found:
        return Path(found)
    cached = kind_cache_dir(cache) / "kind"
    return cached if os.access(cached, os.X_OK) else None


def helm_binary() -> Path:
    """The helm built by tests/k8s/build-tools.sh (the chart tests use the same one)."""
    return default_bin_dir() / "helm"


def kind_install_argv(go: str) -> list[str]:
    """``go install`` of the pinned kind (run with ``GOBIN`` = :func:`kind_cache_dir`)."""
    return [go, "install", f"{KIND_MODULE}@{KIND_VERSION}"]


def docker_engine_problem(docker: str | None, timeout: float = 20.0) -> str | None:
    """None when ``docker info`` reaches an engine; else what is wrong, in one sentence.

    The client binary alone proves nothing (it exists on machines without a daemon), so
    this asks the engine.
    """
    if docker is None:
        return "docker is not installed (no `docker` on PATH)"
    try:
        proc = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"no Docker engine: `docker info` did not answer within {timeout:.0f}s"
    except OSError as exc:
        return f"docker cannot run: {exc}"
    version = proc.stdout.strip()
    if proc.returncode == 0 and version:
        return None
    said = " ".join((proc.stderr or proc.stdout).split())[:300] or f"exit {proc.returncode}"
    return f"no Docker engine: `docker info` failed ({said})"


def missing_prerequisites(path: str | None = None, cache: Path | None = None,
                          helm: Path | None = None) -> list[str]:
    """What keeps the cluster tests from running, one actionable sentence each."""
    problems = []
    engine = docker_engine_problem(shutil.which("docker", path=path))
    if engine:
        problems.append(engine + "; start a Docker engine")
    if find_kind(path, cache) is None:
        go = "Go is on PATH, so scripts/e2e-kind installs it" if shutil.which(
            "go", path=path) else "install Go or kind"
        problems.append(f"kind is not installed (not on PATH nor in {kind_cache_dir(cache)}); "
                        f"{go} (`go install {KIND_MODULE}@{KIND_VERSION}`)")
    if shutil.which("kubectl", path=path) is None:
        problems.append("kubectl is not installed (not on PATH); install it")
    helm = helm or helm_binary()
    if not os.access(helm, os.X_OK):
        problems.append(f"helm is not built ({helm} missing); run tests/k8s/build-tools.sh")
    return problems


def why_skip(environ: Mapping[str, str] | None = None, path: str | None = None,
             cache: Path | None = None, helm: Path | None = None) -> str | None:
    """None when the cluster tests should run; else the skip message.

    Not opted in (``TSNET2_E2E_KIND`` is not ``1``): no tool is even looked at.
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_IN_ENV) != "1":
        return f"kind end-to-end suite is opt-in: {RUN_HINT}, or set {OPT_IN_ENV}=1"
    problems = missing_prerequisites(path, cache, helm)
    if problems:
        return "kind end-to-end suite cannot run: " + "; ".join(problems)
    return None


# ---- command lines ------------------------------------------------------------------------

def cluster_name(environ: Mapping[str, str] | None = None) -> str:
    """``$TSNET2_E2E_CLUSTER`` when it is one of ours, else ``tsnet2-e2e-<6 hex>``."""
    env = os.environ if environ is None else environ
    name = env.get(CLUSTER_ENV, "")
    if name:
        if not (name.startswith(CLUSTER_PREFIX) and len(name) <= 40
                and all(c.isalnum() or c == "-" for c in name) and name.islower()):
            raise ClusterError(f"{CLUSTER_ENV}={name!r}: expected {CLUSTER_PREFIX}<lowercase "
                               "letters, digits, '-'>, at most 40 characters")
        return name
    return CLUSTER_PREFIX + secrets.token_hex(3)


def kind_create_argv(kind: Path, name: str, kubeconfig: Path, *, wait: str = "120s",
                     node_image: str = "") -> list[str]:
    """``kind create cluster`` writing its kubeconfig to ``kubeconfig`` only."""
    argv = [str(kind), "create", "cluster", "--name", name, "--kubeconfig", str(kubeconfig),
            "--wait", wait]
    if node_image:
        argv += ["--image", node_image]
    return argv


def kind_delete_argv(kind: Path, name: str, kubeconfig: Path) -> list[str]:
    """``kind delete cluster`` (succeeds when the cluster does not exist)."""
    return [str(kind), "delete", "cluster", "--name", name, "--kubeconfig", str(kubeconfig)]


def kind_load_argv(kind: Path, name: str, image: str) -> list[str]:
    """``kind load docker-image``: copy the image from the Docker engine into the nodes."""
    return [str(kind), "load", "docker-image", image, "--name", name]


def docker_build_argv(docker: Path, image: str, context: Path, *, base: str = "",
                      revision: str = "unknown", target: str = "") -> list[str]:
    """``docker build`` of the Containerfile in ``context`` (see :func:`make_build_context`).

    ``base`` overrides the Containerfile's ``BASE`` (default: the public slim Python image);
    ``target`` picks a stage (default: the last, the full image; ``sidecar``: the sidecar).
    """
    argv = [str(docker), "build", "-f", str(context / "Containerfile"), "-t", image,
            "--build-arg", f"REVISION={revision}",
            "--build-arg", f"CREATED={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"]
    if target:
        argv += ["--target", target]
    if base:
        argv += ["--build-arg", f"BASE={base}"]
    return [*argv, str(context)]


def helm_install_argv(*values_files: Path, release: str = RELEASE,
                      namespace: str = OPERATOR_NAMESPACE, chart: Path = CHART) -> list[str]:
    """``helm install`` of the chart with ``values_files`` in order (later ones win).
    Readiness is awaited through the API afterwards, not with ``--wait``."""
    argv = ["install", release, str(chart), "--namespace", namespace, "--create-namespace"]
    for path in values_files:
        argv += ["-f", str(path)]
    return argv


def helm_env(home: Path, kubeconfig: Path | None = None) -> dict[str, str]:
    """helm's environment: an isolated home (no user config, cache or plugins) and, to talk
    to a cluster, its kubeconfig."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


def make_build_context(dest: Path, repo: Path = REPO) -> Path:
    """Copy what the Containerfile needs (:data:`BUILD_CONTEXT`) into ``dest``: docker reads
    ``.dockerignore``, not ``.containerignore``, so the repo itself (with ``.venv``) is no
    context to send."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in BUILD_CONTEXT:
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=_CONTEXT_IGNORE)
        else:
            shutil.copy2(src, dest / name)
    return dest


def revision(repo: Path = REPO) -> str:
    """The checked-out commit, or ``unknown``."""
    try:
        proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


# ---- running --------------------------------------------------------------------------------

def say(message: str) -> None:
    """Progress on stderr (shown with ``pytest -s``, and in the failure report otherwise)."""
    print(f"e2e-kind: {message}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
        what: str = "") -> str:
    """Run a command, return its stdout; raise :class:`ClusterError` with the output's tail."""
    start = time.monotonic()
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(env) if env is not None else None)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as exc:  # a timeout, or Ctrl-C/SIGTERM: stop the child, reap it
        proc.kill()
        stdout, stderr = proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise ClusterError(f"{what or argv[0]}: `{' '.join(argv)}` timed out after "
                               f"{timeout:.0f}s\n{stderr[-_OUTPUT_TAIL:]}") from None
        raise
    if proc.returncode != 0:
        raise ClusterError(f"{what or argv[0]}: `{' '.join(argv)}` exited {proc.returncode}\n"
                           f"stdout: {stdout[-_OUTPUT_TAIL:]}\nstderr: {stderr[-_OUTPUT_TAIL:]}")
    say(f"{what or argv[0]} done in {time.monotonic() - start:.0f}s")
    return stdout


def run_uninterrupted(argv: Sequence[str], timeout: float) -> int:
    """Run a clean-up command to its end: in its own session (a terminal's Ctrl-C does not
    reach it) and waiting through ``KeyboardInterrupt``. Returns its exit status."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return proc.wait(max(0.1, deadline - time.monotonic()))
        except KeyboardInterrupt:
            say(f"still cleaning up (`{' '.join(argv)}`); please wait")
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -1


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises ``KeyboardInterrupt`` so ``finally`` blocks (the cluster's
    deletion) run; scripts/e2e-kind forwards Ctrl-C to pytest as SIGTERM."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Tools:
    """The binaries the driver runs."""

    docker: Path
    kind: Path
    helm: Path

    @classmethod
    def find(cls) -> Tools:
        """The tools on this machine; :class:`ClusterError` naming what is missing."""
        problems = missing_prerequisites()
        docker, kind = shutil.which("docker"), find_kind()
        if problems or docker is None or kind is None:
            raise ClusterError("; ".join(problems) or "docker or kind not found")
        return cls(Path(docker), kind, helm_binary())


class KindCluster:
    """One kind cluster, created on enter and deleted on exit (whatever happened).

    ``workdir`` holds the kubeconfig, the build context and the helm home. The suite
    (tests/e2e/test_cluster.py) drives it through the same few members as the local
    cluster's driver (tests/e2e/cluster/driver.py): ``image*``, :meth:`prepare_image`,
    :meth:`helm`, :meth:`kubectl_argv`, :meth:`api_client`.
    """

    driver = "kind"
    image = IMAGE
    image_repository = IMAGE_REPOSITORY
    image_tag = IMAGE_TAG
    sidecar_image = SIDECAR_IMAGE

    def __init__(self, tools: Tools, workdir: Path, name: str | None = None,
                 node_image: str | None = None) -> None:
        """Prepare (do not create) the cluster ``name`` (default :func:`cluster_name`)."""
        self.tools = tools
        self.workdir = workdir
        self.name = name or cluster_name()
        self.node_image = (os.environ.get("TSNET2_E2E_NODE_IMAGE", "")
                           if node_image is None else node_image)
        self.kubeconfig = workdir / "kubeconfig"
        self._created = False
        self._signals: contextlib.ExitStack | None = None

    def __enter__(self) -> KindCluster:
        """Create the cluster (deleting whatever was created if that fails)."""
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(sigterm_as_interrupt())
        try:
            self.create()
        except BaseException:
            self.delete()
            self._signals.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Delete the cluster."""
        try:
            self.delete()
        finally:
            if self._signals is not None:
                self._signals.close()

    def create(self) -> None:
        """``kind create cluster``; waits for the control plane to be ready."""
        say(f"creating kind cluster {self.name} (kubeconfig {self.kubeconfig})")
        self._created = True  # from here on a half-created cluster must be deleted
        run(kind_create_argv(self.tools.kind, self.name, self.kubeconfig,
                             node_image=self.node_image), timeout=600, what="kind create cluster")

    def delete(self) -> None:
        """``kind delete cluster``, to the end even through Ctrl-C; never raises."""
        if not self._created:
            return
        say(f"deleting kind cluster {self.name}")
        code = run_uninterrupted(kind_delete_argv(self.tools.kind, self.name, self.kubeconfig),
                                 timeout=300)
        if code != 0:
            say(f"`kind delete cluster --name {self.name}` exited {code}: delete it by hand")
        else:
            self._created = False

    def build_and_load(self, image: str = IMAGE, sidecar_image: str = SIDECAR_IMAGE) -> None:
        """``docker build`` both images from a clean context (the full one, the
        Containerfile's default target, and the sidecar one), then ``kind load`` them."""
        context = make_build_context(self.workdir / "build-context")
        base = os.environ.get("TSNET2_BASE_IMAGE", "")
        for name, target in ((image, ""), (sidecar_image, SIDECAR_TARGET)):
            say(f"building {name}" + (f" (--target {target})" if target else "")
                + (f" on {base}" if base else ""))
            run(docker_build_argv(self.tools.docker, name, context, base=base,
                                  revision=revision(), target=target),
                timeout=1800, what="docker build")
        shutil.rmtree(context, ignore_errors=True)
        for name in (image, sidecar_image):
            run(kind_load_argv(self.tools.kind, self.name, name), timeout=600,
                what="kind load docker-image")

    def prepare_image(self) -> None:
        """Build both images with docker and load them into the nodes."""
        self.build_and_load(self.image, self.sidecar_image)

    def kubectl_argv(self) -> list[str]:
        """kubectl (from ``PATH``) with this cluster's kubeconfig."""
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise ClusterError("kubectl is not installed (not on PATH)")
        return [kubectl, "--kubeconfig", str(self.kubeconfig)]

    def helm(self, *argv: str, timeout: float = 300) -> str:
        """Run the real helm against this cluster, with a home of its own."""
        return run([str(self.tools.helm), *argv], timeout=timeout,
                   env=helm_env(self.workdir / "helm-home", self.kubeconfig),
                   what=f"helm {argv[0]}")

    def api_client(self) -> Any:
        """A kubernetes ApiClient for the cluster (use it with ``with``)."""
        from kubernetes import config

        new_client: Callable[..., Any] = config.new_client_from_config
        return new_client(config_file=str(self.kubeconfig), persist_config=False)

    def _node_argv(self, *argv: str) -> list[str]:
        return [str(self.tools.docker), "exec", f"{self.name}-control-plane", *argv]

    def read_container_log(self, namespace: str, pod: str, uid: str, container: str) -> str:
        """Every kubelet log file of the container (CRI format), oldest first, read in the
        node container."""
        directory = podlogs.container_log_dir(NODE_POD_LOGS, namespace, pod, uid, container)
        names = run(self._node_argv("ls", "-1", str(directory)), timeout=60,
                    what="list the container's log files").split()
        return "".join(
            run(self._node_argv("zcat" if name.endswith(".gz") else "cat",
                                str(directory / name)), timeout=120, what=f"read {name}")
            for name in podlogs.log_file_order(names))

    def follow_container_log(self, namespace: str, pod: str, uid: str,
                             container: str) -> podlogs.ProcessFollower:
        """Follow the container's current kubelet log file from its first byte (``tail -F``
        in the node container)."""
        directory = podlogs.container_log_dir(NODE_POD_LOGS, namespace, pod, uid, container)
        return podlogs.ProcessFollower(self._node_argv(
            "sh", "-c", f"exec tail -c +1 -F \"$(ls -1 {directory}/*.log | sort -V | tail -1)\""))
