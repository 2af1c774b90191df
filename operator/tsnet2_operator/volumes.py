"""State volumes of injected pods: ``tsnet2.io/state: ephemeral`` (default) or ``persistent``.

Ephemeral state is an ``emptyDir`` (the injector adds it); the node is removed from the
tailnet when its pod goes (:mod:`tsnet2_operator.gc`). Persistent state is a
PersistentVolumeClaim per hostname, ``tsnet2-state-<hostname>``, created here when such a pod
appears and owned by the pod's top controller (a Deployment through its ReplicaSet, a
StatefulSet, a DaemonSet, a Job; a bare pod owns its own claim), so it lives as long as the
workload and is garbage-collected after it (by Kubernetes' garbage collector, and by
:func:`tsnet2_operator.gc.collect_pvcs` where there is none). The claim keeps the node's key
and credential, so a new pod of the same workload comes back as the same node; the control
server refuses a second *live* pod with the same identity (:mod:`tsnet2_operator.auth`).

Pure functions build names and manifests; :func:`ensure_pvc` is the one blocking call.
"""

from __future__ import annotations

from typing import Any, cast

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tsnet2.control.names import sanitize_hostname

ANNOTATION_STATE = "tsnet2.io/state"
ANNOTATION_HOSTNAME = "tsnet2.io/hostname"
ANNOTATION_STATE_SIZE = "tsnet2.io/state-size"
ANNOTATION_STATE_CLASS = "tsnet2.io/state-storage-class"
STATE_MODES = ("ephemeral", "persistent")
DEFAULT_SIZE = "16Mi"
"""Requested size of a state claim (keys, credential, a little metadata)."""
PVC_PREFIX = "tsnet2-state-"
LABEL_STATE_FOR = "tsnet2.io/state-for"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
MANAGER = "tsnet2-operator"
_TIMEOUT = 15.0


def state_mode(annotations: dict[str, str] | None) -> str:
    """``ephemeral`` or ``persistent`` from the annotations; ValueError for anything else."""
    mode = (annotations or {}).get(ANNOTATION_STATE, "ephemeral").strip().lower()
    if mode not in STATE_MODES:
        raise ValueError(
            f"{ANNOTATION_STATE}: {mode[:40]!r} is not one of {', '.join(STATE_MODES)}"
        )
    return mode


def hostname_of(name: str, annotations: dict[str, str] | None) -> str:
    """The tailnet hostname: ``tsnet2.io/hostname``, else the pod name, sanitized."""
    return sanitize_hostname((annotations or {}).get(ANNOTATION_HOSTNAME) or name)


def pvc_name(hostname: str) -> str:
    """``tsnet2-state-<hostname>`` (a valid object name: the hostname is a DNS label)."""
    return PVC_PREFIX + sanitize_hostname(hostname)


def controller_of(owner_references: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The owner reference with ``controller: true``, if any."""
    for ref in owner_references or []:
        if ref.get("controller"):
            return ref
    return None


def owner_ref(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    """An ownerReference (not a controller one: the claim is not managed by its owner)."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "blockOwnerDeletion": False,
    }


def pvc_manifest(
    namespace: str,
    hostname: str,
    owner: dict[str, Any],
    *,
    size: str = DEFAULT_SIZE,
    storage_class: str | None = None,
) -> dict[str, Any]:
    """The PersistentVolumeClaim of ``hostname``, owned by ``owner``."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    }
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": pvc_name(hostname),
            "namespace": namespace,
            "labels": {LABEL_MANAGED: MANAGER, LABEL_STATE_FOR: sanitize_hostname(hostname)},
            "ownerReferences": [owner],
        },
        "spec": spec,
    }


def _split(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _owners(refs: list[k8s.V1OwnerReference] | None) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": r.api_version,
            "kind": r.kind,
            "name": r.name,
            "uid": r.uid,
            "controller": bool(r.controller),
        }
        for r in refs or []
    ]


def read_object(
    api: k8s.ApiClient, api_version: str, kind: str, namespace: str, name: str
) -> dict[str, Any] | None:
    """GET a namespaced object's ``{"metadata": {"uid", "ownerReferences"}}``, or None if it
    does not exist (blocking). Kinds of the core group other than Pod and
    ReplicationController raise LookupError (they cannot own pods), as does an object the
    API server returns without metadata."""
    group, version = _split(api_version)
    try:
        if group:
            plural = kind.lower() + "s"  # ReplicaSet, StatefulSet, Deployment, Job, CronJob...
            obj = cast(
                dict[str, Any],
                k8s.CustomObjectsApi(api).get_namespaced_custom_object(
                    group, version, namespace, plural, name, _request_timeout=_TIMEOUT
                ),
            )
            meta = obj.get("metadata", {})
            return {
                "metadata": {"uid": meta.get("uid"), "ownerReferences": meta.get("ownerReferences")}
            }
        core = k8s.CoreV1Api(api)
        typed: k8s.V1Pod | k8s.V1ReplicationController
        if kind == "Pod":
            typed = core.read_namespaced_pod(name, namespace, _request_timeout=_TIMEOUT)
        elif kind == "ReplicationController":
            typed = core.read_namespaced_replication_controller(
                name, namespace, _request_timeout=_TIMEOUT
            )
        else:
            raise LookupError(f"cannot look up owner kind {api_version}/{kind}")
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    if typed.metadata is None:
        raise LookupError(
            f"{kind} {namespace}/{name}: the API server returned it without metadata")
    return {
        "metadata": {
            "uid": typed.metadata.uid,
            "ownerReferences": _owners(typed.metadata.owner_references),
        }
    }


def resolve_owner(api: k8s.ApiClient, pod: dict[str, Any]) -> dict[str, Any]:
    """The owner the pod's claim should have: its top controller (ReplicaSet → Deployment),
    or the pod itself when it has no controller (blocking)."""
    meta = pod["metadata"]
    namespace = meta["namespace"]
    ref = controller_of(meta.get("ownerReferences"))
    if ref is None:
        return owner_ref("v1", "Pod", meta["name"], meta["uid"])
    for _ in range(4):  # ReplicaSet -> Deployment, Job -> CronJob, ...
        obj = read_object(api, ref["apiVersion"], ref["kind"], namespace, ref["name"])
        if obj is None or obj["metadata"].get("uid") != ref["uid"]:
            break
        parent = controller_of(obj["metadata"].get("ownerReferences"))
        if parent is None:
            break
        ref = parent
    return owner_ref(ref["apiVersion"], ref["kind"], ref["name"], ref["uid"])


def ensure_pvc(api: k8s.ApiClient, pod: dict[str, Any]) -> tuple[str, bool]:
    """Make sure a ``persistent`` pod's claim exists; return ``(name, created)`` (blocking).

    An existing claim is kept; if it does not list the pod's owner yet (a new workload took
    over the hostname), the owner is added, so the claim lives until all owners are gone.
    """
    meta = pod["metadata"]
    annotations = meta.get("annotations") or {}
    hostname = hostname_of(meta["name"], annotations)
    owner = resolve_owner(api, pod)
    manifest = pvc_manifest(
        meta["namespace"],
        hostname,
        owner,
        size=annotations.get(ANNOTATION_STATE_SIZE) or DEFAULT_SIZE,
        storage_class=annotations.get(ANNOTATION_STATE_CLASS),
    )
    core = k8s.CoreV1Api(api)
    name = manifest["metadata"]["name"]
    body = k8s.V1PersistentVolumeClaim.from_dict(manifest)
    if body is None:  # from_dict returns None only for None
        raise AssertionError("unreachable: no claim from a manifest")
    try:
        core.create_namespaced_persistent_volume_claim(
            meta["namespace"],
            body,
            _request_timeout=_TIMEOUT,
        )
        return name, True
    except ApiException as e:
        if e.status != 409:
            raise
    existing = core.read_namespaced_persistent_volume_claim(
        name, meta["namespace"], _request_timeout=_TIMEOUT
    )
    if existing.metadata is None:
        raise LookupError(
            f"state claim {meta['namespace']}/{name}: the API server returned it without "
            "metadata")
    owners = existing.metadata.owner_references or []
    if not any(o.uid == owner["uid"] for o in owners):
        patch = {
            "metadata": {
                "resourceVersion": existing.metadata.resource_version,
                "ownerReferences": [*_owners(owners), owner],
            }
        }
        core.patch_namespaced_persistent_volume_claim(
            name, meta["namespace"], patch, _request_timeout=_TIMEOUT
        )
    return name, False
