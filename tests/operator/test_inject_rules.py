"""One test per injection rule, on small pods built in code (the golden files cover shapes)."""

from __future__ import annotations

import json
from typing import Any

import jsonpatch
import pytest
from tsnet2_operator.config import SidecarConfig
from tsnet2_operator.inject import (
    STATUS,
    InjectionRejected,
    inject,
    wants_namespace_labels,
)

CFG = SidecarConfig(image="img:1", control_url="http://control:8080")
ON = {"tsnet2.io/inject": "enabled"}


def pod(annotations: dict[str, str] | None = None, name: str | None = "web",
        **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": "ns", "annotations": dict(annotations or {})}
    if name:
        meta["name"] = name
    return {"metadata": meta,
            "spec": {"containers": [{"name": "app", "image": "a:1"}], **spec}}


def patched(p: dict[str, Any], *, native: bool = True,
            labels: dict[str, str] | None = None) -> dict[str, Any]:
    d = inject(p, CFG, native_sidecar=native, namespace_labels=labels)
    assert d.result == "injected", d
    out: dict[str, Any] = jsonpatch.apply_patch(p, d.patch)
    return out


def sidecar(p: dict[str, Any]) -> dict[str, Any]:
    every = p["spec"].get("initContainers", []) + p["spec"]["containers"]
    return next(c for c in every if c["name"] == "tsnet2d")


def arg(c: dict[str, Any], flag: str) -> str | None:
    args: list[str] = c["args"]
    return args[args.index(flag) + 1] if flag in args else None


def test_opt_in_by_namespace_label_or_pod_annotation() -> None:
    assert inject(pod(), CFG, native_sidecar=True,
                  namespace_labels=ON).reason == "namespace_label"
    assert inject(pod(ON), CFG, native_sidecar=True).reason == "pod_annotation"
    skipped = inject(pod(), CFG, native_sidecar=True, namespace_labels={"tsnet2.io/inject": "x"})
    assert (skipped.result, skipped.reason, skipped.patch) == ("skipped", "not_opted_in", [])
    assert wants_namespace_labels(pod()) and not wants_namespace_labels(pod(ON))


def test_pod_opt_out_beats_namespace() -> None:
    d = inject(pod({"tsnet2.io/inject": "disabled"}), CFG, native_sidecar=True,
               namespace_labels=ON)
    assert (d.result, d.reason) == ("skipped", "pod_opted_out")


def test_host_network_and_already_injected_are_skipped() -> None:
    assert inject(pod(ON, hostNetwork=True), CFG,
                  native_sidecar=True).reason == "host_network"
    assert inject(pod({**ON, STATUS: "{}"}), CFG,
                  native_sidecar=True).reason == "already_injected"


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("tsnet2.io/inject", "yes", "enabled, disabled"),
    ("tsnet2.io/state", "disk", "ephemeral, persistent"),
    ("tsnet2.io/traffic-log", "all", "payload, metadata, off"),
    ("tsnet2.io/keep-net-raw", "1", "true, false"),
])
def test_invalid_values_name_the_annotation_and_allowed_values(
        key: str, value: str, allowed: str) -> None:
    with pytest.raises(InjectionRejected) as info:
        inject(pod({**ON, key: value}), CFG, native_sidecar=True)
    assert info.value.reason == "invalid_annotation"
    assert key in str(info.value) and allowed in str(info.value) and value in str(info.value)


def test_native_vs_regular_sidecar() -> None:
    native = patched(pod(ON), native=True)
    assert sidecar(native)["restartPolicy"] == "Always"
    assert [c["name"] for c in native["spec"]["initContainers"]] == ["tsnet2d"]
    regular = patched(pod(ON), native=False)
    assert [c["name"] for c in regular["spec"]["containers"]] == ["tsnet2d", "app"]
    assert "restartPolicy" not in sidecar(regular)
    assert regular["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"


def test_sidecar_shape() -> None:
    c = sidecar(patched(pod({**ON, "tsnet2.io/tags": "tag:a,tag:b"})))
    assert c["image"] == "img:1" and c["command"] == ["tsnet2d"]
    assert arg(c, "--socket") == "/var/run/tsnet2/tsnet2.sock"
    assert arg(c, "--state-dir") == "/var/lib/tsnet2"
    assert arg(c, "--hostname") == "web" and arg(c, "--advertise-tags") == "tag:a,tag:b"
    assert arg(c, "--traffic-log-mode") == "payload"
    assert {"--up", "--allow-any-uid", "--ephemeral"} <= set(c["args"])
    env = {e["name"]: e for e in c["env"]}
    assert env["TS_CONTROL_URL"]["value"] == "http://control:8080"
    assert env["TSNET2_SA_TOKEN_FILE"]["value"] == "/var/run/secrets/tsnet2/token"
    for name, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                       ("POD_UID", "metadata.uid"), ("POD_IP", "status.podIP")):
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == path
    assert c["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 9464}
    assert c["resources"]["requests"] == {"cpu": "10m", "memory": "64Mi"}
    assert any(m["mountPath"] == "/dev/net/tun" for m in c["volumeMounts"])


def test_kernel_backend_has_no_tun() -> None:
    p = pod(ON)
    d = inject(p, SidecarConfig(image="i", control_url="http://c", backend="kernel"),
               native_sidecar=True)
    out = jsonpatch.apply_patch(p, d.patch)
    assert all(v["name"] != "tsnet2-tun" for v in out["spec"]["volumes"])
    assert arg(sidecar(out), "--backend") == "kernel"


def test_state_volumes() -> None:
    eph = patched(pod(ON))
    assert {"name": "tsnet2-state", "emptyDir": {}} in eph["spec"]["volumes"]
    per = patched(pod({**ON, "tsnet2.io/state": "persistent", "tsnet2.io/hostname": "db"}))
    assert {"name": "tsnet2-state", "persistentVolumeClaim": {"claimName": "tsnet2-state-db"}} \
        in per["spec"]["volumes"]
    assert "--ephemeral" not in sidecar(per)["args"]


def test_generate_name_pods() -> None:
    c = sidecar(patched(pod(ON, name=None)))
    assert arg(c, "--hostname") == "$(POD_NAME)"
    with pytest.raises(InjectionRejected, match=r"tsnet2\.io/hostname"):
        inject(pod({**ON, "tsnet2.io/state": "persistent"}, name=None), CFG, native_sidecar=True)


def test_app_containers_get_socket_and_lose_net_raw() -> None:
    p = pod(ON)
    p["spec"]["containers"].append({"name": "b", "image": "b:1", "securityContext": {
        "capabilities": {"add": ["NET_RAW"]}}})
    d = inject(p, CFG, native_sidecar=True)
    out = jsonpatch.apply_patch(p, d.patch)
    assert d.net_raw_dropped == ("app", "b") and "dropped NET_RAW from app, b" in d.message
    for c in out["spec"]["containers"]:
        assert {"name": "TSNET2_SOCKET", "value": "/var/run/tsnet2/tsnet2.sock"} in c["env"]
        assert {"name": "tsnet2-socket", "mountPath": "/var/run/tsnet2", "readOnly": True} \
            in c["volumeMounts"]
        assert "NET_RAW" in c["securityContext"]["capabilities"]["drop"]
        assert "NET_RAW" not in c["securityContext"]["capabilities"].get("add", [])
    assert json.loads(out["metadata"]["annotations"][STATUS])["netRawDropped"] == ["app", "b"]


def test_keep_net_raw() -> None:
    p = pod({**ON, "tsnet2.io/keep-net-raw": "true"})
    d = inject(p, CFG, native_sidecar=True)
    out = jsonpatch.apply_patch(p, d.patch)
    assert d.net_raw_dropped == () and "securityContext" not in out["spec"]["containers"][0]


@pytest.mark.parametrize("sc", [{"privileged": True},
                                {"capabilities": {"add": ["NET_ADMIN"]}},
                                {"capabilities": {"add": ["CAP_SYS_ADMIN"]}}])
def test_unconfinable_app_container_is_rejected(sc: dict[str, Any]) -> None:
    p = pod(ON)
    p["spec"]["containers"][0]["securityContext"] = sc
    with pytest.raises(InjectionRejected) as info:
        inject(p, CFG, native_sidecar=True)
    assert info.value.reason == "unconfinable_container" and "'app'" in str(info.value)


def test_plain_init_containers_are_left_alone() -> None:
    p = pod(ON, initContainers=[{"name": "init", "image": "i:1"}])
    out = patched(p)
    assert out["spec"]["initContainers"][0] == {"name": "init", "image": "i:1"}
    assert out["spec"]["initContainers"][1]["name"] == "tsnet2d"


def test_conflicting_mount_is_rejected() -> None:
    p = pod(ON)
    p["spec"]["containers"][0]["volumeMounts"] = [{"name": "x", "mountPath": "/var/run/tsnet2"}]
    p["spec"]["volumes"] = [{"name": "x", "emptyDir": {}}]
    with pytest.raises(InjectionRejected, match="already mounts /var/run/tsnet2"):
        inject(p, CFG, native_sidecar=True)


def test_annotation_keys_are_escaped_in_pointers() -> None:
    d = inject(pod({**ON, "a": "b"}), CFG, native_sidecar=True)
    assert any(op["path"] == "/metadata/annotations/tsnet2.io~1status" for op in d.patch)
