"""One test per injection rule, on small pods built in code (the golden files cover shapes)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import jsonpatch
import pytest
from tsnet2_operator.config import SidecarConfig
from tsnet2_operator.inject import (
    BYPASS_REASONS,
    CA_BUNDLE_PATH,
    DANGEROUS_CAPABILITIES,
    SOCKET_DIR,
    STATUS,
    InjectionRejected,
    capability_name,
    check_ephemeral,
    inject,
    sidecar_waivers,
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
    ("tsnet2.io/traffic-log-sink", "syslog", "stdout, file, both"),
    ("tsnet2.io/traffic-log-sink", "stdout\n", "stdout, file, both"),
    ("tsnet2.io/audit-bypass-policy", "allow", "refuse, strip"),
    ("tsnet2.io/allow-audit-bypass", "NET_RAW,SYS_TIME", "SYS_PTRACE or privileged"),
    ("tsnet2.io/hostname", "web\n", "a DNS label"),
    ("tsnet2.io/hostname", "web\nx", "a DNS label"),
    ("tsnet2.io/tags", "tag:a,tag:b\nc", "comma-separated tags"),
])
def test_invalid_values_name_the_annotation_and_allowed_values(
        key: str, value: str, allowed: str) -> None:
    with pytest.raises(InjectionRejected) as info:
        inject(pod({**ON, key: value}), CFG, native_sidecar=True)
    assert info.value.reason == "invalid_annotation"
    assert key in str(info.value) and allowed in str(info.value)
    assert json.dumps(value) in str(info.value)


def test_hostname_with_newline_never_reaches_the_sidecar() -> None:
    """A trailing newline passed a "$"-anchored pattern; whole-string matching refuses it."""
    with pytest.raises(InjectionRejected, match=r'tsnet2\.io/hostname: invalid value "web\\n"'):
        inject(pod({**ON, "tsnet2.io/hostname": "web\n"}), CFG, native_sidecar=True)
    assert arg(sidecar(patched(pod({**ON, "tsnet2.io/hostname": "web"}))), "--hostname") == "web"


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
    assert c["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_BIND_SERVICE"]
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 9464}
    assert c["livenessProbe"] == {"httpGet": {"path": "/healthz", "port": 9464},
                                  "periodSeconds": 10, "timeoutSeconds": 5,
                                  "failureThreshold": 3}
    assert "TSNET2_AUDIT_BYPASS" not in env
    assert c["resources"]["requests"] == {"cpu": "10m", "memory": "64Mi"}
    assert any(m["mountPath"] == "/dev/net/tun" for m in c["volumeMounts"])


def test_kernel_backend_has_no_tun() -> None:
    p = pod(ON)
    d = inject(p, SidecarConfig(image="i", control_url="http://c", backend="kernel"),
               native_sidecar=True)
    out = jsonpatch.apply_patch(p, d.patch)
    assert all(v["name"] != "tsnet2-tun" for v in out["spec"]["volumes"])
    assert arg(sidecar(out), "--backend") == "kernel"


def traffic_log_flags(c: dict[str, Any]) -> list[str]:
    """The sidecar's --traffic-log* flags with their values, in order (mode aside)."""
    args: list[str] = c["args"]
    out: list[str] = []
    for i, flag in enumerate(args):
        if flag.startswith("--traffic-log") and flag != "--traffic-log-mode":
            out += [flag, args[i + 1]]
    return out


ROTATION = ["--traffic-log-max-bytes", "104857600", "--traffic-log-keep", "5"]
FILE = "/var/lib/tsnet2/traffic.jsonl"


@pytest.mark.parametrize(("annotation", "flags"), [
    (None, ["--traffic-log", "-"]),  # the default: standard output, the container log
    ("stdout", ["--traffic-log", "-"]),
    ("file", ["--traffic-log", FILE, *ROTATION]),
    ("both", ["--traffic-log", "-", "--traffic-log", FILE, *ROTATION]),
])
def test_traffic_log_sink_annotation(annotation: str | None, flags: list[str]) -> None:
    """stdout (default) writes `--traffic-log -`; the file, in the state volume, comes with
    the rotation flags; both writes both; the mode flag is there whatever the sink."""
    ann = {**ON, **({"tsnet2.io/traffic-log-sink": annotation} if annotation else {})}
    c = sidecar(patched(pod(ann)))
    assert traffic_log_flags(c) == flags
    assert arg(c, "--traffic-log-mode") == "payload"
    d = inject(pod(ann), CFG, native_sidecar=True)
    assert f"traffic-log payload to {annotation or 'stdout'}" in d.message


@pytest.mark.parametrize("sink", ["stdout", "file", "both"])
def test_traffic_log_sink_from_config_and_annotation_wins(sink: str) -> None:
    """The operator setting applies to pods without the annotation; the annotation beats it."""
    cfg = replace(CFG, traffic_log_sink=sink)
    p = pod(ON)
    out = jsonpatch.apply_patch(p, inject(p, cfg, native_sidecar=True).patch)
    want = {"stdout": ["--traffic-log", "-"], "file": ["--traffic-log", FILE, *ROTATION],
            "both": ["--traffic-log", "-", "--traffic-log", FILE, *ROTATION]}[sink]
    assert traffic_log_flags(sidecar(out)) == want
    p = pod({**ON, "tsnet2.io/traffic-log-sink": "stdout"})
    out = jsonpatch.apply_patch(p, inject(p, cfg, native_sidecar=True).patch)
    assert traffic_log_flags(sidecar(out)) == ["--traffic-log", "-"]


def test_rotation_off_writes_the_file_without_rotation_flags() -> None:
    cfg = replace(CFG, traffic_log_sink="both", traffic_log_max_bytes=0)
    p = pod(ON)
    out = jsonpatch.apply_patch(p, inject(p, cfg, native_sidecar=True).patch)
    assert traffic_log_flags(sidecar(out)) == ["--traffic-log", "-", "--traffic-log", FILE]


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
        "capabilities": {"add": ["CHOWN"]}}})
    d = inject(p, CFG, native_sidecar=True)
    out = jsonpatch.apply_patch(p, d.patch)
    assert d.net_raw_dropped == ("app", "b") and "dropped NET_RAW from app, b" in d.message
    assert d.warnings == ("tsnet2: dropped capability NET_RAW from container(s) app, b",)
    for c in out["spec"]["containers"]:
        assert {"name": "TSNET2_SOCKET", "value": "/var/run/tsnet2/tsnet2.sock"} in c["env"]
        assert {"name": "TSNET2_CA_BUNDLE", "value": "/var/run/tsnet2/tailnet-ca.pem"} \
            in c["env"]
        assert {"name": "tsnet2-socket", "mountPath": "/var/run/tsnet2", "readOnly": True} \
            in c["volumeMounts"]
        assert "NET_RAW" in c["securityContext"]["capabilities"]["drop"]
    assert out["spec"]["containers"][1]["securityContext"]["capabilities"]["add"] == ["CHOWN"]
    assert json.loads(out["metadata"]["annotations"][STATUS])["netRawDropped"] == ["app", "b"]


def test_ca_bundle_is_the_file_tsnet2d_writes_next_to_its_socket() -> None:
    """TSNET2_CA_BUNDLE names the daemon's CA bundle (tsnet2.daemon.certs) in the socket
    directory every app container mounts; a container's own value wins, and the sidecar,
    which writes the file, gets none."""
    from tsnet2.daemon.certs import CA_BUNDLE_NAME
    assert f"{SOCKET_DIR}/{CA_BUNDLE_NAME}" == CA_BUNDLE_PATH
    p = pod(ON)
    p["spec"]["containers"].append({"name": "own", "image": "b:1", "env": [
        {"name": "TSNET2_CA_BUNDLE", "value": "/etc/ssl/mine.pem"}]})
    out = jsonpatch.apply_patch(p, inject(p, CFG, native_sidecar=True).patch)
    app, own = out["spec"]["containers"]
    assert [e for e in app["env"] if e["name"] == "TSNET2_CA_BUNDLE"] == [
        {"name": "TSNET2_CA_BUNDLE", "value": CA_BUNDLE_PATH}]
    assert [e for e in own["env"] if e["name"] == "TSNET2_CA_BUNDLE"] == [
        {"name": "TSNET2_CA_BUNDLE", "value": "/etc/ssl/mine.pem"}]
    assert "TSNET2_CA_BUNDLE" not in {e["name"] for e in sidecar(out)["env"]}


@pytest.mark.parametrize("spelled", ["NET_RAW", "net_raw", "Net_Raw", "CAP_NET_RAW",
                                     "cap_net_raw", " NET_RAW "])
def test_capability_names_as_runtimes_read_them(spelled: str) -> None:
    assert capability_name(spelled) == "NET_RAW"
    p = pod(ON)
    p["spec"]["containers"][0]["securityContext"] = {"capabilities": {"drop": [spelled]}}
    assert inject(p, CFG, native_sidecar=True).net_raw_dropped == ()  # already dropped
    p["spec"]["containers"][0]["securityContext"] = {"capabilities": {"add": [spelled]}}
    with pytest.raises(InjectionRejected, match="adds capability NET_RAW"):
        inject(p, CFG, native_sidecar=True)


def test_every_dangerous_setting_has_a_one_line_reason() -> None:
    wanted = {"SYS_PTRACE", "SYS_ADMIN", "SYS_MODULE", "BPF", "NET_ADMIN", "NET_RAW", "ALL"}
    assert wanted == DANGEROUS_CAPABILITIES
    assert set(BYPASS_REASONS) == DANGEROUS_CAPABILITIES | {"privileged"}
    for reason in BYPASS_REASONS.values():
        assert reason and "\n" not in reason and len(reason) < 160


def _with(key: str, container: dict[str, Any], annotations: dict[str, str] | None = None,
          ) -> dict[str, Any]:
    """A pod whose ``key`` list holds ``container`` (besides the app container)."""
    p = pod({**ON, **(annotations or {})})
    if key == "containers":
        p["spec"]["containers"][0] = {**container, "name": "app"}
    else:
        p["spec"][key] = [container]
    return p


CONTAINER_KINDS = [
    ("containers", {}),
    ("initContainers", {}),  # a plain init container: the namespace outlives it
    ("initContainers", {"restartPolicy": "Always"}),  # another native sidecar
    ("ephemeralContainers", {}),  # the API server refuses them at creation; so do we
]
SETTINGS = [(cap, {"capabilities": {"add": [cap.lower() if i % 2 else f"CAP_{cap}"]}})
            for i, cap in enumerate(sorted(DANGEROUS_CAPABILITIES))]
SETTINGS.append(("privileged", {"privileged": True}))


@pytest.mark.parametrize(("key", "extra"), CONTAINER_KINDS)
@pytest.mark.parametrize(("setting", "sc"), SETTINGS, ids=[s for s, _ in SETTINGS])
def test_dangerous_settings_are_refused_everywhere(
        key: str, extra: dict[str, Any], setting: str, sc: dict[str, Any]) -> None:
    """Every container but tsnet2d, every dangerous setting: refused with name, setting and
    reason, and the message says what to do."""
    p = _with(key, {"name": "x" if key != "containers" else "app", "image": "x:1",
                    **extra, "securityContext": sc})
    with pytest.raises(InjectionRejected) as info:
        inject(p, CFG, native_sidecar=True)
    name = "app" if key == "containers" else "x"
    what = "is privileged" if setting == "privileged" else f"adds capability {setting}"
    message = str(info.value)
    assert info.value.reason == "unconfinable_container"
    assert message.startswith(f'tsnet2: container "{name}" {what}, which '
                              f"{BYPASS_REASONS[setting]}; remove it, or set "
                              "tsnet2.io/inject: disabled")
    assert f'tsnet2.io/allow-audit-bypass: "{setting}"' in message
    assert "tsnet2.io/audit-bypass-policy: strip" in message


def test_the_example_message() -> None:
    p = pod(ON)
    p["spec"]["containers"][0]["securityContext"] = {"capabilities": {"add": ["SYS_PTRACE"]}}
    with pytest.raises(InjectionRejected) as info:
        inject(p, CFG, native_sidecar=True)
    assert str(info.value).startswith(
        'tsnet2: container "app" adds capability SYS_PTRACE, which lets it copy the daemon\'s '
        "sockets (pidfd_getfd) and bypass the traffic log; remove it, or set "
        "tsnet2.io/inject: disabled")


def test_harmless_capabilities_pass() -> None:
    p = pod(ON)
    p["spec"]["containers"][0]["securityContext"] = {
        "privileged": False, "capabilities": {"add": ["CHOWN", "NET_BIND_SERVICE"]}}
    out = patched(p)
    caps = out["spec"]["containers"][0]["securityContext"]["capabilities"]
    assert caps == {"add": ["CHOWN", "NET_BIND_SERVICE"], "drop": ["NET_RAW"]}


@pytest.mark.parametrize(("key", "extra"), CONTAINER_KINDS)
@pytest.mark.parametrize(("setting", "sc"), SETTINGS, ids=[s for s, _ in SETTINGS])
def test_strip_removes_the_setting_and_records_why(
        key: str, extra: dict[str, Any], setting: str, sc: dict[str, Any]) -> None:
    name = "app" if key == "containers" else "x"
    p = _with(key, {"name": name, "image": "x:1", **extra, "securityContext": sc},
              {"tsnet2.io/audit-bypass-policy": "strip"})
    d = inject(p, CFG, native_sidecar=True)
    out = jsonpatch.apply_patch(p, d.patch)
    (c,) = [c for c in out["spec"].get(key, []) if c["name"] == name]
    if setting == "privileged":
        assert c["securityContext"]["privileged"] is False
    else:
        assert c["securityContext"]["capabilities"]["add"] == []
    assert "NET_RAW" in c["securityContext"]["capabilities"]["drop"]
    assert [(f.container, f.setting) for f in d.stripped] == [(name, setting)]
    status = json.loads(out["metadata"]["annotations"][STATUS])
    assert status["auditBypassPolicy"] == "strip"
    assert status["stripped"] == [{"container": name, "setting": setting,
                                   "reason": BYPASS_REASONS[setting]}]
    assert any(setting in w and f'"{name}"' in w and BYPASS_REASONS[setting] in w
               for w in d.warnings)
    assert f"stripped {setting} from {name}" in d.message


def test_policy_from_config_and_annotation() -> None:
    p = pod(ON)
    p["spec"]["containers"][0]["securityContext"] = {"capabilities": {"add": ["NET_ADMIN"]}}
    strip = replace(CFG, audit_bypass_policy="strip")
    assert inject(p, strip, native_sidecar=True).stripped
    p["metadata"]["annotations"]["tsnet2.io/audit-bypass-policy"] = "refuse"
    with pytest.raises(InjectionRejected):
        inject(p, strip, native_sidecar=True)
    p["metadata"]["annotations"]["tsnet2.io/audit-bypass-policy"] = "strip"
    assert inject(p, CFG, native_sidecar=True).stripped


@pytest.mark.parametrize("value", ["true", "false"])
def test_keep_net_raw_is_refused_naming_its_replacement(value: str) -> None:
    with pytest.raises(InjectionRejected) as info:
        inject(pod({**ON, "tsnet2.io/keep-net-raw": value}), CFG, native_sidecar=True)
    assert info.value.reason == "invalid_annotation"
    assert "tsnet2.io/keep-net-raw is no longer supported" in str(info.value)
    assert 'tsnet2.io/allow-audit-bypass: "NET_RAW"' in str(info.value)


def test_waivers_are_recorded_and_warned() -> None:
    p = pod({**ON, "tsnet2.io/allow-audit-bypass": "cap_net_raw, SYS_PTRACE"})
    p["spec"]["containers"][0]["securityContext"] = {"capabilities": {"add": ["SYS_PTRACE"]}}
    d = inject(p, CFG, native_sidecar=True)
    out = jsonpatch.apply_patch(p, d.patch)
    assert d.net_raw_dropped == ()
    assert "securityContext" not in out["spec"]["containers"][0] or \
        "drop" not in out["spec"]["containers"][0]["securityContext"]["capabilities"]
    assert out["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] == \
        ["SYS_PTRACE"]
    assert sorted((f.container, f.setting) for f in d.waived) == [
        ("app", "NET_RAW"), ("app", "SYS_PTRACE")]
    status = json.loads(out["metadata"]["annotations"][STATUS])
    assert status["auditBypassAllowed"] == ["NET_RAW", "SYS_PTRACE"]
    assert {w["setting"] for w in status["auditBypass"]} == {"NET_RAW", "SYS_PTRACE"}
    assert len(d.warnings) == 2
    assert all("NOT a complete record" in w for w in d.warnings)
    assert "the traffic log is NOT a complete record" in d.message
    env = {e["name"]: e.get("value") for e in sidecar(out)["env"]}
    assert env["TSNET2_AUDIT_BYPASS"] == "NET_RAW,SYS_PTRACE"
    assert sidecar_waivers(out["spec"]) == {"NET_RAW", "SYS_PTRACE"}


def test_a_waiver_covers_only_what_it_names() -> None:
    p = pod({**ON, "tsnet2.io/allow-audit-bypass": "NET_RAW"})
    p["spec"]["containers"][0]["securityContext"] = {
        "capabilities": {"add": ["NET_RAW", "NET_ADMIN"]}}
    with pytest.raises(InjectionRejected) as info:
        inject(p, CFG, native_sidecar=True)
    assert "NET_ADMIN" in str(info.value) and "adds capability NET_RAW" not in str(info.value)


def test_plain_init_containers_lose_net_raw_but_get_no_socket() -> None:
    p = pod(ON, initContainers=[{"name": "init", "image": "i:1"}])
    out = patched(p)
    assert out["spec"]["initContainers"][0] == {
        "name": "init", "image": "i:1",
        "securityContext": {"capabilities": {"drop": ["NET_RAW"]}}}
    assert out["spec"]["initContainers"][1]["name"] == "tsnet2d"


@pytest.mark.parametrize("volume", ["tsnet2-state", "tsnet2-token", "tsnet2-socket", "tsnet2-tun"])
@pytest.mark.parametrize("key", ["containers", "initContainers"])
def test_mounting_the_sidecars_volumes_is_refused(volume: str, key: str) -> None:
    p = _with(key, {"name": "x", "image": "x:1",
                    "volumeMounts": [{"name": volume, "mountPath": "/steal"}]})
    with pytest.raises(InjectionRejected, match=f"mounts volume {volume}, which belongs"):
        inject(p, CFG, native_sidecar=True)


def test_conflicting_mount_is_rejected() -> None:
    p = pod(ON)
    p["spec"]["containers"][0]["volumeMounts"] = [{"name": "x", "mountPath": "/var/run/tsnet2"}]
    p["spec"]["volumes"] = [{"name": "x", "emptyDir": {}}]
    with pytest.raises(InjectionRejected, match="already mounts /var/run/tsnet2"):
        inject(p, CFG, native_sidecar=True)


def test_annotation_keys_are_escaped_in_pointers() -> None:
    d = inject(pod({**ON, "a": "b"}), CFG, native_sidecar=True)
    assert any(op["path"] == "/metadata/annotations/tsnet2.io~1status" for op in d.patch)


def _injected_pod(annotations: dict[str, str] | None = None,
                  waivers: str | None = None) -> dict[str, Any]:
    """A pod as stored after injection (with the sidecar's recorded waivers, if any)."""
    p = pod({**ON, **(annotations or {})})
    out = patched(p)
    if waivers is not None:
        sidecar(out)["env"].append({"name": "TSNET2_AUDIT_BYPASS", "value": waivers})
    return out


def _debug(old: dict[str, Any], *containers: dict[str, Any]) -> dict[str, Any]:
    """``old`` with ephemeral containers appended (what kubectl debug sends)."""
    new = json.loads(json.dumps(old))
    new["spec"].setdefault("ephemeralContainers", []).extend(containers)
    return new


def test_ephemeral_container_of_a_pod_without_sidecar_is_ignored() -> None:
    old = pod({})
    d = check_ephemeral(_debug(old, {"name": "dbg", "image": "b:1",
                                     "securityContext": {"privileged": True}}), old, CFG)
    assert (d.result, d.reason, d.patch) == ("skipped", "no_sidecar", [])


def test_harmless_ephemeral_container_gets_socket_and_loses_net_raw() -> None:
    old = _injected_pod()
    new = _debug(old, {"name": "dbg", "image": "b:1"})
    d = check_ephemeral(new, old, CFG)
    assert (d.result, d.reason) == ("injected", "ephemeral_container")
    out = jsonpatch.apply_patch(new, d.patch)
    (dbg,) = out["spec"]["ephemeralContainers"]
    assert dbg["securityContext"] == {"capabilities": {"drop": ["NET_RAW"]}}
    assert {"name": "TSNET2_SOCKET", "value": "/var/run/tsnet2/tsnet2.sock"} in dbg["env"]
    assert {"name": "TSNET2_CA_BUNDLE", "value": "/var/run/tsnet2/tailnet-ca.pem"} in dbg["env"]
    assert {"name": "tsnet2-socket", "mountPath": "/var/run/tsnet2", "readOnly": True} \
        in dbg["volumeMounts"]
    assert d.warnings == ("tsnet2: dropped capability NET_RAW from container(s) dbg",)
    again = check_ephemeral(out, out, CFG)
    assert (again.result, again.reason) == ("skipped", "no_new_containers")


@pytest.mark.parametrize(("setting", "sc"), SETTINGS, ids=[s for s, _ in SETTINGS])
def test_dangerous_ephemeral_container_is_refused(setting: str, sc: dict[str, Any]) -> None:
    old = _injected_pod()
    with pytest.raises(InjectionRejected) as info:
        check_ephemeral(_debug(old, {"name": "dbg", "image": "b:1", "securityContext": sc}),
                        old, CFG)
    what = "is privileged" if setting == "privileged" else f"adds capability {setting}"
    assert str(info.value).startswith(f'tsnet2: container "dbg" {what}, which '
                                      f"{BYPASS_REASONS[setting]}; remove it (kubectl debug: "
                                      "--profile=baseline")
    assert info.value.reason == "unconfinable_container"


@pytest.mark.parametrize(("setting", "sc"), SETTINGS, ids=[s for s, _ in SETTINGS])
def test_dangerous_ephemeral_container_is_stripped(setting: str, sc: dict[str, Any]) -> None:
    old = _injected_pod({"tsnet2.io/audit-bypass-policy": "strip"})
    new = _debug(old, {"name": "dbg", "image": "b:1", "securityContext": sc})
    d = check_ephemeral(new, old, CFG)
    (dbg,) = jsonpatch.apply_patch(new, d.patch)["spec"]["ephemeralContainers"]
    assert dbg["securityContext"].get("privileged") in (None, False)
    assert dbg["securityContext"]["capabilities"].get("add", []) == []
    assert dbg["securityContext"]["capabilities"]["drop"] == ["NET_RAW"]
    assert [(f.container, f.setting) for f in d.stripped] == [("dbg", setting)]
    assert any(BYPASS_REASONS[setting] in w for w in d.warnings)
    # The policy may also come from the operator's setting.
    old2 = _injected_pod()
    d2 = check_ephemeral(_debug(old2, {"name": "dbg", "image": "b:1", "securityContext": sc}),
                         old2, replace(CFG, audit_bypass_policy="strip"))
    assert d2.stripped == d.stripped


def test_ephemeral_waivers_come_from_the_sidecar_not_the_annotations() -> None:
    """Annotations can be edited after creation; the sidecar's env cannot."""
    ptrace = {"name": "dbg", "image": "b:1",
              "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}}}
    late = _injected_pod()
    late["metadata"]["annotations"]["tsnet2.io/allow-audit-bypass"] = "SYS_PTRACE"
    with pytest.raises(InjectionRejected, match="adds capability SYS_PTRACE"):
        check_ephemeral(_debug(late, ptrace), late, CFG)
    admitted = _injected_pod(waivers="SYS_PTRACE")
    d = check_ephemeral(_debug(admitted, ptrace), admitted, CFG)
    assert [(f.container, f.setting) for f in d.waived] == [("dbg", "SYS_PTRACE")]
    assert any("NOT a complete record" in w for w in d.warnings)
    assert d.audit_bypass


def test_only_new_ephemeral_containers_are_checked() -> None:
    old = _debug(_injected_pod(), {"name": "before", "image": "b:1",
                                   "securityContext": {"privileged": True}})
    d = check_ephemeral(_debug(old, {"name": "dbg", "image": "b:1"}), old, CFG)
    assert all("/ephemeralContainers/1/" in op["path"] for op in d.patch)


def test_ephemeral_container_may_not_mount_the_sidecars_volumes() -> None:
    old = _injected_pod()
    with pytest.raises(InjectionRejected, match="mounts volume tsnet2-state"):
        check_ephemeral(_debug(old, {"name": "dbg", "image": "b:1", "volumeMounts": [
            {"name": "tsnet2-state", "mountPath": "/keys"}]}), old, CFG)


def test_ephemeral_invalid_policy_annotation() -> None:
    old = _injected_pod()
    old["metadata"]["annotations"]["tsnet2.io/audit-bypass-policy"] = "ignore"
    with pytest.raises(InjectionRejected, match="allowed values: refuse, strip"):
        check_ephemeral(_debug(old, {"name": "dbg", "image": "b:1"}), old, CFG)


# ---- serve, egress, dns ------------------------------------------------------------------------

DNS_CFG = replace(CFG, dns_upstream="10.96.0.10")


def _env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def _flags(c: dict[str, Any], flag: str) -> list[str]:
    args: list[str] = c["args"]
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_serve_rules_become_serve_flags() -> None:
    p = patched(pod({**ON, "tsnet2.io/serve": "80=127.0.0.1:8080,\n443=http:localhost:8443"}))
    assert _flags(sidecar(p), "--serve") == ["80=127.0.0.1:8080", "443=http:localhost:8443"]
    assert "tsnet2-serve" not in {v["name"] for v in p["spec"]["volumes"]}
    d = inject(pod({**ON, "tsnet2.io/serve": "80=127.0.0.1:8080"}), CFG, native_sidecar=True)
    assert "serve 80=127.0.0.1:8080" in d.message
    assert _flags(sidecar(patched(pod(ON))), "--serve") == []


@pytest.mark.parametrize(("value", "needle"), [
    ("80=10.0.0.1:80", "is not a loopback literal"),
    ("80=http:db:5432", "is not a loopback literal"),
    ("", "no rule"),
    ("80=127.0.0.1:1 80=127.0.0.1:2", "already served"),
    ("80=unix:/tmp/app.sock", "put the app's socket in /var/run/tsnet2-serve/"),
    ("80=unix:/var/run/tsnet2/app.sock", "the sidecar cannot see /var/run/tsnet2/app.sock"),
    ("80=unix:/var/run/tsnet2-serve/a/b.sock", "put the app's socket in"),
])
def test_bad_serve_rules_are_refused(value: str, needle: str) -> None:
    with pytest.raises(InjectionRejected) as info:
        inject(pod({**ON, "tsnet2.io/serve": value}), CFG, native_sidecar=True)
    assert info.value.reason == "invalid_annotation"
    assert "annotation tsnet2.io/serve" in str(info.value) and needle in str(info.value)


def test_unix_serve_target_shares_a_writable_directory() -> None:
    rule = "2222=proxy:unix:/var/run/tsnet2-serve/ssh.sock"
    p = patched(pod({**ON, "tsnet2.io/serve": rule},
                    initContainers=[{"name": "helper", "image": "h:1", "restartPolicy": "Always"},
                                    {"name": "setup", "image": "s:1"}]))
    assert {"name": "tsnet2-serve", "emptyDir": {"medium": "Memory"}} in p["spec"]["volumes"]
    serve_mount = {"name": "tsnet2-serve", "mountPath": "/var/run/tsnet2-serve"}
    app, helper, setup = (p["spec"]["containers"][0], p["spec"]["initContainers"][0],
                          p["spec"]["initContainers"][1])
    assert serve_mount in app["volumeMounts"] and serve_mount in helper["volumeMounts"]
    assert "volumeMounts" not in setup  # plain init containers get neither socket nor this
    side = sidecar(p)
    assert {**serve_mount, "readOnly": True} in side["volumeMounts"]
    assert _flags(side, "--serve") == [rule]
    status = json.loads(p["metadata"]["annotations"][STATUS])
    assert "tsnet2-serve" in status["volumes"]


def test_our_serve_volume_is_ours() -> None:
    clash = pod(ON, volumes=[{"name": "tsnet2-serve", "emptyDir": {}}])
    with pytest.raises(InjectionRejected, match="tsnet2-serve"):
        inject(clash, CFG, native_sidecar=True)
    p = pod({**ON, "tsnet2.io/serve": "80=unix:/var/run/tsnet2-serve/a.sock"},
            volumes=[{"name": "x", "emptyDir": {}}])
    p["spec"]["containers"][0]["volumeMounts"] = [{"name": "x",
                                                   "mountPath": "/var/run/tsnet2-serve"}]
    with pytest.raises(InjectionRejected, match="already mounts /var/run/tsnet2-serve"):
        inject(p, CFG, native_sidecar=True)


def test_reinjecting_a_serve_pod_adds_no_second_mount() -> None:
    p = pod({**ON, "tsnet2.io/serve": "80=unix:/var/run/tsnet2-serve/a.sock"})
    p["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "tsnet2-socket", "mountPath": "/var/run/tsnet2", "readOnly": True},
        {"name": "tsnet2-serve", "mountPath": "/var/run/tsnet2-serve"}]
    d = inject(p, CFG, native_sidecar=True)
    assert not any("/containers/0/volumeMounts" in op["path"] for op in d.patch)


@pytest.mark.parametrize(("value", "port"), [("true", 1055), ("3128", 3128), ("false", None)])
def test_egress(value: str, port: int | None) -> None:
    p = patched(pod({**ON, "tsnet2.io/egress": value}))
    side, app = sidecar(p), p["spec"]["containers"][0]
    env = _env(app)
    assert "HTTP_PROXY" not in env and "ALL_PROXY" not in env and "http_proxy" not in env
    if port is None:
        assert "--egress-listen" not in side["args"] and "TSNET2_EGRESS_PROXY" not in env
        return
    assert arg(side, "--egress-listen") == f"127.0.0.1:{port}"
    assert arg(side, "--egress-socket") == "/var/run/tsnet2/egress.sock"
    assert env["TSNET2_EGRESS_PROXY"] == f"socks5h://127.0.0.1:{port}"
    assert env["TSNET2_EGRESS_SOCKET"] == "/var/run/tsnet2/egress.sock"


def test_egress_default_port_from_config() -> None:
    d = inject(pod({**ON, "tsnet2.io/egress": "true"}), replace(CFG, egress_port=8118),
               native_sidecar=True)
    p: dict[str, Any] = jsonpatch.apply_patch(pod({**ON, "tsnet2.io/egress": "true"}), d.patch)
    assert arg(sidecar(p), "--egress-listen") == "127.0.0.1:8118"
    assert "egress proxy 127.0.0.1:8118" in d.message


def test_a_containers_own_egress_variable_wins() -> None:
    p = pod({**ON, "tsnet2.io/egress": "true"})
    p["spec"]["containers"][0]["env"] = [{"name": "TSNET2_EGRESS_PROXY", "value": "mine"}]
    env = _env(patched(p)["spec"]["containers"][0])
    assert env["TSNET2_EGRESS_PROXY"] == "mine"
    assert env["TSNET2_EGRESS_SOCKET"] == "/var/run/tsnet2/egress.sock"


@pytest.mark.parametrize(("value", "needle"), [
    ("yes", 'invalid value "yes"; allowed values: true, false or a loopback port'),
    ("0", 'invalid value "0"'),
    ("65536", 'invalid value "65536"'),
    ("1055\n", 'invalid value "1055\\n"'),
    ("9464", "the sidecar's metrics port"),
])
def test_bad_egress_values_are_refused(value: str, needle: str) -> None:
    with pytest.raises(InjectionRejected) as info:
        inject(pod({**ON, "tsnet2.io/egress": value}), CFG, native_sidecar=True)
    assert "annotation tsnet2.io/egress" in str(info.value) and needle in str(info.value)


def test_egress_on_the_dns_port_is_refused() -> None:
    with pytest.raises(InjectionRejected, match=r"port 53 is where tsnet2\.io/dns listens"):
        inject(pod({**ON, "tsnet2.io/egress": "53", "tsnet2.io/dns": "true"}), DNS_CFG,
               native_sidecar=True)


@pytest.mark.parametrize("policy", [None, "ClusterFirst", "ClusterFirstWithHostNet"])
def test_dns(policy: str | None) -> None:
    spec = {} if policy is None else {"dnsPolicy": policy}
    p0 = pod({**ON, "tsnet2.io/dns": "true"}, **spec)
    d = inject(p0, replace(DNS_CFG, dns_cluster_domain="k8s.example"), native_sidecar=True)
    p: dict[str, Any] = jsonpatch.apply_patch(p0, d.patch)
    side = sidecar(p)
    assert arg(side, "--dns-listen") == "127.0.0.1:53"
    assert _flags(side, "--dns-upstream") == ["10.96.0.10"]
    assert side["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_BIND_SERVICE"],
                                                       "drop": ["ALL"]}
    assert p["spec"]["dnsPolicy"] == "None"
    assert p["spec"]["dnsConfig"] == {
        "nameservers": ["127.0.0.1"],
        "searches": ["ns.svc.k8s.example", "svc.k8s.example", "k8s.example"],
        "options": [{"name": "ndots", "value": "5"}],
    }
    assert "dns 127.0.0.1:53 forwarding to 10.96.0.10" in d.message


def test_no_dns_no_dns_settings() -> None:
    """Without dns the pod's resolver is left alone; the sidecar still has
    NET_BIND_SERVICE, for tailnet ports below 1024 (a serve rule's 80, listen(":443"))."""
    for ann in (ON, {**ON, "tsnet2.io/dns": "false"}):
        p = patched(pod(ann))
        assert sidecar(p)["securityContext"]["capabilities"]["add"] == ["NET_ADMIN",
                                                                       "NET_BIND_SERVICE"]
        assert "dnsPolicy" not in p["spec"] and "dnsConfig" not in p["spec"]
        assert "--dns-listen" not in sidecar(p)["args"]


def test_dns_upstream_with_a_port_is_passed_as_is() -> None:
    d = inject(pod({**ON, "tsnet2.io/dns": "true"}),
               replace(CFG, dns_upstream="[fd00::a]:5353"), native_sidecar=True)
    p: dict[str, Any] = jsonpatch.apply_patch(pod({**ON, "tsnet2.io/dns": "true"}), d.patch)
    assert _flags(sidecar(p), "--dns-upstream") == ["[fd00::a]:5353"]


@pytest.mark.parametrize(("spec", "needle"), [
    ({"dnsPolicy": "Default"}, "the pod sets dnsPolicy: Default"),
    ({"dnsPolicy": "None", "dnsConfig": {"nameservers": ["1.1.1.1"]}},
     "the pod sets dnsPolicy: None"),
    ({"dnsConfig": {"options": [{"name": "ndots", "value": "1"}]}},
     "the pod sets its own dnsConfig"),
])
def test_dns_refuses_the_pods_own_dns_settings(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(InjectionRejected) as info:
        inject(pod({**ON, "tsnet2.io/dns": "true"}, **spec), DNS_CFG, native_sidecar=True)
    assert needle in str(info.value) and "remove one of them" in str(info.value)


def test_dns_settings_without_the_annotation_are_left_alone() -> None:
    p = patched(pod(ON, dnsPolicy="Default"))
    assert p["spec"]["dnsPolicy"] == "Default" and "dnsConfig" not in p["spec"]


def test_dns_without_a_known_upstream_is_refused() -> None:
    with pytest.raises(InjectionRejected, match="knows no cluster DNS server"):
        inject(pod({**ON, "tsnet2.io/dns": "true"}), CFG, native_sidecar=True)
    with pytest.raises(InjectionRejected, match=r'tsnet2\.io/dns: invalid value "on"'):
        inject(pod({**ON, "tsnet2.io/dns": "on"}), DNS_CFG, native_sidecar=True)
