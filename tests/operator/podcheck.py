"""Structural checks that a pod spec is one the API server would accept (the parts we touch).

The real API server validates stored pods in tests/k8s/test_webhook.py; this is the fast,
offline version used on every golden case.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_FIELD_PATHS = {"metadata.name", "metadata.namespace", "metadata.uid", "status.podIP"}


def pod_problems(pod: Mapping[str, Any]) -> list[str]:
    """Every problem found; empty when the pod looks valid."""
    problems: list[str] = []
    spec = pod.get("spec") or {}
    volumes = spec.get("volumes") or []
    names = [v.get("name") for v in volumes]
    if len(names) != len(set(names)):
        problems.append(f"duplicate volume names: {names}")
    for v in volumes:
        kinds = [k for k in v if k != "name"]
        if len(kinds) != 1:
            problems.append(f"volume {v.get('name')} has {len(kinds)} sources")
    containers = list(spec.get("containers") or [])
    inits = list(spec.get("initContainers") or [])
    ephemeral = list(spec.get("ephemeralContainers") or [])
    if not containers:
        problems.append("no containers")
    all_names = [c.get("name") for c in containers + inits + ephemeral]
    if len(all_names) != len(set(all_names)):
        problems.append(f"duplicate container names: {all_names}")
    for c in containers:
        if "restartPolicy" in c:
            problems.append(f"container {c.get('name')}: restartPolicy only exists on init")
    for c in inits:
        if c.get("restartPolicy") not in (None, "Always"):
            problems.append(f"init container {c.get('name')}: bad restartPolicy")
        if c.get("startupProbe") and c.get("restartPolicy") != "Always":
            problems.append(f"init container {c.get('name')}: probes need restartPolicy Always")
    for c in ephemeral:
        for key in ("ports", "resources", "startupProbe", "livenessProbe", "readinessProbe"):
            if key in c:
                problems.append(f"ephemeral container {c.get('name')}: {key} is not allowed")
    for c in containers + inits + ephemeral:
        cname = c.get("name")
        if not c.get("image"):
            problems.append(f"container {cname}: no image")
        mounts = c.get("volumeMounts") or []
        paths = [m.get("mountPath") for m in mounts]
        if len(paths) != len(set(paths)):
            problems.append(f"container {cname}: duplicate mountPath {paths}")
        for m in mounts:
            if m.get("name") not in names:
                problems.append(f"container {cname}: mount of unknown volume {m.get('name')}")
        env = c.get("env") or []
        env_names = [e.get("name") for e in env]
        if len(env_names) != len(set(env_names)):
            problems.append(f"container {cname}: duplicate env {env_names}")
        for e in env:
            ref = (e.get("valueFrom") or {}).get("fieldRef")
            if ref is not None and ref.get("fieldPath") not in _FIELD_PATHS:
                problems.append(f"container {cname}: unexpected fieldRef {ref}")
        caps = (c.get("securityContext") or {}).get("capabilities") or {}
        for key in ("add", "drop"):
            if not isinstance(caps.get(key, []), list):
                problems.append(f"container {cname}: capabilities.{key} is not a list")
        if set(caps.get("add") or []) & set(caps.get("drop") or []) - {"ALL"}:
            problems.append(f"container {cname}: a capability is both added and dropped")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            period = (c.get(probe) or {}).get("periodSeconds", 10)
            timeout = (c.get(probe) or {}).get("timeoutSeconds", 1)
            if probe in c and not 1 <= timeout <= period:
                problems.append(f"container {cname}: {probe} timeout {timeout} > period")
        ports = [p.get("name") for p in c.get("ports") or [] if p.get("name")]
        for p in ports:
            if len(p) > 15:
                problems.append(f"container {cname}: port name {p!r} longer than 15")
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    for key, value in annotations.items():
        if not isinstance(value, str):
            problems.append(f"annotation {key} is not a string")
    return problems
