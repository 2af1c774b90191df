"""The sidecars' monitoring in the chart: the PodMonitor scrapes the port the injector gives
the sidecar; every PromQL expression of the alerts and of the Grafana dashboard parses (the
real promtool, ``promtool check rules``) and names only metrics tsnet2d exports; names follow
Prometheus conventions."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonpatch  # type: ignore[import-untyped]
import pytest
import yaml

from tests.chart.conftest import CHART, Helm, by_kind, one
from tests.k8s.apiserver import default_bin_dir
from tests.require import needs
from tsnet2.daemon.metrics import Metrics

ON = ["--set", "sidecarMonitoring.podMonitor.enabled=true",
      "--set", "sidecarMonitoring.prometheusRule.enabled=true",
      "--set", "sidecarMonitoring.dashboard.enabled=true"]
# Grafana's variables, as a query would see them.
GRAFANA_VARS = {"$__rate_interval": "5m", "$namespace": ".*", "$pod": ".*"}
_IDENT = re.compile(r"\b(tsnet2_[a-z0-9_]+)\b")


def exported() -> dict[str, str]:
    """Every series name tsnet2d's /metrics can carry, with its metric's type."""
    out = {}
    for line in Metrics().render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            out[name] = kind
            if kind == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    out[name + suffix] = kind
    return out


@pytest.fixture(scope="module")
def objects(helm: Helm) -> list[dict[str, Any]]:
    """The chart rendered with the sidecar monitoring on."""
    return helm.template(*ON)


def _rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rule = one(objects, "PrometheusRule")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def _dashboard(objects: list[dict[str, Any]]) -> dict[str, Any]:
    cm = [o for o in by_kind(objects, "ConfigMap") if "tsnet2-sidecars.json" in o["data"]]
    assert len(cm) == 1
    assert cm[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    doc: dict[str, Any] = json.loads(cm[0]["data"]["tsnet2-sidecars.json"])
    assert doc == json.loads((CHART / "files" / "dashboard.json").read_text())
    return doc


def _dashboard_exprs(dash: dict[str, Any]) -> dict[str, str]:
    out = {}
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out[f"{panel['title']} / {target['refId']}"] = expr
    return out


def test_pod_monitor_scrapes_the_injected_port(objects: list[dict[str, Any]]) -> None:
    from tsnet2_operator.config import SidecarConfig
    from tsnet2_operator.inject import METRICS_PORT, inject

    pm = one(objects, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    # The port name the injector gives the sidecar.
    pod = {"metadata": {"name": "p", "namespace": "n", "annotations": {
        "tsnet2.io/inject": "enabled"}}, "spec": {"containers": [{"name": "app", "image": "a"}]}}
    config = SidecarConfig(image="i", control_url="http://c:1")
    patched = jsonpatch.apply_patch(pod, inject(pod, config, native_sidecar=True).patch)
    sidecar = next(c for c in patched["spec"]["initContainers"] if c["name"] == "tsnet2d")
    assert sidecar["ports"] == [{"name": endpoint["port"], "containerPort": METRICS_PORT,
                                 "protocol": "TCP"}]
    assert endpoint["path"] == "/metrics"


def test_every_expression_names_exported_metrics(objects: list[dict[str, Any]]) -> None:
    names = exported()
    exprs = {r["alert"]: r["expr"] for r in _rules(objects)}
    exprs.update(_dashboard_exprs(_dashboard(objects)))
    assert len(exprs) >= 15
    for where, expr in exprs.items():
        used = set(_IDENT.findall(expr))
        assert used, (where, expr)
        unknown = used - set(names)
        assert not unknown, f"{where}: {sorted(unknown)} are not exported by tsnet2d"
        for name in used:  # rate()/increase() only over counters and histogram series
            for fn in ("rate", "increase"):
                if re.search(rf"\b{fn}\(\s*{name}\b", expr):
                    assert names[name] in ("counter", "histogram"), (where, name)


def test_names_follow_prometheus_conventions(objects: list[dict[str, Any]]) -> None:
    for name, kind in exported().items():
        assert re.fullmatch(r"tsnet2_[a-z][a-z0-9_]*", name), name
        if kind == "counter":
            assert name.endswith("_total"), name
        elif kind == "gauge":
            assert not name.endswith("_total"), name
    for rule in _rules(objects):
        assert re.fullmatch(r"Tsnet2[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_expression_parses_with_promtool(objects: list[dict[str, Any]],
                                               tmp_path: Path) -> None:
    promtool = default_bin_dir() / "promtool"
    if not os.access(promtool, os.X_OK):
        pytest.skip(needs("k8s", f"promtool not built ({promtool} missing); run "
                                 "tests/k8s/build-tools.sh"))
    rules = _rules(objects)
    record = [{"record": f"tsnet2:dashboard_{i}", "expr": expr}
              for i, expr in enumerate(_dashboard_exprs(_dashboard(objects)).values())]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [
        {"name": "alerts", "rules": rules}, {"name": "dashboard", "rules": record}]}))
    proc = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules) + len(record)} rules found" in proc.stdout, proc.stdout
    # And promtool does fail on a broken expression (the check is real).
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "tsnet2:broken", "expr": "sum by (pod (tsnet2_node_up)"}]}]}))
    bad = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode != 0, bad.stdout
