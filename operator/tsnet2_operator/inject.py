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
6. any other ``tsnet2.io/*`` annotation with a bad value (the removed
   ``tsnet2.io/keep-net-raw`` included), a name clash with what we add, a container mounting
   one of our volumes, or a container that could reach around the daemon (the audit
   boundary, below) -> :class:`InjectionRejected`;
7. otherwise -> injected; the patch adds the socket and state volumes, the token volume,
   the sidecar and the status annotation, mounts the socket in every app container, sets
   ``TSNET2_SOCKET`` and ``TSNET2_CA_BUNDLE`` (the tailnet CA file tsnet2d writes next to
   its socket) and drops ``NET_RAW`` from every container. The socket's group and
   mode follow the pod's groups (:func:`socket_access`). ``tsnet2.io/serve`` (rules checked
   by :mod:`tsnet2_operator.serve`; ``unix:`` targets only in ``SERVE_DIR``, a volume the
   app containers can write), ``tsnet2.io/egress`` and ``tsnet2.io/dns`` add the sidecar's
   ``--serve``, ``--egress-*`` and ``--dns-*`` flags, the egress variables of the app
   containers, and for dns the pod's ``dnsPolicy: None``/``dnsConfig``; the cluster DNS
   address comes from the config (the kopf layer fills it in from kube-dns at start-up),
   never from a lookup here.

"App containers" are ``spec.containers`` plus init containers with ``restartPolicy: Always``
(other native sidecars): everything that runs while tsnet2d runs; they get the socket.

The audit boundary (DESIGN §2.4) holds every container that is not tsnet2d — containers,
init containers (plain ones too: the network namespace, and any socket they hand on, outlive
them) and ephemeral containers: none may be ``privileged`` or add ``SYS_PTRACE``,
``SYS_ADMIN``, ``SYS_MODULE``, ``BPF``, ``NET_ADMIN``, ``NET_RAW`` or ``ALL`` (names compared
case-insensitively, ``CAP_`` prefix optional, as container runtimes do), and ``NET_RAW``,
which runtimes grant by default, is dropped. The policy (annotation
``tsnet2.io/audit-bypass-policy``, default from the config) either refuses such a pod
(``refuse``) or removes the setting (``strip``). ``tsnet2.io/allow-audit-bypass`` waives
named settings; each waiver is recorded (status annotation, Event, admission warning) and
copied into the sidecar's env (``TSNET2_AUDIT_BYPASS``), which, unlike annotations, cannot be
changed after creation. :func:`check_ephemeral` applies the same rules to ephemeral
containers added later (``pods/ephemeralcontainers``, e.g. ``kubectl debug``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tsnet2_operator.config import (
    TRAFFIC_LOG_SINKS,
    SidecarConfig,
    TrafficLogSink,
    parse_dns_upstream,
)
from tsnet2_operator.serve import ServeRule, ServeRuleError, parse_serve_rules

ANNOTATION_PREFIX = "tsnet2.io/"
INJECT = "tsnet2.io/inject"
HOSTNAME = "tsnet2.io/hostname"
TAGS = "tsnet2.io/tags"
STATE = "tsnet2.io/state"
TRAFFIC_LOG = "tsnet2.io/traffic-log"
TRAFFIC_LOG_SINK = "tsnet2.io/traffic-log-sink"
AUDIT_BYPASS_POLICY = "tsnet2.io/audit-bypass-policy"
ALLOW_AUDIT_BYPASS = "tsnet2.io/allow-audit-bypass"
KEEP_NET_RAW = "tsnet2.io/keep-net-raw"  # removed: a pod that still uses it is refused
SERVE = "tsnet2.io/serve"
EGRESS = "tsnet2.io/egress"
DNS = "tsnet2.io/dns"
STATUS = "tsnet2.io/status"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"

SIDECAR_NAME = "tsnet2d"
SOCKET_VOLUME = "tsnet2-socket"
STATE_VOLUME = "tsnet2-state"
TOKEN_VOLUME = "tsnet2-token"
TUN_VOLUME = "tsnet2-tun"
SERVE_VOLUME = "tsnet2-serve"
SOCKET_DIR = "/var/run/tsnet2"
SOCKET_PATH = f"{SOCKET_DIR}/tsnet2.sock"
EGRESS_SOCKET_PATH = f"{SOCKET_DIR}/egress.sock"
# Unix sockets that tsnet2.io/serve forwards to: the app creates them here (its socket mount
# is read-only, so a directory it can write, shared with the sidecar, is added for them).
SERVE_DIR = "/var/run/tsnet2-serve"
# The tailnet CA bundle tsnet2d writes next to its socket (tsnet2.daemon.certs.CA_BUNDLE_NAME):
# what an app verifies tailnet certificates with (ssl: cafile=$TSNET2_CA_BUNDLE).
CA_BUNDLE_ENV = "TSNET2_CA_BUNDLE"
CA_BUNDLE_PATH = f"{SOCKET_DIR}/tailnet-ca.pem"
EGRESS_PROXY_ENV = "TSNET2_EGRESS_PROXY"
EGRESS_SOCKET_ENV = "TSNET2_EGRESS_SOCKET"
DNS_LISTEN = "127.0.0.1:53"
STATE_DIR = "/var/lib/tsnet2"
TRAFFIC_LOG_FILE = f"{STATE_DIR}/traffic.jsonl"  # tsnet2d's default: <state-dir>/traffic.jsonl
TRAFFIC_LOG_STDOUT = "-"
TOKEN_DIR = "/var/run/secrets/tsnet2"
TOKEN_PATH = f"{TOKEN_DIR}/token"
TOKEN_AUDIENCE = "tsnet2"
TOKEN_EXPIRATION_SECONDS = 3600
TUN_PATH = "/dev/net/tun"
METRICS_PORT = 9464
PVC_PREFIX = "tsnet2-state-"
MAX_GID = 2**32 - 2
STATUS_VERSION = 1
AUDIT_BYPASS_ENV = "TSNET2_AUDIT_BYPASS"  # on the sidecar: the waivers decided at creation
OUR_VOLUMES = frozenset({SOCKET_VOLUME, STATE_VOLUME, TOKEN_VOLUME, TUN_VOLUME, SERVE_VOLUME})

PRIVILEGED = "privileged"
# What each setting lets a container do around tsnet2d (DESIGN §2.4), one line each; the
# text follows "container "x" adds capability C, which ...".
BYPASS_REASONS: dict[str, str] = {
    "SYS_PTRACE": "lets it copy the daemon's sockets (pidfd_getfd) and bypass the traffic log",
    "SYS_ADMIN": "lets it enter namespaces, mount filesystems and load BPF programs, reaching "
                 "around the daemon's guard and the traffic log",
    "SYS_MODULE": "lets it load kernel modules, which no guard in the pod can contain",
    "BPF": "lets it load BPF programs that can read or redirect the pod's traffic past the "
           "daemon's guard",
    "NET_ADMIN": "lets it mark sockets (SO_MARK) and change the nftables guard, routes and "
                 "the WireGuard device, so its traffic leaves the tailnet without the daemon",
    "NET_RAW": "lets it mark sockets (SO_MARK) and send raw packets past the daemon's "
               "nftables guard and the traffic log",
    "ALL": "grants every capability, SYS_PTRACE, NET_ADMIN and NET_RAW included, so it can "
           "reach around the daemon's guard and the traffic log",
    PRIVILEGED: "gives it every capability and the host's devices, so it can reach around "
                "the daemon's guard and the traffic log",
}
DANGEROUS_CAPABILITIES = frozenset(BYPASS_REASONS) - {PRIVILEGED}
POLICIES = ("refuse", "strip")
Policy = Literal["refuse", "strip"]

ALLOWED: dict[str, tuple[str, ...]] = {
    INJECT: ("enabled", "disabled"),
    STATE: ("ephemeral", "persistent"),
    TRAFFIC_LOG: ("payload", "metadata", "off"),
    TRAFFIC_LOG_SINK: TRAFFIC_LOG_SINKS,
    AUDIT_BYPASS_POLICY: POLICIES,
}
# Whole-string patterns (re.fullmatch): "$" would also accept a trailing newline.
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_TAG = re.compile(r"tag:[A-Za-z][A-Za-z0-9-]*")

Op = dict[str, Any]
Result = Literal["injected", "skipped"]


class InjectionRejected(ValueError):
    """The pod asked for injection in a way we must refuse; ``str()`` is the user's message."""

    def __init__(self, reason: str, message: str) -> None:
        """``reason`` is a short metric label (``invalid_annotation``, ``conflict``, ...)."""
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Finding:
    """One container setting that could reach around the daemon (see :data:`BYPASS_REASONS`).

    ``setting`` is a capability name (upper case, no ``CAP_``) or ``privileged``.
    """

    container: str
    setting: str

    @property
    def reason(self) -> str:
        """Why the setting breaks the audit boundary (one line)."""
        return BYPASS_REASONS[self.setting]

    def describe(self) -> str:
        """``container "app" adds capability SYS_PTRACE, which lets it ...``."""
        what = ("is privileged" if self.setting == PRIVILEGED
                else f"adds capability {self.setting}")
        return f"container {json.dumps(self.container)} {what}, which {self.reason}"

    def to_json(self) -> dict[str, str]:
        """For the status annotation and the golden files."""
        return {"container": self.container, "setting": self.setting, "reason": self.reason}


@dataclass(frozen=True)
class Decision:
    """The outcome for one pod: injected (with a JSON patch) or skipped, and why.

    ``stripped`` are the settings removed under the ``strip`` policy, ``waived`` those kept
    because the pod's ``tsnet2.io/allow-audit-bypass`` names them; ``warnings`` are the
    admission warnings (the user sees them in kubectl's output).
    """

    result: Result
    reason: str
    message: str
    patch: list[Op] = field(default_factory=list)
    net_raw_dropped: tuple[str, ...] = ()
    stripped: tuple[Finding, ...] = ()
    waived: tuple[Finding, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def audit_bypass(self) -> bool:
        """True when something was stripped or waived (the Event is then a Warning)."""
        return bool(self.stripped or self.waived)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (what the golden files hold)."""
        return {
            "result": self.result,
            "reason": self.reason,
            "message": self.message,
            "net_raw_dropped": list(self.net_raw_dropped),
            "stripped": [f.to_json() for f in self.stripped],
            "waived": [f.to_json() for f in self.waived],
            "warnings": list(self.warnings),
            "patch": self.patch,
        }


def _ptr(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901) from path parts, escaping ``~`` and ``/``."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _skip(reason: str, message: str) -> Decision:
    return Decision(result="skipped", reason=reason, message=message)


def capability_name(cap: object) -> str:
    """A capability as container runtimes read it: case-insensitive, ``CAP_`` optional.

    ``"cap_net_raw"``, ``"Net_Raw"`` and ``"NET_RAW"`` are all ``"NET_RAW"``.
    """
    text = str(cap).strip().upper()
    return text.removeprefix("CAP_")


@dataclass(frozen=True)
class _Settings:
    """Validated per-pod settings read from the annotations."""

    hostname: str | None  # None: the pod has no name yet; the sidecar uses $(POD_NAME)
    tags: tuple[str, ...]
    persistent: bool
    traffic_log: str
    traffic_log_sink: TrafficLogSink
    policy: Policy
    waivers: frozenset[str]
    serve: tuple[ServeRule, ...] = ()
    egress_port: int | None = None  # tsnet2.io/egress: the loopback port, None when off
    dns: tuple[str, str] | None = None  # tsnet2.io/dns: (upstream, namespace), None when off

    @property
    def serve_unix(self) -> bool:
        """True when a serve rule forwards to a unix socket (the serve volume is added)."""
        return any(rule.unix_path is not None for rule in self.serve)


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


def _bypass_item(item: str) -> str:
    """A waiver list item, normalised: ``privileged`` or a capability name."""
    return PRIVILEGED if item.strip().lower() == PRIVILEGED else capability_name(item)


def _parse_waivers(value: str) -> tuple[frozenset[str], bool]:
    """(waived settings, every item known) from ``"NET_RAW, cap_sys_ptrace"``."""
    items = [_bypass_item(i) for i in value.split(",") if i.strip()]
    return frozenset(items), all(i in BYPASS_REASONS for i in items)


_WAIVER_ALLOWED = ("a comma-separated list of " + ", ".join(sorted(DANGEROUS_CAPABILITIES))
                   + f" or {PRIVILEGED}")


def _keep_net_raw_error(value: str) -> str:
    return (f"annotation {KEEP_NET_RAW} is no longer supported (it also let privileged and "
            f"NET_ADMIN containers bypass the traffic log without saying so); remove it, and "
            f"if a container must keep NET_RAW, set {ALLOW_AUDIT_BYPASS}: \"NET_RAW\", "
            f"knowing the traffic log is then not a complete record"
            + ("" if value == "true" else f" (it said {json.dumps(value)})"))


def _policy(ann: Mapping[str, Any], config: SidecarConfig) -> Policy:
    value = str(ann.get(AUDIT_BYPASS_POLICY, config.audit_bypass_policy))
    return "strip" if value == "strip" else "refuse"


def _sink(ann: Mapping[str, Any], config: SidecarConfig) -> TrafficLogSink:
    value = str(ann.get(TRAFFIC_LOG_SINK, config.traffic_log_sink))
    return next((s for s in TRAFFIC_LOG_SINKS if s == value), "stdout")


def traffic_log_args(config: SidecarConfig, sink: TrafficLogSink) -> list[str]:
    """tsnet2d's ``--traffic-log`` flags for ``sink``: ``-`` (standard output, the container
    log the cluster's log pipeline collects) and/or the file in the state volume, with the
    rotation flags only when a file is written."""
    args: list[str] = []
    if sink in ("stdout", "both"):
        args += ["--traffic-log", TRAFFIC_LOG_STDOUT]
    if sink in ("file", "both"):
        args += ["--traffic-log", TRAFFIC_LOG_FILE]
        if config.traffic_log_max_bytes > 0:
            args += ["--traffic-log-max-bytes", str(config.traffic_log_max_bytes),
                     "--traffic-log-keep", str(config.traffic_log_keep)]
    return args


def _read_settings(pod: Mapping[str, Any], config: SidecarConfig) -> _Settings:
    ann = _annotations(pod)
    errors: list[str] = []
    for name, allowed in ALLOWED.items():
        if name in ann and str(ann[name]) not in allowed:
            errors.append(_invalid(name, str(ann[name]), allowed))
    if KEEP_NET_RAW in ann:
        errors.append(_keep_net_raw_error(str(ann[KEEP_NET_RAW])))
    waivers: frozenset[str] = frozenset()
    if ALLOW_AUDIT_BYPASS in ann:
        waivers, known = _parse_waivers(str(ann[ALLOW_AUDIT_BYPASS]))
        if not known:
            errors.append(_invalid(ALLOW_AUDIT_BYPASS, str(ann[ALLOW_AUDIT_BYPASS]),
                                   _WAIVER_ALLOWED))
    hostname: str | None = None
    if HOSTNAME in ann:
        hostname = str(ann[HOSTNAME])
        if not _DNS_LABEL.fullmatch(hostname):
            errors.append(_invalid(HOSTNAME, hostname,
                                   "a DNS label (a-z, 0-9, '-', at most 63 characters)"))
    tags: list[str] = []
    if TAGS in ann:
        for item in str(ann[TAGS]).split(","):
            tag = item.strip()
            if not _TAG.fullmatch(tag):
                errors.append(_invalid(TAGS, str(ann[TAGS]),
                                       "comma-separated tags like tag:web,tag:prod"))
                break
            if tag not in tags:
                tags.append(tag)
    persistent = str(ann.get(STATE, "ephemeral")) == "persistent"
    meta = pod.get("metadata") or {}
    serve = _read_serve(ann, errors)
    egress_port = _read_egress(ann, config, errors)
    dns = _read_dns(pod, config, errors)
    if dns is not None and egress_port == 53:
        errors.append(f"annotation {EGRESS}: port 53 is where {DNS} listens; pick another")
    pod_name = str(meta.get("name") or "")
    if hostname is None and pod_name:
        if _DNS_LABEL.fullmatch(pod_name):
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
        traffic_log_sink=_sink(ann, config),
        policy=_policy(ann, config),
        waivers=waivers,
        serve=serve,
        egress_port=egress_port,
        dns=dns,
    )


def _read_serve(ann: Mapping[str, Any], errors: list[str]) -> tuple[ServeRule, ...]:
    """The ``tsnet2.io/serve`` rules (errors appended); a unix target must be in SERVE_DIR."""
    if SERVE not in ann:
        return ()
    try:
        return parse_serve_rules(str(ann[SERVE]), _serve_path_problem)
    except ServeRuleError as exc:
        errors.append(f"annotation {SERVE}: {exc}")
        return ()


def _serve_path_problem(rule: ServeRule) -> str | None:
    """A unix target outside SERVE_DIR (the sidecar cannot see it), else None."""
    path = rule.unix_path
    if path is None or (path.startswith(SERVE_DIR + "/")
                        and "/" not in path[len(SERVE_DIR) + 1:]):
        return None
    return (f"the sidecar cannot see {path}: put the app's socket in {SERVE_DIR}/ (e.g. "
            f"unix:{SERVE_DIR}/app.sock), the directory the injector shares between the app "
            f"containers (read-write) and the sidecar")


_EGRESS_ALLOWED = "true, false or a loopback port number 1..65535"


def _read_egress(ann: Mapping[str, Any], config: SidecarConfig,
                 errors: list[str]) -> int | None:
    """The egress proxy's port from ``tsnet2.io/egress`` (None: off; errors appended)."""
    if EGRESS not in ann:
        return None
    value = str(ann[EGRESS])
    if value == "false":
        return None
    if value == "true":
        return config.egress_port
    if re.fullmatch(r"[1-9][0-9]{0,4}", value) and int(value) <= 65535:
        port = int(value)
        if port == METRICS_PORT:
            errors.append(f"annotation {EGRESS}: port {port} is the sidecar's metrics port; "
                          f"pick another")
        return port
    errors.append(_invalid(EGRESS, value, _EGRESS_ALLOWED))
    return None


_DNS_POLICIES_REPLACED = ("ClusterFirst", "ClusterFirstWithHostNet")


def _read_dns(pod: Mapping[str, Any], config: SidecarConfig,
              errors: list[str]) -> tuple[str, str] | None:
    """(upstream, namespace) from ``tsnet2.io/dns`` (None: off; errors appended)."""
    ann = _annotations(pod)
    if DNS not in ann:
        return None
    value = str(ann[DNS])
    if value not in ("true", "false"):
        errors.append(_invalid(DNS, value, ("true", "false")))
        return None
    if value == "false":
        return None
    spec = pod.get("spec") or {}
    policy = spec.get("dnsPolicy")
    if policy is not None and policy not in _DNS_POLICIES_REPLACED:
        errors.append(f"annotation {DNS}: the pod sets dnsPolicy: {policy}, and {DNS} sets "
                      f"dnsPolicy: None with the sidecar as the nameserver; remove one of them")
    if spec.get("dnsConfig"):
        errors.append(f"annotation {DNS}: the pod sets its own dnsConfig, and {DNS} sets "
                      f"dnsConfig (the sidecar as the nameserver, the namespace's search "
                      f"list); remove one of them")
    if not config.dns_upstream or parse_dns_upstream(config.dns_upstream) is None:
        errors.append(f"annotation {DNS}: the operator knows no cluster DNS server to forward "
                      f"other names to (no kube-system/kube-dns Service at start-up, and the "
                      f"chart value dns.upstream is unset); ask the cluster admin to set it, "
                      f"or remove {DNS}")
        return None
    namespace = str((pod.get("metadata") or {}).get("namespace") or "")
    if not _DNS_LABEL.fullmatch(namespace):
        errors.append(f"annotation {DNS}: the pod's namespace {namespace!r} is unknown, so its "
                      f"DNS search list cannot be built")
        return None
    return config.dns_upstream, namespace


def dns_config(namespace: str, cluster_domain: str) -> dict[str, Any]:
    """The pod's ``dnsConfig`` with ``tsnet2.io/dns``: the sidecar as the only nameserver and
    the search list and ndots the kubelet gives a ClusterFirst pod of ``namespace``."""
    return {
        "nameservers": [DNS_LISTEN.rpartition(":")[0]],
        "searches": [f"{namespace}.svc.{cluster_domain}", f"svc.{cluster_domain}",
                     cluster_domain],
        "options": [{"name": "ndots", "value": "5"}],
    }


def _check_conflicts(spec: Mapping[str, Any]) -> None:
    clash = sorted(OUR_VOLUMES & {str(v.get("name")) for v in spec.get("volumes") or []})
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


def _other_containers(spec: Mapping[str, Any]) -> list[tuple[str, int, Mapping[str, Any]]]:
    """Containers that are neither tsnet2d nor app containers: plain init containers (and
    ephemeral containers, which the API server refuses at creation anyway)."""
    found = [
        ("initContainers", i, c)
        for i, c in enumerate(spec.get("initContainers") or [])
        if c.get("restartPolicy") != "Always"
    ]
    found += [("ephemeralContainers", i, c)
              for i, c in enumerate(spec.get("ephemeralContainers") or [])]
    return found


@dataclass
class _Confined:
    """What confining one container produced."""

    ops: list[Op] = field(default_factory=list)
    net_raw_dropped: bool = False
    refused: list[Finding] = field(default_factory=list)
    stripped: list[Finding] = field(default_factory=list)
    waived: list[Finding] = field(default_factory=list)


_SOCKET_MOUNT = {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR, "readOnly": True}
_SERVE_MOUNT = {"name": SERVE_VOLUME, "mountPath": SERVE_DIR}
_SOCKET_ENV = {"name": "TSNET2_SOCKET", "value": SOCKET_PATH}
_CA_BUNDLE_ENV = {"name": CA_BUNDLE_ENV, "value": CA_BUNDLE_PATH}


@dataclass(frozen=True)
class _Wiring:
    """What every app container gets: mounts (the socket's first) and env vars."""

    mounts: tuple[Mapping[str, Any], ...] = (_SOCKET_MOUNT,)
    env: tuple[Mapping[str, str], ...] = (_SOCKET_ENV, _CA_BUNDLE_ENV)


def _wiring(settings: _Settings) -> _Wiring:
    mounts: list[Mapping[str, Any]] = [_SOCKET_MOUNT]
    if settings.serve_unix:
        mounts.append(_SERVE_MOUNT)
    env: list[Mapping[str, str]] = [_SOCKET_ENV, _CA_BUNDLE_ENV]
    if settings.egress_port is not None:
        env += [{"name": EGRESS_PROXY_ENV,
                 "value": f"socks5h://127.0.0.1:{settings.egress_port}"},
                {"name": EGRESS_SOCKET_ENV, "value": EGRESS_SOCKET_PATH}]
    return _Wiring(tuple(mounts), tuple(env))


def _is_mount(mount: object, wanted: Mapping[str, Any]) -> bool:
    """``mount`` is ``wanted`` (the injector's, found in place by a re-invocation)."""
    return (isinstance(mount, Mapping) and mount.get("name") == wanted["name"]
            and str(mount.get("mountPath", "")).rstrip("/") == wanted["mountPath"]
            and (mount.get("readOnly") is True) == bool(wanted.get("readOnly"))
            and not mount.get("subPath"))


def _is_socket_mount(mount: object) -> bool:
    """The read-only socket mount the injector adds (a re-invocation finds it in place)."""
    return _is_mount(mount, _SOCKET_MOUNT)


def _add_items(base: str, key: str, container: Mapping[str, Any],
               items: Sequence[Mapping[str, Any]]) -> list[Op]:
    """Ops appending ``items`` to the container's list ``key`` (creating it if missing)."""
    if not items:
        return []
    if isinstance(container.get(key), list):
        return [{"op": "add", "path": f"{base}/{key}/-", "value": dict(i)} for i in items]
    return [{"op": "add", "path": f"{base}/{key}", "value": [dict(i) for i in items]}]


def _mount_socket(base: str, container: Mapping[str, Any],
                  wiring: _Wiring = _Wiring()) -> list[Op]:
    """Ops that mount the socket directory read-only (and the serve directory, with unix
    serve targets) and set TSNET2_SOCKET, TSNET2_CA_BUNDLE (and the egress variables)."""
    present = container.get("volumeMounts") or []
    mounts = [m for m in wiring.mounts if not any(_is_mount(p, m) for p in present)]
    env_names = {str(e.get("name")) for e in container.get("env") or []}
    env = [e for e in wiring.env if e["name"] not in env_names]  # the container's own wins
    return (_add_items(base, "volumeMounts", container, mounts)
            + _add_items(base, "env", container, env))


def _check_mounts(container: Mapping[str, Any], mount_socket: bool, remedy: str,
                  wiring: _Wiring = _Wiring()) -> None:
    """Refuse a container that mounts one of our volumes (keys, token, socket, TUN) or, when
    it gets the socket, already mounts something at the socket (or serve) directory."""
    name = json.dumps(str(container.get("name")))
    for mount in container.get("volumeMounts") or []:
        if mount_socket and any(_is_mount(mount, m) for m in wiring.mounts):
            continue
        if str(mount.get("name")) in OUR_VOLUMES:
            raise InjectionRejected(
                "conflict", f"tsnet2: container {name} mounts volume {mount.get('name')}, "
                f"which belongs to the tsnet2d sidecar (its keys, token or socket); {remedy}")
        path = str(mount.get("mountPath", "")).rstrip("/")
        if mount_socket and path in {str(m["mountPath"]) for m in wiring.mounts}:
            what = ("the tsnet2d socket" if path == SOCKET_DIR
                    else f"the sockets that {SERVE} forwards to")
            raise InjectionRejected(
                "conflict", f"tsnet2: container {name} already mounts {path}, where the "
                f"injector mounts {what}; {remedy}")


def _confine_all(targets: list[tuple[str, Mapping[str, Any], bool]], *, policy: Policy,
                 waivers: frozenset[str], remedy: str, ephemeral: bool,
                 wiring: _Wiring = _Wiring()) -> tuple[_Confined, list[str]]:
    """Confine every (JSON pointer, container, mount the socket?) and add up the results,
    with the names of the containers that lost NET_RAW; every refusal is raised at once."""
    total = _Confined()
    dropped: list[str] = []
    for base, container, mount_socket in targets:
        one = _confine(base, container, mount_socket=mount_socket, policy=policy,
                       waivers=waivers, remedy=remedy, wiring=wiring)
        total.ops += one.ops
        total.refused += one.refused
        total.stripped += one.stripped
        total.waived += one.waived
        if one.net_raw_dropped:
            dropped.append(str(container.get("name")))
    if total.refused:
        raise _refusal(total.refused, ephemeral=ephemeral)
    return total, dropped


def _confine(base: str, container: Mapping[str, Any], *, mount_socket: bool, policy: Policy,
             waivers: frozenset[str], remedy: str, wiring: _Wiring = _Wiring()) -> _Confined:
    """Check one container against the audit boundary and build its ops.

    Every dangerous setting is refused, stripped (policy ``strip``) or waived; ``NET_RAW`` is
    added to ``capabilities.drop`` unless waived or already dropped. With ``mount_socket``
    the socket is mounted and ``TSNET2_SOCKET`` set.
    """
    name = str(container.get("name"))
    _check_mounts(container, mount_socket, remedy, wiring)
    out = _Confined(ops=_mount_socket(base, container, wiring) if mount_socket else [])
    sc = container.get("securityContext")
    sc = sc if isinstance(sc, Mapping) else {}
    caps = sc.get("capabilities")
    caps = caps if isinstance(caps, Mapping) else {}
    raw_add, raw_drop = caps.get("add"), caps.get("drop")
    added = [capability_name(c) for c in raw_add] if isinstance(raw_add, list) else []
    dropped = {capability_name(c) for c in raw_drop} if isinstance(raw_drop, list) else set()

    def judge(setting: str) -> bool:
        """Record the finding; True when the setting must be removed (strip)."""
        finding = Finding(name, setting)
        if setting in waivers:
            out.waived.append(finding)
            return False
        if policy == "strip":
            out.stripped.append(finding)
            return True
        out.refused.append(finding)
        return False

    if sc.get("privileged") is True and judge(PRIVILEGED):
        out.ops.append({"op": "replace", "path": f"{base}/securityContext/privileged",
                        "value": False})
    removals: list[int] = []
    for setting in dict.fromkeys(c for c in added if c in DANGEROUS_CAPABILITIES):
        if judge(setting):
            removals += [i for i, c in enumerate(added) if c == setting]
    # Highest index first keeps the other indexes valid.
    for i in sorted(removals, reverse=True):
        out.ops.append({"op": "remove", "path": f"{base}/securityContext/capabilities/add/{i}"})

    if "NET_RAW" in waivers:
        if "NET_RAW" not in added and not dropped & {"NET_RAW", "ALL"}:
            out.waived.append(Finding(name, "NET_RAW"))  # the runtime's default, kept
        return out
    if dropped & {"NET_RAW", "ALL"}:
        return out
    out.net_raw_dropped = True
    if not isinstance(container.get("securityContext"), Mapping):
        out.ops.append({"op": "add", "path": f"{base}/securityContext",
                        "value": {"capabilities": {"drop": ["NET_RAW"]}}})
    elif not isinstance(sc.get("capabilities"), Mapping):
        out.ops.append({"op": "add", "path": f"{base}/securityContext/capabilities",
                        "value": {"drop": ["NET_RAW"]}})
    elif not isinstance(caps.get("drop"), list):
        out.ops.append({"op": "add", "path": f"{base}/securityContext/capabilities/drop",
                        "value": ["NET_RAW"]})
    else:
        out.ops.append({"op": "add", "path": f"{base}/securityContext/capabilities/drop/-",
                        "value": "NET_RAW"})
    return out


def _refusal(findings: Sequence[Finding], *, ephemeral: bool) -> InjectionRejected:
    """The rejection for ``findings``: each with its reason, then what the user can do.

    The waiver is offered only at creation: later it is fixed (see :func:`sidecar_waivers`).
    """
    it = "it" if len(findings) == 1 else "them"
    settings = ",".join(dict.fromkeys(f.setting for f in findings))
    if ephemeral:
        remedy = (f"remove {it} (kubectl debug: --profile=baseline or --profile=restricted; "
                  f"its default profile, general, adds SYS_PTRACE), or set "
                  f"{AUDIT_BYPASS_POLICY}: strip on the pod to have {it} removed")
    else:
        remedy = (f"remove {it}, or set {INJECT}: disabled, or set {AUDIT_BYPASS_POLICY}: "
                  f"strip to have {it} removed; {ALLOW_AUDIT_BYPASS}: {json.dumps(settings)} "
                  f"admits {it}, but the traffic log is then NOT a complete record")
    return InjectionRejected(
        "unconfinable_container",
        "tsnet2: " + "; ".join(f.describe() for f in findings) + "; " + remedy)


def _warnings(dropped: Sequence[str], stripped: Sequence[Finding],
              waived: Sequence[Finding]) -> tuple[str, ...]:
    out: list[str] = []
    if dropped:
        out.append("tsnet2: dropped capability NET_RAW from container(s) " + ", ".join(dropped))
    for f in stripped:
        what = (f"set privileged: false on container {json.dumps(f.container)}"
                if f.setting == PRIVILEGED else
                f"removed capability {f.setting} from container {json.dumps(f.container)}")
        out.append(f"tsnet2: {what} ({AUDIT_BYPASS_POLICY}: strip): {f.setting} {f.reason}")
    for f in waived:
        out.append(f"tsnet2: container {json.dumps(f.container)} keeps {f.setting} "
                   f"({ALLOW_AUDIT_BYPASS}), which {f.reason}: the traffic log is NOT a "
                   f"complete record of this pod's tailnet traffic")
    return tuple(out)


def _summary(stripped: Sequence[Finding], waived: Sequence[Finding]) -> list[str]:
    """Event message parts about the audit boundary."""
    parts = []
    if stripped:
        parts.append("stripped " + ", ".join(f"{f.setting} from {f.container}"
                                             for f in stripped))
    if waived:
        parts.append(f"audit bypass allowed ({ALLOW_AUDIT_BYPASS}): "
                     + ", ".join(f"{f.setting} in {f.container}" for f in waived)
                     + "; the traffic log is NOT a complete record")
    return parts


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
        *traffic_log_args(config, settings.traffic_log_sink),
        "--allow-any-uid",
        *access.args(),
        "--backend", config.backend,
    ]
    if not settings.persistent:
        args.append("--ephemeral")
    if settings.tags:
        args += ["--advertise-tags", ",".join(settings.tags)]
    for rule in settings.serve:
        args += ["--serve", str(rule)]
    if settings.egress_port is not None:
        args += ["--egress-listen", f"127.0.0.1:{settings.egress_port}",
                 "--egress-socket", EGRESS_SOCKET_PATH]
    if settings.dns is not None:
        args += ["--dns-listen", DNS_LISTEN, "--dns-upstream", settings.dns[0]]

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
    if settings.serve_unix:
        # Read-only: the sidecar only connects to the app's sockets there.
        mounts.append({"name": SERVE_VOLUME, "mountPath": SERVE_DIR, "readOnly": True})
    # NET_ADMIN: WireGuard device, routes, the nftables guard, SO_MARK; NET_BIND_SERVICE:
    # the sidecar binds the tailnet ports below 1024 (a serve rule's 80, an app's
    # listen(":443")) and, with tsnet2.io/dns, the DNS responder's port 53.
    caps = ["NET_ADMIN", "NET_BIND_SERVICE"]
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
            *([{"name": AUDIT_BYPASS_ENV, "value": ",".join(sorted(settings.waivers))}]
              if settings.waivers else []),
        ],
        "ports": [{"name": "tsnet2-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "startupProbe": {
            "httpGet": {"path": "/readyz", "port": METRICS_PORT},
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 120,
        },
        # /healthz fails when the daemon cannot serve (accept loop dead, event loop wedged,
        # node stopped): the kubelet restarts it and clients re-register (DESIGN §2.11).
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": METRICS_PORT},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": resources,
        "securityContext": {
            # Root is needed for an added capability (above) to be effective; everything
            # else is dropped.
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": caps, "drop": ["ALL"]},
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
    if settings.serve_unix:
        volumes.append({"name": SERVE_VOLUME, "emptyDir": {"medium": "Memory"}})
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
    checked = [(_ptr("spec", k, i), c, True) for k, i, c in _app_containers(spec)]
    checked += [(_ptr("spec", k, i), c, False) for k, i, c in _other_containers(spec)]
    confined, dropped = _confine_all(
        checked, policy=settings.policy, waivers=settings.waivers,
        remedy=f"remove the mount, or set {INJECT}: disabled", ephemeral=False,
        wiring=_wiring(settings))
    ops, stripped, waived = confined.ops, confined.stripped, confined.waived

    status = {
        "version": STATUS_VERSION,
        "sidecar": "native" if native_sidecar else "regular",
        "containers": [] if native_sidecar else [SIDECAR_NAME],
        "initContainers": [SIDECAR_NAME] if native_sidecar else [],
        "volumes": [v["name"] for v in _volumes(config, settings)],
        "netRawDropped": dropped,
        "auditBypassPolicy": settings.policy,
        "auditBypassAllowed": sorted(settings.waivers),
        "stripped": [f.to_json() for f in stripped],
        "auditBypass": [f.to_json() for f in waived],
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

    if settings.dns is not None:
        # ClusterFirst (the API server's default) is replaced; anything else was refused.
        op = "replace" if "dnsPolicy" in spec else "add"
        ops.append({"op": op, "path": "/spec/dnsPolicy", "value": "None"})
        ops.append({"op": "replace" if "dnsConfig" in spec else "add", "path": "/spec/dnsConfig",
                    "value": dns_config(settings.dns[1], config.dns_cluster_domain)})

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
             f"traffic-log {settings.traffic_log} to {settings.traffic_log_sink}",
             access.describe()]
    if settings.serve:
        parts.append("serve " + " ".join(str(rule) for rule in settings.serve))
    if settings.egress_port is not None:
        parts.append(f"egress proxy 127.0.0.1:{settings.egress_port}")
    if settings.dns is not None:
        parts.append(f"dns {DNS_LISTEN} forwarding to {settings.dns[0]}")
    if dropped:
        parts.append("dropped NET_RAW from " + ", ".join(dropped))
    parts += _summary(stripped, waived)
    return Decision(result="injected", reason=source, message="; ".join(parts), patch=ops,
                    net_raw_dropped=tuple(dropped), stripped=tuple(stripped),
                    waived=tuple(waived), warnings=_warnings(dropped, stripped, waived))


def _containers_named(spec: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    items = spec.get(key)
    return [c for c in items if isinstance(c, Mapping)] if isinstance(items, list) else []


def sidecar_waivers(spec: Mapping[str, Any]) -> frozenset[str] | None:
    """The waivers fixed at injection (the sidecar's ``TSNET2_AUDIT_BYPASS``), or None when
    the pod has no tsnet2d container. Container specs cannot change after creation, so
    unlike the pod's annotations this is what the pod was admitted with."""
    every = _containers_named(spec, "containers") + _containers_named(spec, "initContainers")
    sidecar = next((c for c in every if c.get("name") == SIDECAR_NAME), None)
    if sidecar is None:
        return None
    for var in sidecar.get("env") or []:
        if isinstance(var, Mapping) and var.get("name") == AUDIT_BYPASS_ENV:
            waivers, _known = _parse_waivers(str(var.get("value") or ""))
            return waivers & frozenset(BYPASS_REASONS)
    return frozenset()


def check_ephemeral(
    pod: Mapping[str, Any],
    old_pod: Mapping[str, Any] | None,
    config: SidecarConfig,
) -> Decision:
    """Apply the audit boundary to ephemeral containers added to an injected pod.

    ``pod``/``old_pod`` are the new and old objects of a ``pods/ephemeralcontainers`` UPDATE
    (e.g. ``kubectl debug``). A pod without a tsnet2d container is skipped (``no_sidecar``).
    Each new ephemeral container is refused, or stripped (policy from the pod's
    ``tsnet2.io/audit-bypass-policy``, else the config), when it is privileged or adds a
    dangerous capability the sidecar's recorded waivers do not name; it loses NET_RAW and
    gets the socket (when the pod has the socket volume). The API server keeps only
    ``spec.ephemeralContainers`` from this request, so the status annotation cannot record
    anything here: the Event and the admission warnings do.
    Raises :class:`InjectionRejected`.
    """
    spec: Mapping[str, Any] = pod.get("spec") or {}
    waivers = sidecar_waivers(spec)
    if waivers is None:
        return _skip("no_sidecar", f"the pod has no {SIDECAR_NAME} container")
    old_spec: Mapping[str, Any] = (old_pod or {}).get("spec") or {}
    known = {str(c.get("name")) for c in _containers_named(old_spec, "ephemeralContainers")}
    new = [(i, c) for i, c in enumerate(_containers_named(spec, "ephemeralContainers"))
           if str(c.get("name")) not in known]
    if not new:
        return _skip("no_new_containers", "no ephemeral container was added")
    ann = _annotations(pod)
    if AUDIT_BYPASS_POLICY in ann and str(ann[AUDIT_BYPASS_POLICY]) not in POLICIES:
        raise InjectionRejected("invalid_annotation", "tsnet2: " + _invalid(
            AUDIT_BYPASS_POLICY, str(ann[AUDIT_BYPASS_POLICY]), POLICIES))
    policy = _policy(ann, config)
    has_socket = SOCKET_VOLUME in {str(v.get("name")) for v in spec.get("volumes") or []
                                   if isinstance(v, Mapping)}
    confined, dropped = _confine_all(
        [(_ptr("spec", "ephemeralContainers", i), c, has_socket) for i, c in new],
        policy=policy, waivers=waivers, remedy="remove the mount", ephemeral=True)
    ops, stripped, waived = confined.ops, confined.stripped, confined.waived
    names = ", ".join(str(c.get("name")) for _i, c in new)
    parts = [f"ephemeral container(s) {names}: "
             + ("mounted the tsnet2d socket" if has_socket else "no socket volume to mount")]
    if dropped:
        parts.append("dropped NET_RAW from " + ", ".join(dropped))
    parts += _summary(stripped, waived)
    return Decision(result="injected", reason="ephemeral_container", message="; ".join(parts),
                    patch=ops, net_raw_dropped=tuple(dropped), stripped=tuple(stripped),
                    waived=tuple(waived), warnings=_warnings(dropped, stripped, waived))
