"""The local cluster driver's parts that need no cluster: the README command the suite runs,
the host kubeconfig, the namespace forwarder, the skip reasons."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from tests.e2e.cluster import driver
from tests.e2e.test_cluster import readme_helm_install
from tests.image import podman


def test_the_readme_install_command_with_the_clusters_image() -> None:
    argv = readme_helm_install("localhost/tsnet2", "test")
    assert argv == ["install", "tsnet2", "charts/tsnet2", "-n", "tsnet2-system",
                    "--create-namespace", "--set", "operator.image.repository=localhost/tsnet2",
                    "--set", "operator.image.tag=test"]


def test_the_images_are_where_build_sh_puts_them_and_up_sh_imports_them() -> None:
    """The driver's two images are tests/image/build.sh's defaults (the image tests' too),
    which up.sh imports (lib.sh), and the sidecar is where the chart looks for it by
    default: the operator's repository + ``-sidecar``, the operator's tag."""
    repo = driver.REPO
    assert (driver.IMAGE, driver.SIDECAR_IMAGE) == (
        "localhost/tsnet2:test", "localhost/tsnet2-sidecar:test")
    assert f"{driver.IMAGE_REPOSITORY}-sidecar:{driver.IMAGE_TAG}" == driver.SIDECAR_IMAGE
    build = (repo / "tests" / "image" / "build.sh").read_text(encoding="utf-8")
    lib = (repo / "tests" / "e2e" / "cluster" / "lib.sh").read_text(encoding="utf-8")
    for text in (build, lib):
        assert f"${{TSNET2_IMAGE:-{driver.IMAGE}}}" in text
        assert f"${{TSNET2_SIDECAR_IMAGE:-{driver.SIDECAR_IMAGE}}}" in text
    up = (repo / "tests" / "e2e" / "cluster" / "up.sh").read_text(encoding="utf-8")
    assert 'for image in "$PROJECT_IMAGE" "$PROJECT_SIDECAR_IMAGE"; do' in up
    if "TSNET2_SIDECAR_IMAGE" not in os.environ:
        assert podman.SIDECAR_IMAGE == driver.SIDECAR_IMAGE


def test_host_kubeconfig_points_at_the_forwarder(tmp_path: Path) -> None:
    admin = tmp_path / "admin.kubeconfig"
    admin.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443",
                                               "certificate-authority": "/pki/ca.crt"}}],
        "users": [{"name": "u", "user": {"client-certificate": "/pki/a.crt"}}],
    }))
    out = driver.host_kubeconfig(admin, 40123, tmp_path / "kubeconfig")
    doc = yaml.safe_load(out.read_text())
    assert doc["clusters"][0]["cluster"] == {"server": "https://127.0.0.1:40123",
                                             "certificate-authority": "/pki/ca.crt"}
    assert doc["users"] == [{"name": "u", "user": {"client-certificate": "/pki/a.crt"}}]
    assert out.stat().st_mode & 0o777 == 0o600


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_forwarder_copies_both_ways_and_stops() -> None:
    """Through the namespace the thread is in already (setns into one's own namespace is
    allowed without privileges), to a loopback echo server."""
    srv, served = _echo_server()
    fwd = driver.Forwarder("/proc/self/ns/net", srv.getsockname())
    try:
        with socket.create_connection(("127.0.0.1", fwd.port), timeout=10) as c:
            payload = b"x" * 300_000
            reader_got = bytearray()

            def read() -> None:
                while len(reader_got) < len(payload):
                    chunk = c.recv(65536)
                    if not chunk:
                        return
                    reader_got.extend(chunk)

            reader = threading.Thread(target=read)
            reader.start()
            c.sendall(payload)
            reader.join(30)
            assert bytes(reader_got) == payload.upper()
    finally:
        fwd.close()
        srv.close()
    served.join(10)
    assert not served.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", fwd.port), timeout=2).close()


def test_forwarder_closes_the_client_when_the_target_is_down() -> None:
    free = socket.create_server(("127.0.0.1", 0))
    addr = free.getsockname()
    free.close()  # nothing listens there now
    fwd = driver.Forwarder("/proc/self/ns/net", addr)
    try:
        with socket.create_connection(("127.0.0.1", fwd.port), timeout=10) as c:
            c.settimeout(20)
            assert c.recv(10) == b""
    finally:
        fwd.close()


def test_why_skip_names_what_is_missing(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setenv("TSNET2_CLUSTER_BIN", str(tmp_path / "nothing"))
    reason = driver.why_skip()
    assert reason is not None
    if reason.startswith("the local cluster needs root"):
        return
    assert "kubelet, kube-controller-manager, kube-scheduler, kube-proxy, kubectl, coredns" \
        in reason, reason
    assert "run tests/e2e/cluster/build.sh" in reason


def test_bin_dir_follows_the_pinned_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TSNET2_CLUSTER_BIN", raising=False)
    monkeypatch.setenv("TSNET2_TOOLS_CACHE", "/cache")
    version = driver.k8s_version()
    assert version.count(".") == 2 and version[0].isdigit(), version
    assert driver.bin_dir() == Path(f"/cache/cluster-k8s-{version}")
