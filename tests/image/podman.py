"""Helpers for the image tests: run podman with the test containers.conf, turn an injected
pod into something `podman kube play` (4.3) runs, and wait with bounds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from copy import deepcopy
from pathlib import Path
from typing import Any

import jsonpatch
import yaml
from tsnet2_operator.config import SidecarConfig
from tsnet2_operator.inject import (
    SIDECAR_NAME,
    SOCKET_VOLUME,
    STATUS,
    TOKEN_VOLUME,
    inject,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
IMAGE = os.environ.get("TSNET2_IMAGE", "localhost/tsnet2:test")  # the full image
SIDECAR_IMAGE = os.environ.get("TSNET2_SIDECAR_IMAGE", "localhost/tsnet2-sidecar:test")
CONTAINERS_CONF = HERE / "containers.conf"
BUILD_HINT = "build it first: tests/image/build.sh (scripts/test does)"


class PodmanError(AssertionError):
    """A podman command failed; the message has the command and its output."""


def podman(*args: str, timeout: float = 60.0, check: bool = True,
           stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS`` with tests/image/containers.conf; raise PodmanError on failure."""
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    proc = subprocess.run(
        ["podman", *args], capture_output=True, timeout=timeout, env=env,
        input=stdin.decode() if stdin is not None else None, text=True, check=False)
    if check and proc.returncode != 0:
        raise PodmanError(f"podman {' '.join(args)} -> {proc.returncode}\n"
                          f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc


def why_not_runnable() -> str | None:
    """None if the image tests can run here, else the reason to skip them."""
    if os.geteuid() != 0:
        return "the image tests need root (rootful podman with /dev/net/tun)"
    for tool in ("podman", "buildah", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; {BUILD_HINT}"
    for image in (IMAGE, SIDECAR_IMAGE):
        if podman("image", "exists", image, check=False).returncode != 0:
            return f"image {image} does not exist; {BUILD_HINT}"
    return None


def wait_for(pred: Callable[[], Any], timeout: float, what: str,
             detail: Callable[[], str] = lambda: "", gone: str | None = None) -> Any:
    """Poll ``pred`` every 0.25 s until it returns something truthy; fail after ``timeout``,
    or at once when container ``gone`` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if gone is not None and podman("inspect", "--format", "{{.State.Status}}", gone,
                                       check=False).stdout.strip() in ("exited", "stopped"):
            value = pred()  # it may have printed just before exiting
            if value:
                return value
            raise AssertionError(f"{gone} exited while waiting for {what}\n{detail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail()}")
        time.sleep(0.25)


def injected_pod(pod: Mapping[str, Any], config: SidecarConfig) -> dict[str, Any]:
    """Run the operator's real injection (regular sidecar: podman has no native sidecars)."""
    decision = inject(pod, config, native_sidecar=False, namespace_labels={})
    assert decision.result == "injected", decision
    patched: dict[str, Any] = jsonpatch.apply_patch(deepcopy(dict(pod)), decision.patch)
    return patched


def for_podman(pod: Mapping[str, Any], auth_key: str, socket_dir: Path) -> dict[str, Any]:
    """Adapt an injected pod to ``podman kube play`` 4.3; each change stands in for something
    only a Kubernetes cluster provides:

    * the socket volume is a fresh root-owned host directory (``socket_dir``), not an
      emptyDir: podman chowns a new volume to the user of the first container that mounts
      it, and when that is the non-root app, tsnet2d (root without CAP_DAC_OVERRIDE)
      cannot create its socket there (a Kubernetes emptyDir is root's, mode 0777);
    * every volume is renamed ``<pod>-<volume>``: podman names an emptyDir volume after
      ``spec.volumes[].name`` and shares it between pods that use the same name;
    * the projected ServiceAccount token volume is removed and the sidecar gets the auth
      key in ``TS_AUTHKEY`` instead: outside Kubernetes there is no token to project and no
      TokenReview for the control server to check it against;
    * downward-API variables podman cannot resolve: ``metadata.namespace`` becomes the
      literal ``default`` (podman has no namespaces), ``status.podIP`` is removed;
    * the sidecar's ``ports`` are removed: podman 4.3 publishes a ``containerPort`` on the
      host, so two pods with the metrics port collide (in Kubernetes it is informational);
    * the ``tsnet2.io/status`` annotation is removed: podman 4.3 rejects annotation values
      longer than 63 characters (Kubernetes allows 256 KiB for all annotations together).
    """
    out = deepcopy(dict(pod))
    out["metadata"]["annotations"].pop(STATUS)
    name = out["metadata"]["name"]
    spec = out["spec"]
    spec["volumes"] = [v for v in spec.get("volumes", []) if v["name"] != TOKEN_VOLUME]
    for v in spec["volumes"]:
        if v["name"] == SOCKET_VOLUME:
            socket_dir.mkdir(mode=0o755)
            v.pop("emptyDir")
            v["hostPath"] = {"path": str(socket_dir), "type": "Directory"}
    renamed = {v["name"]: f"{name}-{v['name']}" for v in spec["volumes"]}
    for v in spec["volumes"]:
        v["name"] = renamed[v["name"]]
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        mounts = [m for m in c.get("volumeMounts", []) if m["name"] != TOKEN_VOLUME]
        for m in mounts:
            m["name"] = renamed.get(m["name"], m["name"])
        if "volumeMounts" in c:
            c["volumeMounts"] = mounts
        if c["name"] == SIDECAR_NAME:
            env = []
            for e in c["env"]:
                path = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                if path == "metadata.namespace":
                    env.append({"name": e["name"], "value": "default"})
                elif path in (None, "metadata.name", "metadata.uid") and (
                        e["name"] != "TSNET2_SA_TOKEN_FILE"):
                    env.append(e)
            c["env"] = [*env, {"name": "TS_AUTHKEY", "value": auth_key}]
            c.pop("ports", None)
    return out


def write_yaml(path: Path, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` as YAML for kube play."""
    path.write_text(yaml.safe_dump(dict(doc), sort_keys=False))
    return path


def infra_ip(pod: str) -> str:
    """The IPv4 address of a pod (its infra container) on its network."""
    infra = podman("pod", "inspect", pod, "--format", "{{.InfraContainerID}}").stdout.strip()
    out = podman("inspect", infra, "--format",
                 "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}").stdout.split()
    assert out, f"pod {pod} has no IP address"
    return out[0]


def leftovers(prefix: str) -> list[str]:
    """Pods, containers, volumes and networks whose names start with ``prefix``."""
    found: list[str] = []
    for kind, args in (("pod", ("pod", "ps", "--format", "{{.Name}}")),
                       ("container", ("ps", "-a", "--format", "{{.Names}}")),
                       ("volume", ("volume", "ls", "--format", "{{.Name}}")),
                       ("network", ("network", "ls", "--format", "{{.Name}}"))):
        names = podman(*args, check=False).stdout.split()
        found += [f"{kind} {n}" for n in names if n.startswith(prefix)]
    return found
