"""Sidecar injection as a pure function: pod (a JSON mapping) -> :class:`Decision`.

Nothing here does I/O; the kopf layer (``handlers.py``) supplies the namespace's labels and
whether the cluster supports native sidecars, then emits the Event and counts the metric.

Rules, in order (the first that applies decides):

1. an invalid ``tsnet2.io/inject`` value on the pod -> :class:`InjectionRejected`;
2. pod annotation ``tsnet2.io/inject: disabled`` -> skipped, ``pod_opted_out``;
3. neither the pod annotation nor the namespace label ``tsnet2.io/inject=enabled`` ->
   skipped, ``not_opted_in``;
4. ``hostNetwork: true`` -> skipped, ``host_network`` (no private network namespace to guard);
5. the status annotation ``tsnet2.io/status`` is present -> skipped, ``already_injected``;
   a container named ``tsnet2d`` without it -> skipped, ``sidecar_exists``;
6. any other ``tsnet2.io/*`` annotation with a bad value, a name clash with what we add, or
   an app container we cannot confine (privileged / NET_ADMIN) -> :class:`InjectionRejected`;
7. otherwise -> injected; the patch adds the socket and state volumes, the token volume,
   the sidecar and the status annotation, mounts the socket in every app container, sets
   ``TSNET2_SOCKET`` and drops ``NET_RAW`` from app containers. The socket's group and mode
   follow the pod's groups (:func:`socket_access`).

"App containers" are ``spec.containers`` plus init containers with ``restartPolicy: Always``
(other native sidecars): everything that runs while tsnet2d runs. Plain init containers finish
before the sidecar starts, so they are left alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tsnet2_operator.config import SidecarConfig

ANNOTATION_PREFIX = "tsnet2.io/"
INJECT = "tsnet2.io/inject"
HOSTNAME = "tsnet2.io/hostname"
TAGS = "tsnet2.io/tags"
STATE = "tsnet2.io/state"
TRAFFIC_LOG = "tsnet2.io/traffic-log"
KEEP_NET_RAW = "tsnet2.io/keep-net-raw"
STATUS = "tsnet2.io/status"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"

SIDECAR_NAME = "tsnet2d"
SOCKET_VOLUME = "tsnet2-socket"
STATE_VOLUME = "tsnet2-state"
TOKEN_VOLUME = "tsnet2-token"
TUN_VOLUME = "tsnet2-tun"
SOCKET_DIR = "/var/run/tsnet2"
SOCKET_PATH = f"{SOCKET_DIR}/tsnet2.sock"
STATE_DIR = "/var/lib/tsnet2"
TOKEN_DIR = "/var/run/secrets/tsnet2"
TOKEN_PATH = f"{TOKEN_DIR}/token"
TOKEN_AUDIENCE = "tsnet2"
TOKEN_EXPIRATION_SECONDS = 3600
TUN_PATH = "/dev/net/tun"
METRICS_PORT = 9464
PVC_PREFIX = "tsnet2-state-"
MAX_GID = 2**32 - 2
STATUS_VERSION = 1

ALLOWED: dict[str, tuple[str, ...]] = {
    INJECT: ("enabled", "disabled"),
    STATE: ("ephemeral", "persistent"),
    TRAFFIC_LOG: ("payload", "metadata", "off"),
    KEEP_NET_RAW: ("true", "false"),
}
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TAG = re.compile(r"^tag:[A-Za-z][A-Za-z0-9-]*$")
# Capabilities an app container may not hold: with them it could leave the tailnet guard.
_UNCONFINABLE_CAPS = frozenset({"NET_ADMIN", "SYS_ADMIN", "ALL"})

Op = dict[str, Any]
Result = Literal["injected", "skipped"]


class InjectionRejected(ValueError):
    """The pod asked for injection in a way we must refuse; ``str()`` is the user's message."""

    def __init__(self, reason: str, message: str) -> None:
        """``reason`` is a short metric label (``invalid_annotation``, ``conflict``, ...)."""
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Decision:
    """The outcome for one pod: injected (with a JSON patch) or skipped, and why."""

    result: Result
    reason: str
    message: str
    patch: list[Op] = field(default_factory=list)
    net_raw_dropped: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (what the golden files hold)."""
        return {
            "result": self.result,
            "reason": self.reason,
            "message": self.message,
            "net_raw_dropped": list(self.net_raw_dropped),
            "patch": self.patch,
        }


def _ptr(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901) from path parts, escaping ``~`` and ``/``."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _skip(reason: str, message: str) -> Decision:
    return Decision(result="skipped", reason=reason, message=message)


def _cap_name(cap: object) -> str:
    text = str(cap).upper()
    return text.removeprefix("CAP_")


@dataclass(frozen=True)
class _Settings:
    """Validated per-pod settings read from the annotations."""

    hostname: str | None  # None: the pod has no name yet; the sidecar uses $(POD_NAME)
    tags: tuple[str, ...]
    persistent: bool
    traffic_log: str
    keep_net_raw: bool


def wants_namespace_labels(pod: Mapping[str, Any]) -> bool:
    """True when the decision depends on the namespace's labels (the pod does not say)."""
    return INJECT not in _annotations(pod)


def _annotations(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    return annotations if isinstance(annotations, Mapping) else {}


def _invalid(name: str, value: str, allowed: Sequence[str] | str) -> str:
    what = ", ".join(allowed) if not isinstance(allowed, str) else allowed
    return f"annotation {name}: invalid value {json.dumps(value)}; allowed values: {what}"


def _read_settings(pod: Mapping[str, Any], config: SidecarConfig) -> _Settings:
    ann = _annotations(pod)
    errors: list[str] = []
    for name, allowed in ALLOWED.items():
        if name in ann and str(ann[name]) not in allowed:
            errors.append(_invalid(name, str(ann[name]), allowed))
    hostname: str | None = None
    if HOSTNAME in ann:
        hostname = str(ann[HOSTNAME])
        if not _DNS_LABEL.match(hostname):
            errors.append(_invalid(HOSTNAME, hostname,
                                   "a DNS label (a-z, 0-9, '-', at most 63 characters)"))
    tags: list[str] = []
    if TAGS in ann:
        for item in str(ann[TAGS]).split(","):
            tag = item.strip()
            if not _TAG.match(tag):
                errors.append(_invalid(TAGS, str(ann[TAGS]),
                                       "comma-separated tags like tag:web,tag:prod"))
                break
            if tag not in tags:
                tags.append(tag)
    persistent = str(ann.get(STATE, "ephemeral")) == "persistent"
    meta = pod.get("metadata") or {}
    pod_name = str(meta.get("name") or "")
    if hostname is None and pod_name:
        if _DNS_LABEL.match(pod_name):
            hostname = pod_name
        else:
            errors.append(f"pod name {pod_name!r} is not a valid tailnet hostname (a DNS label); "
                          f"set annotation {HOSTNAME}")
    if persistent and hostname is None and not errors:
        errors.append(f"annotation {STATE}: persistent state needs a stable name: set "
                      f"annotation {HOSTNAME} (the pod has no name yet, only generateName)")
    if errors:
        raise InjectionRejected("invalid_annotation", "tsnet2: " + "; ".join(errors))
    return _Settings(
        hostname=hostname,
        tags=tuple(tags),
        persistent=persistent,
        traffic_log=str(ann.get(TRAFFIC_LOG, config.traffic_log_default)),
        keep_net_raw=str(ann.get(KEEP_NET_RAW, "false")) == "true",
    )


def _check_conflicts(spec: Mapping[str, Any]) -> None:
    ours = {SOCKET_VOLUME, STATE_VOLUME, TOKEN_VOLUME, TUN_VOLUME}
    clash = sorted(ours & {str(v.get("name")) for v in spec.get("volumes") or []})
    if clash:
        raise InjectionRejected(
            "conflict", f"tsnet2: the pod already has volume(s) {', '.join(clash)}, which the "
            f"injector adds; rename them or set {INJECT}: disabled")


def _app_containers(spec: Mapping[str, Any]) -> list[tuple[str, int, Mapping[str, Any]]]:
    """(list key, index, container) of everything that runs alongside tsnet2d."""
    found = [("containers", i, c) for i, c in enumerate(spec.get("containers") or [])]
    found += [
        ("initContainers", i, c)
        for i, c in enumerate(spec.get("initContainers") or [])
        if c.get("restartPolicy") == "Always"
    ]
    return found


def _patch_app_container(
    base: str, container: Mapping[str, Any], keep_net_raw: bool
) -> tuple[list[Op], bool]:
    """Ops that mount the socket, set TSNET2_SOCKET and drop NET_RAW; and whether it dropped."""
    name = str(container.get("name"))
    ops: list[Op] = []
    mounts = container.get("volumeMounts") or []
    for mount in mounts:
        if mount.get("mountPath", "").rstrip("/") == SOCKET_DIR:
            raise InjectionRejected(
                "conflict", f"tsnet2: container {name!r} already mounts {SOCKET_DIR}, where the "
                f"injector mounts the tsnet2d socket; move it or set {INJECT}: disabled")
    mount = {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR, "readOnly": True}
    if "volumeMounts" in container and isinstance(container["volumeMounts"], list):
        ops.append({"op": "add", "path": f"{base}/volumeMounts/-", "value": mount})
    else:
        ops.append({"op": "add", "path": f"{base}/volumeMounts", "value": [mount]})
    env_names = {str(e.get("name")) for e in container.get("env") or []}
    if "TSNET2_SOCKET" not in env_names:
        var = {"name": "TSNET2_SOCKET", "value": SOCKET_PATH}
        if isinstance(container.get("env"), list):
            ops.append({"op": "add", "path": f"{base}/env/-", "value": var})
        else:
            ops.append({"op": "add", "path": f"{base}/env", "value": [var]})

    sc = container.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    added = [_cap_name(c) for c in caps.get("add") or []]
    dropped = {_cap_name(c) for c in caps.get("drop") or []}
    if keep_net_raw:
        return ops, False
    if sc.get("privileged") is True or _UNCONFINABLE_CAPS & set(added):
        what = "is privileged" if sc.get("privileged") is True else (
            "adds capability " + ", ".join(sorted(_UNCONFINABLE_CAPS & set(added))))
        raise InjectionRejected(
            "unconfinable_container",
            f"tsnet2: container {name!r} {what}, so it could bypass the tsnet2d guard; remove "
            f"that, or set {KEEP_NET_RAW}: \"true\" to accept the risk, or {INJECT}: disabled")
    if "NET_RAW" in dropped or "ALL" in dropped:
        removals = [i for i, c in enumerate(added) if c == "NET_RAW"]
        if not removals:
            return ops, False
    # Remove NET_RAW from `add` (highest index first keeps the others' indexes valid).
    for i in sorted((i for i, c in enumerate(added) if c == "NET_RAW"), reverse=True):
        ops.append({"op": "remove", "path": f"{base}/securityContext/capabilities/add/{i}"})
    if "NET_RAW" in dropped or "ALL" in dropped:
        return ops, True
    if "securityContext" not in container or not isinstance(container["securityContext"], dict):
        ops.append({"op": "add", "path": f"{base}/securityContext",
                    "value": {"capabilities": {"drop": ["NET_RAW"]}}})
    elif not isinstance(sc.get("capabilities"), dict):
        ops.append({"op": "add", "path": f"{base}/securityContext/capabilities",
                    "value": {"drop": ["NET_RAW"]}})
    elif not isinstance(caps.get("drop"), list):
        ops.append({"op": "add", "path": f"{base}/securityContext/capabilities/drop",
                    "value": ["NET_RAW"]})
    else:
        ops.append({"op": "add", "path": f"{base}/securityContext/capabilities/drop/-",
                    "value": "NET_RAW"})
    return ops, True


def _gid(value: object) -> int | None:
    """A usable GID from a securityContext field, else None (absent or not a GID)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_GID:
        return value
    return None


@dataclass(frozen=True)
class SocketAccess:
    """Who may open the sidecar's socket file: ``mode`` (octal text) and ``group``."""

    mode: str
    group: int | None
    why: str  # where the group comes from: "fsGroup", "runAsGroup" ("" without a group)

    def args(self) -> list[str]:
        """The tsnet2d flags."""
        group = [] if self.group is None else ["--socket-group", str(self.group)]
        return [*group, "--socket-mode", self.mode]

    def describe(self) -> str:
        """For the Event message."""
        if self.group is None:
            return f"socket {self.mode}"
        return f"socket {self.mode} group {self.group} ({self.why})"


def socket_access(spec: Mapping[str, Any]) -> SocketAccess:
    """The socket's group and mode for this pod.

    The socket lives in an emptyDir that only this pod's containers mount, and tsnet2d runs
    with ``--allow-any-uid``; the file mode only has to let the app containers in. When a
    group is sure to be held by every app process — the pod's ``fsGroup`` (the kubelet adds it
    to every container), else a ``runAsGroup`` all app containers share — the socket is
    ``0660`` in that group; otherwise (e.g. only ``runAsUser``: the primary group then comes
    from the image) it is ``0666``, which reaches no further than the pod. See docs/operator.md.
    """
    pod_sc = spec.get("securityContext")
    pod_sc = pod_sc if isinstance(pod_sc, Mapping) else {}
    fs_group = _gid(pod_sc.get("fsGroup"))
    if fs_group is not None:
        return SocketAccess("0660", fs_group, "fsGroup")
    groups: set[int | None] = set()
    for _key, _index, container in _app_containers(spec):
        sc = container.get("securityContext")
        sc = sc if isinstance(sc, Mapping) else {}
        groups.add(_gid(sc["runAsGroup"]) if sc.get("runAsGroup") is not None
                   else _gid(pod_sc.get("runAsGroup")))
    if len(groups) == 1 and None not in groups:
        return SocketAccess("0660", groups.pop(), "runAsGroup")
    return SocketAccess("0666", None, "")


def _sidecar(config: SidecarConfig, settings: _Settings, native: bool,
             access: SocketAccess) -> dict[str, Any]:
    args = [
        "--socket", SOCKET_PATH,
        "--state-dir", STATE_DIR,
        "--up",
        "--hostname", settings.hostname or "$(POD_NAME)",
        "--metrics-addr", f"0.0.0.0:{METRICS_PORT}",
        "--traffic-log-mode", settings.traffic_log,
        "--allow-any-uid",
        *access.args(),
        "--backend", config.backend,
    ]
    if not settings.persistent:
        args.append("--ephemeral")
    if settings.tags:
        args += ["--advertise-tags", ",".join(settings.tags)]

    def field_env(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    requests = {k: v for k, v in (("cpu", config.cpu_request),
                                   ("memory", config.memory_request)) if v}
    limits = {k: v for k, v in (("cpu", config.cpu_limit), ("memory", config.memory_limit)) if v}
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    mounts: list[dict[str, Any]] = [
        {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR},
        {"name": STATE_VOLUME, "mountPath": STATE_DIR},
        {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
    ]
    if config.backend == "userspace":
        mounts.append({"name": TUN_VOLUME, "mountPath": TUN_PATH})
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["tsnet2d"],
        "args": args,
        "env": [
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_UID", "metadata.uid"),
            field_env("POD_IP", "status.podIP"),
            {"name": "TS_CONTROL_URL", "value": config.control_url},
            {"name": "TSNET2_SA_TOKEN_FILE", "value": TOKEN_PATH},
            {"name": "TSNET2_SOCKET", "value": SOCKET_PATH},
        ],
        "ports": [{"name": "tsnet2-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "startupProbe": {
            "httpGet": {"path": "/readyz", "port": METRICS_PORT},
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 120,
        },
        "resources": resources,
        "securityContext": {
            # NET_ADMIN: WireGuard device, routes, the nftables guard, SO_MARK. Root is needed
            # for an added capability to be effective; everything else is dropped.
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    if access.group is not None:
        # Without CAP_CHOWN tsnet2d can give its socket only a group it is in: run it in the
        # app's group (its files elsewhere are in the state volume, which no app mounts).
        container["securityContext"]["runAsGroup"] = access.group
    if native:
        container["restartPolicy"] = "Always"
    return container


def _volumes(config: SidecarConfig, settings: _Settings) -> list[dict[str, Any]]:
    state: dict[str, Any] = (
        {"name": STATE_VOLUME,
         "persistentVolumeClaim": {"claimName": f"{PVC_PREFIX}{settings.hostname}"}}
        if settings.persistent else {"name": STATE_VOLUME, "emptyDir": {}}
    )
    volumes = [
        {"name": SOCKET_VOLUME, "emptyDir": {"medium": "Memory"}},
        state,
        {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE,
            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
            "path": "token",
        }}]}},
    ]
    if config.backend == "userspace":
        volumes.append({"name": TUN_VOLUME, "hostPath": {"path": TUN_PATH, "type": "CharDevice"}})
    return volumes


def inject(
    pod: Mapping[str, Any],
    config: SidecarConfig,
    *,
    native_sidecar: bool,
    namespace_labels: Mapping[str, str] | None = None,
) -> Decision:
    """Decide whether and how to inject tsnet2d into ``pod`` (an admission request's object).

    ``namespace_labels`` are the labels of the pod's namespace (only consulted when the pod
    has no ``tsnet2.io/inject`` annotation, see :func:`wants_namespace_labels`).
    Raises :class:`InjectionRejected` when the pod must not be admitted as it is.
    """
    ann = _annotations(pod)
    spec: Mapping[str, Any] = pod.get("spec") or {}
    pod_says = ann.get(INJECT)
    if pod_says is not None and str(pod_says) not in ALLOWED[INJECT]:
        raise InjectionRejected("invalid_annotation",
                                "tsnet2: " + _invalid(INJECT, str(pod_says), ALLOWED[INJECT]))
    if pod_says == "disabled":
        return _skip("pod_opted_out", f"the pod says {INJECT}: disabled")
    ns_enabled = (namespace_labels or {}).get(INJECT) == "enabled"
    if pod_says != "enabled" and not ns_enabled:
        return _skip("not_opted_in",
                     f"neither the pod annotation nor the namespace label {INJECT} is enabled")
    source = "pod_annotation" if pod_says == "enabled" else "namespace_label"
    if spec.get("hostNetwork") is True:
        return _skip("host_network",
                     "hostNetwork pods share the node's network namespace, which tsnet2d "
                     "cannot guard")
    if STATUS in ann:
        return _skip("already_injected", f"the pod already carries {STATUS}")
    every = list(spec.get("containers") or []) + list(spec.get("initContainers") or [])
    if any(c.get("name") == SIDECAR_NAME for c in every):
        return _skip("sidecar_exists", f"the pod already has a container named {SIDECAR_NAME}")

    settings = _read_settings(pod, config)
    _check_conflicts(spec)
    ops: list[Op] = []
    apps = _app_containers(spec)
    dropped: list[str] = []
    for key, index, container in apps:
        container_ops, did_drop = _patch_app_container(
            _ptr("spec", key, index), container, settings.keep_net_raw)
        ops += container_ops
        if did_drop:
            dropped.append(str(container.get("name")))

    status = {
        "version": STATUS_VERSION,
        "sidecar": "native" if native_sidecar else "regular",
        "containers": [] if native_sidecar else [SIDECAR_NAME],
        "initContainers": [SIDECAR_NAME] if native_sidecar else [],
        "volumes": [v["name"] for v in _volumes(config, settings)],
        "netRawDropped": dropped,
    }
    new_annotations: dict[str, str] = {STATUS: json.dumps(status, sort_keys=True,
                                                          separators=(",", ":"))}
    app_names = [str(c.get("name")) for c in spec.get("containers") or []]
    if not native_sidecar and app_names and DEFAULT_CONTAINER not in ann:
        new_annotations[DEFAULT_CONTAINER] = app_names[0]
    meta = pod.get("metadata") or {}
    if isinstance(meta.get("annotations"), Mapping):
        for key, value in new_annotations.items():
            ops.append({"op": "add", "path": _ptr("metadata", "annotations", key),
                        "value": value})
    else:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": new_annotations})

    if not spec.get("serviceAccountName") and not spec.get("serviceAccount"):
        # A projected SA token needs a named account. The ServiceAccount admission plugin
        # normally sets "default" before webhooks run; say it explicitly when it has not.
        ops.append({"op": "add", "path": "/spec/serviceAccountName", "value": "default"})
    volumes = _volumes(config, settings)
    if isinstance(spec.get("volumes"), list):
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes]
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})

    access = socket_access(spec)
    sidecar = _sidecar(config, settings, native_sidecar, access)
    if native_sidecar:
        if isinstance(spec.get("initContainers"), list):
            ops.append({"op": "add", "path": "/spec/initContainers/-", "value": sidecar})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    else:
        ops.append({"op": "add", "path": "/spec/containers/0", "value": sidecar})

    parts = [f"added sidecar {SIDECAR_NAME} ({status['sidecar']}) via {source}",
             f"hostname {settings.hostname or '$(POD_NAME)'}",
             f"state {'persistent' if settings.persistent else 'ephemeral'}",
             f"traffic-log {settings.traffic_log}",
             access.describe()]
    if dropped:
        parts.append("dropped NET_RAW from " + ", ".join(dropped))
    elif settings.keep_net_raw:
        parts.append(f"kept NET_RAW ({KEEP_NET_RAW}: \"true\")")
    return Decision(result="injected", reason=source, message="; ".join(parts), patch=ops,
                    net_raw_dropped=tuple(dropped))
