"""Golden files: tests/operator/golden/<case>.yaml (input) -> <case>.patch.json (decision).

An input holds ``pod``, ``namespaceLabels``, ``nativeSidecar`` and optional ``config``
overrides of :class:`SidecarConfig`; an input with ``oldPod`` is a ``pods/ephemeralcontainers``
UPDATE instead (``pod`` the new object, run through :func:`check_ephemeral`; YAML anchors may
share the parts). The expected file holds the decision, patch included (or the rejection
message). ``pytest tests/operator --update-golden`` rewrites them; without
it a difference or a leftover expected file without input fails.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from tsnet2_operator.config import SidecarConfig
from tsnet2_operator.inject import InjectionRejected, check_ephemeral, inject

from tests.operator.podcheck import pod_problems

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.yaml"))
BASE = SidecarConfig(image="registry.example/tsnet2-sidecar:0.1.0",
                     control_url="http://tsnet2-control.tsnet2-system.svc:8080")


def _load(case: str) -> dict[str, Any]:
    doc = yaml.safe_load((GOLDEN / f"{case}.yaml").read_text(encoding="utf-8"))
    assert isinstance(doc, dict) and "pod" in doc, f"{case}.yaml needs a pod"
    return doc


def _config(doc: dict[str, Any]) -> SidecarConfig:
    from dataclasses import replace
    return replace(BASE, **(doc.get("config") or {}))


def _run(doc: dict[str, Any]) -> dict[str, Any]:
    try:
        if "oldPod" in doc:
            decision = check_ephemeral(doc["pod"], doc["oldPod"], _config(doc))
        else:
            decision = inject(doc["pod"], _config(doc),
                              native_sidecar=bool(doc["nativeSidecar"]),
                              namespace_labels=doc.get("namespaceLabels"))
    except InjectionRejected as exc:
        return {"result": "rejected", "reason": exc.reason, "message": str(exc)}
    return decision.to_json()


def test_cases_exist() -> None:
    """The matrix the issue asks for is all there."""
    wanted = {"plain", "multi-container", "init-containers", "existing-volumes-env",
              "plain-regular", "persistent-state", "host-network", "already-injected",
              "invalid-annotations", "refuse-capabilities", "strip", "allow-audit-bypass",
              "ephemeral-harmless", "ephemeral-ptrace", "ephemeral-strip"}
    assert wanted <= set(CASES)


def test_no_stale_golden(update_golden: bool) -> None:
    """Every expected file has an input; leftovers fail (or are deleted with the flag)."""
    orphans = sorted(p for p in GOLDEN.glob("*.patch.json")
                     if p.name.removesuffix(".patch.json") not in CASES)
    if update_golden:
        for path in orphans:
            path.unlink()
        return
    assert not orphans, f"stale golden files without input: {[p.name for p in orphans]}"


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, update_golden: bool) -> None:
    """The injector's decision for each input equals the stored one."""
    got = _run(_load(case))
    path = GOLDEN / f"{case}.patch.json"
    text = json.dumps(got, indent=2, sort_keys=True) + "\n"
    if update_golden:
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path.name} missing: run pytest tests/operator --update-golden"
    want = json.loads(path.read_text(encoding="utf-8"))
    assert got == want, f"{case}: output differs from {path.name} (refresh with --update-golden)"


@pytest.mark.parametrize("case", CASES)
def test_patch_gives_valid_pod_and_is_idempotent(case: str) -> None:
    """Applying the patch yields a valid pod; injecting that pod again adds nothing."""
    doc = _load(case)
    got = _run(doc)
    if got["result"] != "injected":
        assert "patch" not in got or got["patch"] == []
        return
    original = copy.deepcopy(doc["pod"])
    patched = jsonpatch.apply_patch(doc["pod"], got["patch"])
    assert doc["pod"] == original, "inject() must not modify its input"
    assert pod_problems(patched) == []
    assert pod_problems(original) == []
    if "oldPod" in doc:
        # Re-invoked (reinvocationPolicy IfNeeded) with our own patch applied: nothing to add.
        again = check_ephemeral(patched, doc["oldPod"], _config(doc))
        assert (again.result, again.patch, again.stripped) == ("injected", [], ())
        # Once stored, the container is no longer new.
        stored = check_ephemeral(patched, patched, _config(doc))
        assert (stored.result, stored.reason) == ("skipped", "no_new_containers")
        return
    again = inject(patched, _config(doc), native_sidecar=bool(doc["nativeSidecar"]),
                   namespace_labels=doc.get("namespaceLabels"))
    assert again.result == "skipped" and again.reason == "already_injected"
    assert again.patch == []
    # The status annotation records exactly what was added.
    status = json.loads(patched["metadata"]["annotations"]["tsnet2.io/status"])
    spec = patched["spec"]
    added_volumes = [v["name"] for v in spec["volumes"]][-len(status["volumes"]):]
    assert added_volumes == status["volumes"]
    inits = [c["name"] for c in spec.get("initContainers") or []]
    containers = [c["name"] for c in spec["containers"]]
    for name in status["initContainers"]:
        assert name in inits
    for name in status["containers"]:
        assert name in containers
