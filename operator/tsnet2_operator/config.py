"""Operator configuration: defaults, then an optional JSON file, then environment variables.

One table (:data:`FIELDS`) names every setting, its environment variable and its parser, so
the file keys, the env vars and ``docs/operator.md`` cannot drift apart. Later sources win:

1. the defaults below;
2. the JSON object in the file named by ``$TSNET2_OPERATOR_CONFIG`` (keys = field names);
3. the environment variables.

Everything here is pure: :func:`load_config` takes the environment and a file reader as
arguments (defaulting to the process's), so tests never touch global state.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tsnet2._version import __version__
from tsnet2.control.authkeys import DEFAULT_DOMAIN
from tsnet2.control.ca import DEFAULT_CERT_LIFETIME, MIN_CERT_LIFETIME
from tsnet2.control.names import validate_domain

Backend = Literal["userspace", "kernel"]
NativeSidecarMode = Literal["auto", "on", "off"]
TrafficLogMode = Literal["payload", "metadata", "off"]
TrafficLogSink = Literal["stdout", "file", "both"]
TRAFFIC_LOG_SINKS: tuple[TrafficLogSink, ...] = ("stdout", "file", "both")
AuditBypassPolicy = Literal["refuse", "strip"]

CONFIG_FILE_ENV = "TSNET2_OPERATOR_CONFIG"
NAMESPACE_ENV = "TSNET2_NAMESPACE"
POD_NAMESPACE_ENV = "POD_NAMESPACE"  # the chart sets it from the downward API
MAX_CONFIG_BYTES = 64 * 1024  # a config file is a handful of keys; refuse anything huge
NATIVE_SIDECAR_MIN_VERSION = (1, 29)  # SidecarContainers is beta and on by default from 1.29
DEFAULT_EGRESS_PORT = 1055

# Whole-string patterns (re.fullmatch): "$" would also accept a trailing newline.
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_URL = re.compile(r"https?://[^/\s]+(/\S*)?")
_HOST_PORT = re.compile(r"\S*:[0-9]{1,5}")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class ConfigError(ValueError):
    """A setting is missing or has a value the operator cannot use (the message says which)."""


@dataclass(frozen=True)
class SidecarConfig:
    """What the injector puts into a pod: the tsnet2d sidecar's image, control URL and limits."""

    # The sidecar image of this release (the Containerfile's `sidecar` target: tsnet2d and
    # the CLI, without the operator's dependencies); the full `tsnet2` image works too.
    image: str = f"tsnet2-sidecar:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    control_url: str = ""
    backend: Backend = "userspace"
    cpu_request: str = "10m"
    memory_request: str = "64Mi"
    cpu_limit: str = ""
    memory_limit: str = ""
    traffic_log_default: TrafficLogMode = "payload"
    traffic_log_sink: TrafficLogSink = "stdout"
    traffic_log_max_bytes: int = 100 << 20
    traffic_log_keep: int = 5
    audit_bypass_policy: AuditBypassPolicy = "refuse"
    # tsnet2.io/egress: "true" listens on this loopback port in the pod.
    egress_port: int = DEFAULT_EGRESS_PORT
    # tsnet2.io/dns: the sidecar forwards non-tailnet names to this IP[:PORT] (the cluster
    # DNS Service); empty: the operator looks up kube-system/kube-dns once at start-up.
    dns_upstream: str = ""
    # ...and the pod's search list is <ns>.svc.<domain> svc.<domain> <domain>.
    dns_cluster_domain: str = "cluster.local"


@dataclass(frozen=True)
class OperatorConfig:
    """All operator settings: the sidecar template plus how the operator itself runs."""

    sidecar: SidecarConfig = field(default_factory=SidecarConfig)
    native_sidecar: NativeSidecarMode = "auto"
    webhook_addr: str = "0.0.0.0"
    webhook_port: int = 9443
    webhook_cert_file: str = ""
    webhook_key_file: str = ""
    metrics_addr: str = "0.0.0.0:9090"
    namespace: str = ""
    control_addr: str = "0.0.0.0:8440"
    control_tls_cert_file: str = ""
    control_tls_key_file: str = ""
    cert_lifetime: float = DEFAULT_CERT_LIFETIME
    domain: str = DEFAULT_DOMAIN
    ephemeral_timeout: float = 3600.0
    sweep_interval: float = 10.0
    install_crds: bool = True


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, value: str) -> str:
        if value not in allowed:
            raise ConfigError(f"{name}: invalid value {value!r}; allowed: {', '.join(allowed)}")
        return value

    return parse


def _text(name: str, value: str) -> str:
    return value.strip()


def _nonempty(name: str, value: str) -> str:
    value = value.strip()
    if not value:
        raise ConfigError(f"{name}: must not be empty")
    return value


def _count(name: str, value: str) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not a whole number") from None
    if not 0 <= n < 1 << 62:
        raise ConfigError(f"{name}: {n} is outside 0..2^62")
    return n


def _quantity(name: str, value: str) -> str:
    value = value.strip()
    if value and not _QUANTITY.fullmatch(value):
        raise ConfigError(f"{name}: {value!r} is not a Kubernetes quantity (e.g. 10m, 64Mi)")
    return value


def _port(name: str, value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        hint = ""
        if re.fullmatch(r"(tcp|udp|sctp)://\S+:[0-9]+", value.strip()):
            hint = ("; it looks like a Kubernetes Service-link variable (a Service named like "
                    "this setting in the pod's namespace): set enableServiceLinks: false in "
                    "the pod spec, as the chart does")
        raise ConfigError(f"{name}: {value!r} is not a port number{hint}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}: {port} is outside 0..65535")
    return port


def _url(name: str, value: str) -> str:
    value = value.strip()
    if value and not _URL.fullmatch(value):
        raise ConfigError(f"{name}: {value!r} is not an http:// or https:// URL")
    return value


def _host_port(name: str, value: str) -> str:
    value = value.strip()
    if value and not _HOST_PORT.fullmatch(value):
        raise ConfigError(f"{name}: {value!r} is not HOST:PORT (empty turns metrics off)")
    return value


def _listen_addr(name: str, value: str) -> str:
    value = _host_port(name, value)
    if not value:
        raise ConfigError(f"{name}: must not be empty (HOST:PORT, e.g. 0.0.0.0:8440)")
    port = int(value.rpartition(":")[2])
    if port > 65535:
        raise ConfigError(f"{name}: port {port} is outside 0..65535")
    return value


def _cert_lifetime(name: str, value: str) -> float:
    seconds = _seconds(name, value)
    if seconds < MIN_CERT_LIFETIME:
        raise ConfigError(f"{name}: {value!r} must be at least {MIN_CERT_LIFETIME:g} seconds")
    return seconds


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not a number of seconds") from None
    if not 0 < seconds < 10**9:  # also refuses nan and inf
        raise ConfigError(f"{name}: {value!r} must be a positive number of seconds")
    return seconds


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{name}: invalid value {value!r}; allowed: true, false")


def _listen_port(name: str, value: str) -> int:
    port = _port(name, value.strip())
    if port == 0:
        raise ConfigError(f"{name}: 0 is not a port to listen on (1..65535)")
    return port


def _dns_upstream(name: str, value: str) -> str:
    value = value.strip()
    if value and parse_dns_upstream(value) is None:
        raise ConfigError(f"{name}: {value!r} is not an IP address with an optional port "
                          "(e.g. 10.96.0.10, 10.96.0.10:53, [fd00::a]:53); empty: the "
                          "kube-dns Service's address")
    return value


def parse_dns_upstream(value: str) -> tuple[str, int] | None:
    """(IP, port) from ``IP``, ``IP:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``; None if not that."""
    host, port = value, 53
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?", value)
    if m:
        host, port = m.group(1), int(m.group(2) or 53)
    elif value.count(":") == 1:
        host, _, text = value.partition(":")
        if not re.fullmatch(r"[0-9]{1,5}", text):
            return None
        port = int(text)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not 0 < port <= 65535:
        return None
    return str(addr), port


def _cluster_domain(name: str, value: str) -> str:
    value = value.strip().rstrip(".")
    labels = value.split(".")
    if not value or not all(_DNS_LABEL.fullmatch(label) for label in labels) \
            or len(value) > 253:
        raise ConfigError(f"{name}: {value!r} is not a DNS domain (e.g. cluster.local)")
    return value


def _domain(name: str, value: str) -> str:
    try:
        return validate_domain(value.strip())
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class Field:
    """One setting: where it lives (``sidecar`` or operator), its env var and its parser."""

    key: str
    env: str
    parse: Callable[[str, str], Any]
    sidecar: bool
    doc: str


FIELDS: tuple[Field, ...] = (
    Field("image", "TSNET2_SIDECAR_IMAGE", _nonempty, True, "tsnet2d sidecar image"),
    Field("image_pull_policy", "TSNET2_SIDECAR_IMAGE_PULL_POLICY",
          _choice("Always", "IfNotPresent", "Never"), True, "sidecar imagePullPolicy"),
    Field("control_url", "TSNET2_CONTROL_URL", _url, True,
          "coordination server URL given to the sidecar as TS_CONTROL_URL (required)"),
    Field("backend", "TSNET2_BACKEND", _choice("userspace", "kernel"), True,
          "WireGuard backend: userspace (wireguard-go, mounts /dev/net/tun) or kernel"),
    Field("cpu_request", "TSNET2_SIDECAR_CPU_REQUEST", _quantity, True, "sidecar CPU request"),
    Field("memory_request", "TSNET2_SIDECAR_MEMORY_REQUEST", _quantity, True,
          "sidecar memory request"),
    Field("cpu_limit", "TSNET2_SIDECAR_CPU_LIMIT", _quantity, True,
          "sidecar CPU limit (empty: none)"),
    Field("memory_limit", "TSNET2_SIDECAR_MEMORY_LIMIT", _quantity, True,
          "sidecar memory limit (empty: none)"),
    Field("traffic_log_default", "TSNET2_TRAFFIC_LOG_DEFAULT",
          _choice("payload", "metadata", "off"), True,
          "traffic-log mode for pods without the tsnet2.io/traffic-log annotation"),
    Field("traffic_log_sink", "TSNET2_TRAFFIC_LOG_SINK", _choice(*TRAFFIC_LOG_SINKS), True,
          "where the sidecar writes its traffic log in pods without the "
          "tsnet2.io/traffic-log-sink annotation: stdout (the container log, collected by the "
          "cluster's log pipeline), file (traffic.jsonl in the state volume, rotated) or both"),
    Field("traffic_log_max_bytes", "TSNET2_TRAFFIC_LOG_MAX_BYTES", _count, True,
          "the sidecar rotates its traffic log file (sink file or both) before it grows past "
          "this many bytes (0: never)"),
    Field("traffic_log_keep", "TSNET2_TRAFFIC_LOG_KEEP", _count, True,
          "rotated traffic-log files the sidecar keeps (traffic.jsonl.1 ... .N)"),
    Field("audit_bypass_policy", "TSNET2_AUDIT_BYPASS_POLICY", _choice("refuse", "strip"), True,
          "containers that could bypass the traffic log (privileged, NET_RAW, NET_ADMIN, ...) "
          "in pods without tsnet2.io/audit-bypass-policy: refuse the pod, or strip the setting"),
    Field("egress_port", "TSNET2_EGRESS_PORT", _listen_port, True,
          "loopback port of the sidecar's egress proxy (SOCKS5 and HTTP) in pods with "
          "tsnet2.io/egress: \"true\""),
    Field("dns_upstream", "TSNET2_DNS_UPSTREAM", _dns_upstream, True,
          "IP[:PORT] the sidecar's DNS responder (tsnet2.io/dns) forwards non-tailnet names "
          "to: the cluster DNS Service (empty: the ClusterIP of kube-system/kube-dns, looked "
          "up once at start-up)"),
    Field("dns_cluster_domain", "TSNET2_DNS_CLUSTER_DOMAIN", _cluster_domain, True,
          "the cluster's DNS domain, for the search list of pods with tsnet2.io/dns"),
    Field("native_sidecar", "TSNET2_NATIVE_SIDECAR", _choice("auto", "on", "off"), False,
          "native sidecar (initContainer, restartPolicy Always): auto = API server >= 1.29"),
    Field("webhook_addr", "TSNET2_WEBHOOK_ADDR", _nonempty, False,
          "address the admission webhook listens on"),
    Field("webhook_port", "TSNET2_WEBHOOK_PORT", _port, False, "admission webhook port"),
    Field("webhook_cert_file", "TSNET2_WEBHOOK_CERT_FILE", _text, False,
          "PEM serving certificate (re-read when it changes) (required)"),
    Field("webhook_key_file", "TSNET2_WEBHOOK_KEY_FILE", _text, False,
          "PEM private key of the serving certificate (required)"),
    Field("metrics_addr", "TSNET2_METRICS_ADDR", _host_port, False,
          "HOST:PORT for the operator's /metrics (empty: off)"),
    Field("namespace", NAMESPACE_ENV, _nonempty, False,
          f"namespace of the tsnet2.io objects (the store); else ${POD_NAMESPACE_ENV} "
          "(required)"),
    Field("control_addr", "TSNET2_CONTROL_ADDR", _listen_addr, False,
          "HOST:PORT the coordination (control) server listens on"),
    Field("control_tls_cert_file", "TSNET2_CONTROL_TLS_CERT_FILE", _text, False,
          "PEM certificate: serve the control API over HTTPS (empty: plain HTTP)"),
    Field("control_tls_key_file", "TSNET2_CONTROL_TLS_KEY_FILE", _text, False,
          "PEM private key of the control server's certificate"),
    Field("cert_lifetime", "TSNET2_CERT_LIFETIME", _cert_lifetime, False,
          "seconds a node certificate from the tailnet CA is valid (the control server's "
          "--cert-lifetime; nodes renew when a third is left)"),
    Field("domain", "TSNET2_DOMAIN", _domain, False, "tailnet DNS domain (MagicDNS suffix)"),
    Field("ephemeral_timeout", "TSNET2_EPHEMERAL_TIMEOUT", _seconds, False,
          "seconds offline before the control server drops an ephemeral node"),
    Field("sweep_interval", "TSNET2_SWEEP_INTERVAL", _seconds, False,
          "seconds between garbage-collection sweeps (nodes, state claims, orphan claims)"),
    Field("install_crds", "TSNET2_INSTALL_CRDS", _bool, False,
          "create/update the tsnet2.io CRDs (and, with --peering, kopf's) at start-up"),
)
_BY_KEY = {f.key: f for f in FIELDS}


def _read_file(path: str) -> str:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FILE_ENV}={path}: cannot read: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{CONFIG_FILE_ENV}={path}: larger than {MAX_CONFIG_BYTES} bytes")
    return data.decode("utf-8", "replace")


def _file_values(path: str, read: Callable[[str], str]) -> dict[str, str]:
    try:
        doc = json.loads(read(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{CONFIG_FILE_ENV}={path}: not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{CONFIG_FILE_ENV}={path}: must hold a JSON object")
    unknown = sorted(set(doc) - set(_BY_KEY))
    if unknown:
        raise ConfigError(
            f"{CONFIG_FILE_ENV}={path}: unknown keys {', '.join(unknown)}; "
            f"known: {', '.join(_BY_KEY)}"
        )
    values: dict[str, str] = {}
    for key, value in doc.items():
        if isinstance(value, bool):
            values[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            values[key] = str(value)
        else:
            raise ConfigError(
                f"{CONFIG_FILE_ENV}={path}: {key} must be a string, a number or a boolean"
            )
    return values


def load_config(
    env: Mapping[str, str] | None = None,
    *,
    read: Callable[[str], str] = _read_file,
    require_webhook: bool = True,
    require_namespace: bool = False,
) -> OperatorConfig:
    """Build the configuration from defaults, ``$TSNET2_OPERATOR_CONFIG`` and ``env``.

    ``env`` defaults to ``os.environ``. Raises :class:`ConfigError` naming the setting when a
    value is invalid, when ``control_url`` is unset, when only one of the control server's
    TLS files is set, (with ``require_webhook``) when the webhook certificate files are
    unset, or (with ``require_namespace``) when neither ``$TSNET2_NAMESPACE`` (or the file's
    ``namespace``) nor ``$POD_NAMESPACE`` names the store's namespace.
    """
    env = os.environ if env is None else env
    raw: dict[str, tuple[str, str]] = {}  # key -> (where it came from, value)
    path = env.get(CONFIG_FILE_ENV, "")
    if path:
        for key, value in _file_values(path, read).items():
            raw[key] = (f"{CONFIG_FILE_ENV}={path}: {key}", value)
    if "namespace" not in raw and env.get(POD_NAMESPACE_ENV):
        raw["namespace"] = (POD_NAMESPACE_ENV, env[POD_NAMESPACE_ENV])
    for f in FIELDS:
        if f.env in env:
            raw[f.key] = (f.env, env[f.env])
    sidecar_kw: dict[str, Any] = {}
    operator_kw: dict[str, Any] = {}
    for key, (where, value) in raw.items():
        f = _BY_KEY[key]
        (sidecar_kw if f.sidecar else operator_kw)[key] = f.parse(where, value)
    config = OperatorConfig(sidecar=SidecarConfig(**sidecar_kw), **operator_kw)
    if not config.sidecar.control_url:
        raise ConfigError("control_url is required: set TSNET2_CONTROL_URL (or the config file)")
    if require_webhook and not (config.webhook_cert_file and config.webhook_key_file):
        raise ConfigError(
            "the webhook needs a serving certificate: set TSNET2_WEBHOOK_CERT_FILE and "
            "TSNET2_WEBHOOK_KEY_FILE (the chart mounts them from a Secret)"
        )
    if bool(config.control_tls_cert_file) != bool(config.control_tls_key_file):
        raise ConfigError(
            "control server TLS: set both TSNET2_CONTROL_TLS_CERT_FILE and "
            "TSNET2_CONTROL_TLS_KEY_FILE, or neither (plain HTTP)"
        )
    if require_namespace and not config.namespace:
        raise ConfigError(
            f"namespace is required: set {NAMESPACE_ENV} (or {POD_NAMESPACE_ENV}, or the "
            "config file's namespace) to the namespace holding the tsnet2.io objects"
        )
    return config


def parse_server_version(major: str, minor: str) -> tuple[int, int]:
    """(major, minor) from the API server's ``/version``; tolerates ``"29+"`` style minors."""
    m_major = re.match(r"^\s*(\d+)", major or "")
    m_minor = re.match(r"^\s*(\d+)", minor or "")
    if not (m_major and m_minor):
        raise ConfigError(f"cannot parse the API server version major={major!r} minor={minor!r}")
    return int(m_major.group(1)), int(m_minor.group(1))


def resolve_native_sidecar(mode: NativeSidecarMode, server_version: tuple[int, int]) -> bool:
    """Whether to inject a native sidecar: ``on``/``off`` force it, ``auto`` checks >= 1.29."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return server_version >= NATIVE_SIDECAR_MIN_VERSION


def field_names() -> list[str]:
    """Names of every dataclass field that the table covers (used by a drift test)."""
    names = [f.name for f in fields(SidecarConfig)]
    names += [f.name for f in fields(OperatorConfig) if f.name != "sidecar"]
    return names
