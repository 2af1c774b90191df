"""The local driver of the end-to-end suite: a real single-node Kubernetes (kubelet +
containerd, kube-proxy in nftables mode, CoreDNS) inside a network namespace of its own
whose only way out is a device that drops everything (``up.sh``; README.md here).

The test process stays on the host. It reaches the API server (``127.0.0.1:6443`` inside the
cluster's namespace) through :class:`Forwarder`: a loopback port on the host whose every
connection is made from a thread that entered the cluster's network namespace (``setns``
moves only the calling thread). Nothing else crosses: pods, ClusterIPs and the tailnet stay
inside.

:class:`LocalCluster` brings the cluster up (``up.sh``) unless it is up already (a developer's
``make cluster-up``), and takes it down (``down.sh``) at the end only if it brought it up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml  # type: ignore[import-untyped]

from tests.e2e import podlogs
from tests.e2e.kind.cluster import (
    ClusterError,
    helm_env,
    run,
    run_uninterrupted,
    say,
    sigterm_as_interrupt,
)
from tests.k8s.apiserver import default_bin_dir

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
UP = HERE / "up.sh"
DOWN = HERE / "down.sh"
BUILD = HERE / "build.sh"
NAME = os.environ.get("TSNET2_CLUSTER_NAME", "tsnet2-cluster")
STATE = Path(os.environ.get("TSNET2_CLUSTER_STATE", f"/var/lib/{NAME}"))
IMAGE_REPOSITORY = "localhost/tsnet2"
IMAGE_TAG = "test"
IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"  # tests/image/build.sh, imported by up.sh
# The sidecar image (tests/image/build.sh, imported by up.sh too), where the chart looks for
# it by default: the operator's repository + "-sidecar", the operator's tag.
SIDECAR_IMAGE = f"{IMAGE_REPOSITORY}-sidecar:{IMAGE_TAG}"
APISERVER = ("127.0.0.1", 6443)
POD_LOGS = STATE / "pod-logs"  # up.sh's kubelet podLogsDir: on the host's file system
CLONE_NEWNET = 0x40000000
_BUF = 64 * 1024
PACKAGES = {"containerd": "containerd", "runc": "runc", "nft": "nftables",
            "conntrack": "conntrack", "iptables": "iptables", "curl": "curl",
            "openssl": "openssl", "nsenter": "util-linux"}


def k8s_version() -> str:
    """The Kubernetes version pinned by the wrapper module ``tools/kube/go.mod``."""
    for line in (HERE / "tools" / "kube" / "go.mod").read_text().splitlines():
        parts = line.split()
        if "k8s.io/kubernetes" in parts:
            return parts[parts.index("k8s.io/kubernetes") + 1].lstrip("v")
    raise ClusterError("tests/e2e/cluster/tools/kube/go.mod does not require k8s.io/kubernetes")


def bin_dir() -> Path:
    """Where build.sh puts the cluster's binaries (the same rule as lib.sh)."""
    explicit = os.environ.get("TSNET2_CLUSTER_BIN")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("TSNET2_TOOLS_CACHE") or "/var/cache/tsnet2-tools")
    return cache / f"cluster-k8s-{k8s_version()}"


BINARIES = ("kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubectl",
            "coredns")


def why_skip() -> str | None:
    """None when the local cluster can run here; else why not and what to do."""
    if os.geteuid() != 0:
        return "the local cluster needs root (network and mount namespaces, containerd)"
    missing = [b for b in BINARIES if not os.access(bin_dir() / b, os.X_OK)]
    missing += [b for b in ("kube-apiserver", "etcd", "helm")
                if not os.access(default_bin_dir() / b, os.X_OK)]
    if missing:
        return (f"the local cluster's binaries are not built ({', '.join(missing)}); run "
                "tests/e2e/cluster/build.sh and tests/k8s/build-tools.sh (Go >= 1.26)")
    tools = [PACKAGES[t] for t in PACKAGES if shutil.which(t) is None]
    if not os.access("/usr/lib/cni/bridge", os.X_OK):
        tools.append("containernetworking-plugins")
    if tools:
        return f"missing Debian packages for the local cluster: apt-get install {' '.join(tools)}"
    for image in (IMAGE, SIDECAR_IMAGE):
        if shutil.which("podman") is None or subprocess.run(
                ["podman", "image", "exists", image], check=False,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
            return f"image {image} does not exist; run tests/image/build.sh"
    return None


def is_up() -> bool:
    """True when the cluster's API server process runs (up.sh recorded its pid)."""
    pid_file = STATE / "pids" / "kube-apiserver"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/run/netns/{NAME}").exists()


def leftovers() -> list[str]:
    """What of the cluster is still there after down.sh: its network namespace, mounts,
    processes (by the pids up.sh recorded), cgroups and state directory."""
    left = []
    if Path(f"/run/netns/{NAME}").exists():
        left.append(f"network namespace {NAME}")
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
              if NAME in line.split()[1]]
    left += [f"mount {m}" for m in mounts]
    left += [f"cgroup {d}" for d in Path("/sys/fs/cgroup").glob(f"*/{NAME}")]
    if STATE.exists():
        left.append(f"state directory {STATE}")
    marks = (str(STATE).encode(), f"/run/{NAME}-ns".encode(), f"/run/netns/{NAME}".encode())
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if any(m in cmdline for m in marks):
            argv = cmdline.replace(b"\0", b" ")[:120].decode("utf-8", "replace")
            left.append(f"process {proc.name}: {argv}")
    return left


_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(path: str | Path) -> None:
    """Move the *calling thread* into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Forwarder:
    """``127.0.0.1:<port>`` on the host → ``target`` inside a network namespace.

    One thread accepts; each connection gets a thread that enters the namespace, connects
    and copies both ways until either side closes. :meth:`close` stops and joins them all.
    """

    def __init__(self, netns: str | Path, target: tuple[str, int]) -> None:
        """Listen on an ephemeral loopback port (see :attr:`port`)."""
        self.netns = Path(netns)
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stop_r, self._stop_w = os.pipe()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept_loop, name="forward-accept",
                                          daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._listener, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._pump, args=(conn,), name="forward-conn",
                                 daemon=True)
            with self._lock:
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _pump(self, conn: socket.socket) -> None:
        with conn:
            try:
                enter_netns(self.netns)
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                return
            with upstream:
                upstream.settimeout(None)
                socks = [conn, upstream]
                while True:
                    ready, _, _ = select.select([*socks, self._stop_r], [], [])
                    if self._stop_r in ready:
                        return
                    for s in ready:
                        try:
                            data = s.recv(_BUF)
                        except OSError:
                            return
                        if not data:
                            return
                        other = upstream if s is conn else conn
                        try:
                            other.sendall(data)
                        except OSError:
                            return

    def close(self) -> None:
        """Stop accepting, cut every connection, join the threads."""
        os.write(self._stop_w, b"x")
        self._accepter.join(10)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(10)
        self._listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def host_kubeconfig(admin: Path, port: int, dest: Path) -> Path:
    """``admin`` (server ``https://127.0.0.1:6443`` in the namespace) with the server moved to
    the forwarder's host port (the API server's certificate names 127.0.0.1: TLS still
    verifies)."""
    doc = yaml.safe_load(admin.read_text())
    for c in doc["clusters"]:
        c["cluster"]["server"] = f"https://127.0.0.1:{port}"
    dest.write_text(yaml.safe_dump(doc))
    dest.chmod(0o600)
    return dest


class LocalCluster:
    """The local cluster for one test session: up on enter (unless already up), the API
    server forwarded to the host, down on exit (only if this object brought it up)."""

    name = NAME
    image = IMAGE
    image_repository = IMAGE_REPOSITORY
    image_tag = IMAGE_TAG
    sidecar_image = SIDECAR_IMAGE
    driver = "local"

    def __init__(self, workdir: Path) -> None:
        """Prepare (do not start) the cluster; ``workdir`` holds the host kubeconfig and
        helm's home."""
        self.workdir = workdir
        self.kubeconfig = workdir / "kubeconfig"
        self._owned = False
        self._forwarder: Forwarder | None = None
        self._signals: contextlib.ExitStack | None = None

    def __enter__(self) -> LocalCluster:
        """Bring the cluster up (or reuse it) and forward its API server. While it is up,
        SIGTERM raises ``KeyboardInterrupt``, so a stopped run still takes it down."""
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(sigterm_as_interrupt())
        try:
            if is_up():
                say(f"using the running local cluster {NAME} (left up afterwards)")
            else:
                self._owned = True
                run([str(UP)], timeout=900, what="tests/e2e/cluster/up.sh",
                    env={**os.environ, "TSNET2_CLUSTER_SKIP_BUILD": "1"})
            self._forwarder = Forwarder(f"/run/netns/{NAME}", APISERVER)
            host_kubeconfig(STATE / "admin.kubeconfig", self._forwarder.port, self.kubeconfig)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop forwarding; take the cluster down if this object brought it up."""
        try:
            if self._forwarder is not None:
                self._forwarder.close()
                self._forwarder = None
            if self._owned:
                code = run_uninterrupted([str(DOWN)], timeout=300)
                self._owned = False
                left = leftovers()
                if code != 0 or left:
                    raise ClusterError(f"tests/e2e/cluster/down.sh exited {code}; left behind: "
                                       f"{'; '.join(left) or 'nothing'}. Run it again by hand")
        finally:
            if self._signals is not None:
                self._signals.close()
                self._signals = None

    def prepare_image(self) -> None:
        """Nothing to build: up.sh imported :data:`IMAGE` and :data:`SIDECAR_IMAGE` from
        podman into containerd."""

    def helm(self, *argv: str, timeout: float = 300) -> str:
        """Run the project's helm against this cluster, with a home of its own."""
        return run([str(default_bin_dir() / "helm"), *argv], timeout=timeout,
                   env=helm_env(self.workdir / "helm-home", self.kubeconfig),
                   what=f"helm {argv[0]}")

    def kubectl_argv(self) -> list[str]:
        """The cluster's kubectl (same build as the API server) with the host kubeconfig."""
        return [str(bin_dir() / "kubectl"), "--kubeconfig", str(self.kubeconfig)]

    def api_client(self) -> Any:
        """A kubernetes ApiClient for the cluster (use it with ``with``)."""
        from kubernetes import config

        new_client: Callable[..., Any] = config.new_client_from_config
        return new_client(config_file=str(self.kubeconfig), persist_config=False)

    @staticmethod
    def container_log_dir(namespace: str, pod: str, uid: str, container: str) -> Path:
        """The kubelet's log directory of a container (the node's ``/var/log/pods/...``:
        ``podLogsDir`` is a directory of the host, so the test reads it directly)."""
        return Path(podlogs.container_log_dir(POD_LOGS, namespace, pod, uid, container))

    def read_container_log(self, namespace: str, pod: str, uid: str, container: str) -> str:
        """Every kubelet log file of the container (CRI format), oldest first."""
        return podlogs.read_container_log(
            self.container_log_dir(namespace, pod, uid, container))

    def follow_container_log(self, namespace: str, pod: str, uid: str,
                             container: str) -> podlogs.FileFollower:
        """Follow the container's current kubelet log file from its first byte, holding it
        open as a collector does (see :class:`podlogs.FileFollower`)."""
        return podlogs.FileFollower(self.container_log_dir(namespace, pod, uid, container))

