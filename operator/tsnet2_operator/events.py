"""Kubernetes Events for injection decisions: what to attach them to and what they say.

At CREATE admission a pod made from ``generateName`` has no name yet (and no pod has a uid),
so an Event about it would point at nothing. We attach it to the pod when it has a name, else
to its controller (e.g. the ReplicaSet), the object a user is already looking at.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tsnet2_operator.inject import Decision

INJECTED = "Injected"
SKIPPED = "InjectionSkipped"
EPHEMERAL = "EphemeralContainerChecked"
# Pods that never asked, and ephemeral containers of pods we never injected: no Event, only
# the metric.
QUIET_REASONS = frozenset({"not_opted_in", "no_sidecar", "no_new_containers"})


def event_target(pod: Mapping[str, Any]) -> dict[str, str] | None:
    """An object reference for the Event, or None when there is nothing to attach it to."""
    meta = pod.get("metadata") or {}
    namespace = str(meta.get("namespace") or "")
    if meta.get("name"):
        ref = {"apiVersion": "v1", "kind": "Pod", "name": str(meta["name"]),
               "namespace": namespace}
        if meta.get("uid"):
            ref["uid"] = str(meta["uid"])
        return ref
    for owner in meta.get("ownerReferences") or []:
        if owner.get("controller") and owner.get("name") and owner.get("kind"):
            return {"apiVersion": str(owner.get("apiVersion", "")), "kind": str(owner["kind"]),
                    "name": str(owner["name"]), "uid": str(owner.get("uid", "")),
                    "namespace": namespace}
    return None


def describe(decision: Decision, pod: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(type, reason, message) for the Event about ``decision``, or None for quiet decisions.

    The type is ``Warning`` when a setting was stripped or an audit bypass waived.
    """
    if decision.result == "skipped" and decision.reason in QUIET_REASONS:
        return None
    meta = pod.get("metadata") or {}
    who = meta.get("name") or f"{meta.get('generateName') or ''}<new pod>"
    kind = "Warning" if decision.audit_bypass else "Normal"
    if decision.reason == "ephemeral_container":
        return kind, EPHEMERAL, f"pod {who}: {decision.message}"
    if decision.result == "injected":
        return kind, INJECTED, f"pod {who}: {decision.message}"
    return "Normal", SKIPPED, f"pod {who}: skipped ({decision.reason}): {decision.message}"
