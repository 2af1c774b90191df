"""Configuration loading, Event targets/messages and the metrics endpoint."""

from __future__ import annotations

import json
import urllib.request

import pytest
from tsnet2_operator.config import (
    FIELDS,
    ConfigError,
    field_names,
    load_config,
    parse_server_version,
    resolve_native_sidecar,
)
from tsnet2_operator.events import describe, event_target
from tsnet2_operator.inject import Decision
from tsnet2_operator.metrics import InjectorMetrics

BASE = {"TSNET2_CONTROL_URL": "http://control:8080",
        "TSNET2_WEBHOOK_CERT_FILE": "/c.pem", "TSNET2_WEBHOOK_KEY_FILE": "/k.pem"}


def test_every_field_has_one_env_var() -> None:
    assert sorted(f.key for f in FIELDS) == sorted(field_names())
    assert len({f.env for f in FIELDS}) == len(FIELDS)


def test_env_overrides_file_overrides_defaults() -> None:
    files = {"/etc/op.json": json.dumps({"image": "file:1", "backend": "kernel",
                                          "webhook_port": 8443})}
    cfg = load_config({**BASE, "TSNET2_OPERATOR_CONFIG": "/etc/op.json",
                       "TSNET2_SIDECAR_IMAGE": "env:2"}, read=files.__getitem__)
    assert cfg.sidecar.image == "env:2" and cfg.sidecar.backend == "kernel"
    assert cfg.webhook_port == 8443 and cfg.native_sidecar == "auto"


@pytest.mark.parametrize(("env", "needle"), [
    ({"TSNET2_BACKEND": "ebpf"}, "TSNET2_BACKEND: invalid value 'ebpf'; allowed: userspace"),
    ({"TSNET2_NATIVE_SIDECAR": "yes"}, "allowed: auto, on, off"),
    ({"TSNET2_WEBHOOK_PORT": "x"}, "not a port number"),
    ({"TSNET2_SIDECAR_MEMORY_REQUEST": "lots"}, "not a Kubernetes quantity"),
    ({"TSNET2_CONTROL_URL": ""}, "control_url is required"),
    ({"TSNET2_WEBHOOK_CERT_FILE": ""}, "TSNET2_WEBHOOK_CERT_FILE"),
])
def test_bad_settings_are_named(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config({**BASE, **env})


def test_config_file_unknown_key() -> None:
    with pytest.raises(ConfigError, match="unknown keys colour"):
        load_config({**BASE, "TSNET2_OPERATOR_CONFIG": "/f"},
                    read=lambda _: json.dumps({"colour": "red"}))


def test_native_sidecar_resolution() -> None:
    assert parse_server_version("1", "29+") == (1, 29)
    assert resolve_native_sidecar("auto", (1, 29)) is True
    assert resolve_native_sidecar("auto", (1, 28)) is False
    assert resolve_native_sidecar("on", (1, 20)) is True
    assert resolve_native_sidecar("off", (1, 33)) is False
    with pytest.raises(ConfigError):
        parse_server_version("", "x")


def test_event_target_pod_or_controller() -> None:
    named = {"metadata": {"name": "web", "namespace": "ns"}}
    assert event_target(named) == {"apiVersion": "v1", "kind": "Pod", "name": "web",
                                   "namespace": "ns"}
    owned = {"metadata": {"generateName": "web-", "namespace": "ns", "ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u",
         "controller": True}]}}
    assert event_target(owned) == {"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                   "name": "web-1", "uid": "u", "namespace": "ns"}
    assert event_target({"metadata": {"generateName": "x-", "namespace": "ns"}}) is None


def test_event_messages() -> None:
    p = {"metadata": {"name": "web"}}
    assert describe(Decision("skipped", "not_opted_in", "m"), p) is None
    assert describe(Decision("skipped", "host_network", "m"), p) == (
        "Normal", "InjectionSkipped", "pod web: skipped (host_network): m")
    assert describe(Decision("injected", "pod_annotation", "done"), p) == (
        "Normal", "Injected", "pod web: done")


def test_metrics_count_and_serve() -> None:
    m = InjectorMetrics()
    m.count("injected", "pod_annotation")
    m.count("injected", "pod_annotation")
    assert m.value("injected", "pod_annotation") == 2.0
    port = m.serve("127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        m.close()
    assert 'tsnet2_injector_requests_total{reason="pod_annotation",result="injected"} 2.0' \
        in text


def test_traffic_log_sink_setting() -> None:
    assert load_config(BASE).sidecar.traffic_log_sink == "stdout"
    for sink in ("stdout", "file", "both"):
        assert load_config({**BASE, "TSNET2_TRAFFIC_LOG_SINK": sink}
                           ).sidecar.traffic_log_sink == sink
    with pytest.raises(ConfigError, match="TSNET2_TRAFFIC_LOG_SINK: invalid value 'loki'; "
                                          "allowed: stdout, file, both"):
        load_config({**BASE, "TSNET2_TRAFFIC_LOG_SINK": "loki"})


def test_audit_bypass_policy_setting() -> None:
    assert load_config(BASE).sidecar.audit_bypass_policy == "refuse"
    assert load_config({**BASE, "TSNET2_AUDIT_BYPASS_POLICY": "strip"}
                       ).sidecar.audit_bypass_policy == "strip"
    with pytest.raises(ConfigError, match="TSNET2_AUDIT_BYPASS_POLICY: invalid value 'allow'"):
        load_config({**BASE, "TSNET2_AUDIT_BYPASS_POLICY": "allow"})


def test_egress_and_dns_settings() -> None:
    cfg = load_config(BASE).sidecar
    assert (cfg.egress_port, cfg.dns_upstream, cfg.dns_cluster_domain) == (
        1055, "", "cluster.local")
    cfg = load_config({**BASE, "TSNET2_EGRESS_PORT": "3128",
                       "TSNET2_DNS_UPSTREAM": " 10.96.0.10:53 ",
                       "TSNET2_DNS_CLUSTER_DOMAIN": "corp.example."}).sidecar
    assert (cfg.egress_port, cfg.dns_upstream, cfg.dns_cluster_domain) == (
        3128, "10.96.0.10:53", "corp.example")
    for upstream in ("10.96.0.10", "[fd00::a]", "[fd00::a]:5353", "fd00::a"):
        assert load_config({**BASE, "TSNET2_DNS_UPSTREAM": upstream}
                           ).sidecar.dns_upstream == upstream


@pytest.mark.parametrize(("env", "value", "needle"), [
    ("TSNET2_EGRESS_PORT", "0", "not a port to listen on"),
    ("TSNET2_EGRESS_PORT", "70000", "outside 0..65535"),
    ("TSNET2_DNS_UPSTREAM", "kube-dns.kube-system.svc", "not an IP address"),
    ("TSNET2_DNS_UPSTREAM", "10.96.0.10:0", "not an IP address"),
    ("TSNET2_DNS_UPSTREAM", "10.96.0.10:53 x", "not an IP address"),
    ("TSNET2_DNS_CLUSTER_DOMAIN", "Cluster_Local", "not a DNS domain"),
    ("TSNET2_DNS_CLUSTER_DOMAIN", "", "not a DNS domain"),
])
def test_bad_egress_and_dns_settings(env: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=f"{env}: .*{needle}"):
        load_config({**BASE, env: value})


@pytest.mark.parametrize(("env", "value"), [
    ("TSNET2_CONTROL_URL", "http://control:8080/\nX-Injected: 1"),
    ("TSNET2_CONTROL_URL", "http://control:8080 extra"),
    ("TSNET2_METRICS_ADDR", "0.0.0.0:9090\n0.0.0.0:1"),
    ("TSNET2_SIDECAR_CPU_REQUEST", "10m\n20m"),
])
def test_patterns_match_the_whole_value(env: str, value: str) -> None:
    """No validation pattern accepts a value by its first line (or prefix) alone."""
    with pytest.raises(ConfigError, match=env):
        load_config({**BASE, env: value})
    assert load_config({**BASE, "TSNET2_CONTROL_URL": "https://c.example:8443/base"}
                       ).sidecar.control_url == "https://c.example:8443/base"


def test_events_for_ephemeral_containers_and_audit_bypass() -> None:
    from tsnet2_operator.inject import Finding
    pod = {"metadata": {"name": "web", "namespace": "ns"}}
    quiet = Decision(result="skipped", reason="no_sidecar", message="")
    assert describe(quiet, pod) is None
    checked = Decision(result="injected", reason="ephemeral_container", message="m")
    assert describe(checked, pod) == ("Normal", "EphemeralContainerChecked", "pod web: m")
    stripped = Decision(result="injected", reason="namespace_label", message="m",
                        stripped=(Finding("app", "NET_ADMIN"),))
    assert describe(stripped, pod) == ("Warning", "Injected", "pod web: m")
