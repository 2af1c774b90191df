"""Run a real etcd + kube-apiserver on loopback for tests, the way envtest does.

The binaries are built by ``tests/k8s/build-tools.sh`` into a cache directory outside the
repo (see :func:`default_bin_dir`); this module never builds anything.

Usage::

    with KubeAPIServer(default_bin_dir()) as api:
        api.url, api.ca_file, api.admin_cert, api.admin_key, api.kubeconfig

The admin identity is a client certificate with O=system:masters. RBAC authorization is on,
service-account tokens work (TokenRequest/TokenReview). There is no controller-manager,
scheduler or kubelet: nothing creates ``default`` service accounts, finalizes namespaces or
runs pods (as with envtest).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.k8s.pki import CertificateAuthority, write_service_account_keys

BINARIES = ("kube-apiserver", "etcd")
_TOOLS_GOMOD = Path(__file__).resolve().parent / "tools" / "kube" / "go.mod"
_LOG_TAIL_BYTES = 4000
_HTTP_TIMEOUT = 5.0


class KubeAPIServerError(RuntimeError):
    """etcd or kube-apiserver could not be started (the message includes a log tail)."""


def k8s_version(gomod: Path = _TOOLS_GOMOD) -> str:
    """The Kubernetes version pinned by the wrapper module (e.g. ``"1.37.2"``)."""
    try:
        text = gomod.read_text(encoding="utf-8")
    except OSError as exc:
        raise KubeAPIServerError(f"cannot read {gomod}: {exc}") from exc
    match = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+v(\d+\.\d+\.\d+)\b", text, re.M)
    if match is None:
        raise KubeAPIServerError(f"{gomod} does not require k8s.io/kubernetes")
    return match.group(1)


def default_bin_dir() -> Path:
    """Where ``build-tools.sh`` puts the binaries.

    ``$TSNET2_K8S_BIN_DIR`` if set, else
    ``${TSNET2_TOOLS_CACHE:-/var/cache/tsnet2-tools}/k8s-<version>``.
    """
    explicit = os.environ.get("TSNET2_K8S_BIN_DIR")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("TSNET2_TOOLS_CACHE") or "/var/cache/tsnet2-tools"
    return Path(cache) / f"k8s-{k8s_version()}"


def missing_binaries(bin_dir: Path) -> list[str]:
    """Names of required binaries that are absent or not executable in ``bin_dir``."""
    return [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (envtest's approach: a small race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_free_port = free_port


@contextlib.contextmanager
def running_apiserver(extra_args: Sequence[str] = ()) -> Iterator[KubeAPIServer]:
    """A control plane for a test module (``extra_args`` go to kube-apiserver); skips the
    tests when the binaries are not built."""
    import pytest

    bin_dir = default_bin_dir()
    missing = missing_binaries(bin_dir)
    if missing:
        from tests.require import needs

        pytest.skip(needs("k8s",
            f"real Kubernetes binaries not built ({', '.join(missing)} missing in {bin_dir}); "
            "run tests/k8s/build-tools.sh first (needs Go >= 1.26 and the Go module proxy)"
        ))
    with KubeAPIServer(bin_dir, extra_args=extra_args) as api:
        yield api


def admin_client(api: KubeAPIServer) -> Any:
    """A new kubernetes ApiClient as the system:masters admin (use it with ``with``)."""
    from kubernetes import client as k8s

    config = k8s.Configuration()
    config.host = api.url
    config.ssl_ca_cert = str(api.ca_file)
    config.cert_file = str(api.admin_cert)
    config.key_file = str(api.admin_key)
    return k8s.ApiClient(config)


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - _LOG_TAIL_BYTES))
            return fh.read(_LOG_TAIL_BYTES).decode("utf-8", "replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


class _Process:
    """One child process with its output in a log file; stopped by pid."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError:
            self._log.close()
            raise

    def check_alive(self) -> None:
        """Raise :class:`KubeAPIServerError` with the log tail if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise KubeAPIServerError(
                f"{self.name} exited with status {code}; log {self.log_path}:\n"
                f"{_log_tail(self.log_path)}"
            )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps and closes the log."""
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(grace)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait()
        finally:
            self._log.close()


class KubeAPIServer:
    """Context manager running etcd + kube-apiserver on 127.0.0.1 with fresh certificates."""

    def __init__(
        self, bin_dir: Path, *, start_timeout: float = 90.0, extra_args: Sequence[str] = ()
    ) -> None:
        """Prepare (do not start) a control plane using binaries from ``bin_dir``;
        ``extra_args`` are appended to kube-apiserver's command line."""
        self.bin_dir = Path(bin_dir)
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self._tmp: Path | None = None
        self._procs: list[_Process] = []
        self.port = 0
        self.etcd_url = ""

    # -- public attributes, valid while running ---------------------------------------------
    @property
    def url(self) -> str:
        """The apiserver's base URL, e.g. ``https://127.0.0.1:40123``."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        """The service-account token issuer (also the default API audience)."""
        return f"{self.url}/"

    def _path(self, name: str) -> Path:
        if self._tmp is None:
            raise KubeAPIServerError("KubeAPIServer is not running")
        return self._tmp / "pki" / name

    @property
    def ca_file(self) -> Path:
        """CA certificate that signed the apiserver's serving certificate."""
        return self._path("serving-ca.crt")

    @property
    def client_ca_file(self) -> Path:
        """CA the apiserver trusts for client certificates (``--client-ca-file``)."""
        return self._path("client-ca.crt")

    @property
    def admin_cert(self) -> Path:
        """Client certificate of user ``admin`` in group ``system:masters``."""
        return self._path("admin.crt")

    @property
    def admin_key(self) -> Path:
        """Private key of :attr:`admin_cert`."""
        return self._path("admin.key")

    @property
    def kubeconfig(self) -> Path:
        """A kubeconfig (JSON, valid YAML) for the admin user."""
        if self._tmp is None:
            raise KubeAPIServerError("KubeAPIServer is not running")
        return self._tmp / "kubeconfig"

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> KubeAPIServer:
        """Start etcd and kube-apiserver and wait until ``/readyz`` answers ok."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop both processes and delete all temporary files."""
        self.stop()

    def start(self) -> None:
        """Start both processes; on any failure, clean up and raise :class:`KubeAPIServerError`."""
        if self._tmp is not None:
            raise KubeAPIServerError("KubeAPIServer already started")
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise KubeAPIServerError(
                f"missing {', '.join(missing)} in {self.bin_dir}; run tests/k8s/build-tools.sh"
            )
        self._tmp = Path(tempfile.mkdtemp(prefix="tsnet2-kube-"))
        try:
            self._write_pki()
            deadline = time.monotonic() + self.start_timeout
            self._start_etcd(deadline)
            self._start_apiserver(deadline)
            self._write_kubeconfig()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the processes (apiserver first) and remove the temporary directory."""
        procs, self._procs = self._procs, []
        try:
            for proc in reversed(procs):
                proc.stop()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    # -- internals ---------------------------------------------------------------------------
    def _write_pki(self) -> None:
        pki = self._path("")
        pki.mkdir()
        serving_ca = CertificateAuthority("tsnet2-test-serving-ca")
        serving_ca.write_cert(self.ca_file)
        serving_ca.issue(
            pki,
            "apiserver",
            common_name="kube-apiserver",
            server=True,
            dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            ip_addresses=("127.0.0.1", "10.0.0.1"),
        )
        client_ca = CertificateAuthority("tsnet2-test-client-ca")
        client_ca.write_cert(self.client_ca_file)
        client_ca.issue(
            pki, "admin", common_name="admin", organizations=("system:masters",), client=True
        )
        write_service_account_keys(pki)

    def _spawn(self, name: str, argv: list[str]) -> _Process:
        assert self._tmp is not None
        proc = _Process(name, argv, self._tmp / f"{name}.log")
        self._procs.append(proc)
        return proc

    def _start_etcd(self, deadline: float) -> None:
        assert self._tmp is not None
        client_port, peer_port = _free_port(), _free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        proc = self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=default",
                f"--data-dir={self._tmp / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", client_port, timeout=_HTTP_TIMEOUT)
            try:
                conn.request("GET", "/health")
                resp = conn.getresponse()
                body = resp.read(4096)
            finally:
                conn.close()
            return resp.status == 200 and json.loads(body).get("health") == "true"

        self._wait(proc, healthy, deadline, f"etcd /health on {self.etcd_url}")

    def _start_apiserver(self, deadline: float) -> None:
        assert self._tmp is not None
        self.port = _free_port()
        cert_dir = self._tmp / "apiserver-certs"
        cert_dir.mkdir()
        pki = self._path("")
        proc = self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                f"--cert-dir={cert_dir}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={self.client_ca_file}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.port}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--authorization-mode=RBAC",
                "--disable-admission-plugins=ServiceAccount",
                f"--service-account-issuer={self.issuer}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                *self.extra_args,
            ],
        )
        context = self.ssl_context()

        def ready() -> bool:
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.port, context=context, timeout=_HTTP_TIMEOUT
            )
            try:
                conn.request("GET", "/readyz")
                resp = conn.getresponse()
                body = resp.read(4096)
            finally:
                conn.close()
            return resp.status == 200 and body.strip() == b"ok"

        self._wait(proc, ready, deadline, f"kube-apiserver /readyz on {self.url}")

    def _wait(self, proc: _Process, probe: Callable[[], bool], deadline: float, what: str) -> None:
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            proc.check_alive()
            try:
                if probe():
                    return
                last_error = "not ready"
            except (OSError, ValueError, http.client.HTTPException) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.25)
        raise KubeAPIServerError(
            f"timed out after {self.start_timeout:.0f}s waiting for {what} ({last_error}); "
            f"log {proc.log_path}:\n{_log_tail(proc.log_path)}"
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context: trusts :attr:`ca_file`, presents the admin certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return context

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "tsnet2-test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(self.admin_cert),
                        "client-key": str(self.admin_key),
                    },
                }
            ],
            "contexts": [
                {"name": "tsnet2-test", "context": {"cluster": "tsnet2-test", "user": "admin"}}
            ],
            "current-context": "tsnet2-test",
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2), encoding="utf-8")
        self.kubeconfig.chmod(0o600)
