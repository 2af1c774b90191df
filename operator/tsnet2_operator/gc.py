"""Garbage collection: nodes of deleted ephemeral pods, state claims of deleted owners.

* **Ephemeral nodes.** A node registered by a pod (it has ``spec.pod``) with ephemeral state
  is removed from the store as soon as that pod is gone: at once on the pod's DELETED watch
  event (:meth:`NodeCollector.pod_gone`), and by the periodic :meth:`NodeCollector.sweep` for
  deletions the operator missed (it was down, or the watch was broken). Nodes with
  persistent state are kept: their identity lives in the claim and comes back with the next
  pod. (The control server's own sweeper would remove an offline ephemeral node too, but only
  after ``ephemeral_timeout``.)
* **State claims.** Kubernetes' garbage collector deletes a ``tsnet2-state-*`` claim once
  every owner in its ``ownerReferences`` is gone. :func:`collect_pvcs` does the same for
  claims labelled as ours, so it also happens where no garbage collector runs (a bare
  API server, as in the tests) and right after an owner goes.

Pure decisions (:func:`stale_pod_nodes`, :func:`orphaned`) + thin blocking/async drivers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tsnet2.control.store import NodeRecord
from tsnet2_operator.store import KubernetesStore, PodRef
from tsnet2_operator.volumes import LABEL_MANAGED, LABEL_STATE_FOR, MANAGER, read_object

log = logging.getLogger("tsnet2.operator.gc")
_TIMEOUT = 15.0


def stale_pod_nodes(
    nodes: Iterable[tuple[NodeRecord, PodRef]], live_pod_uids: set[str]
) -> list[NodeRecord]:
    """The ephemeral nodes whose pod is not among the live pods."""
    return [node for node, pod in nodes if node.ephemeral and pod.uid not in live_pod_uids]


def orphaned(owner_alive: Iterable[bool]) -> bool:
    """A claim is orphaned when it has owners and none of them exists any more."""
    states = list(owner_alive)
    return bool(states) and not any(states)


class NodeCollector:
    """Removes the tailnet nodes of ephemeral pods that are gone."""

    def __init__(self, api: k8s.ApiClient, store: KubernetesStore) -> None:
        """Use ``api`` to list pods and ``store`` for the nodes."""
        self.api = api
        self.store = store

    async def pod_gone(self, pod_uid: str) -> list[int]:
        """The pod with this uid was deleted: remove its ephemeral nodes; return their ids."""
        removed = []
        for node, pod in await self.store.nodes_of_pod(pod_uid):
            if node.ephemeral and await self.store.delete_node(node.id) is not None:
                log.info(
                    "removed node %d (%s) of deleted pod %s/%s",
                    node.id,
                    node.name,
                    pod.namespace,
                    pod.name,
                )
                removed.append(node.id)
        return removed

    def _live_pod_uids(self) -> set[str]:
        pods = k8s.CoreV1Api(self.api).list_pod_for_all_namespaces(_request_timeout=_TIMEOUT)
        return {
            p.metadata.uid
            for p in pods.items
            if p.metadata is not None
            and p.metadata.uid
            and (p.status is None or p.status.phase not in ("Succeeded", "Failed"))
        }

    async def sweep(self) -> list[int]:
        """Remove every ephemeral node whose pod no longer exists (or has finished).

        Pods are listed *after* the nodes, so a node registered after the pod list cannot be
        mistaken for one whose pod is gone.
        """
        nodes = await self.store.nodes_with_pods()
        live = await asyncio.to_thread(self._live_pod_uids)
        removed = []
        for node in stale_pod_nodes(nodes, live):
            if await self.store.delete_node(node.id) is not None:
                log.info("removed node %d (%s): its pod is gone", node.id, node.name)
                removed.append(node.id)
        return removed


def _owner_alive(api: k8s.ApiClient, namespace: str, ref: k8s.V1OwnerReference) -> bool:
    try:
        obj = read_object(api, ref.api_version, ref.kind, namespace, ref.name)
    except LookupError:
        return True  # a kind we cannot check: never delete on a guess
    return obj is not None and obj["metadata"].get("uid") == ref.uid


def collect_pvcs(api: k8s.ApiClient, namespace: str | None = None) -> list[str]:
    """Delete our state claims whose owners are all gone; return ``namespace/name`` of each
    (blocking). ``namespace=None`` looks in every namespace."""
    core = k8s.CoreV1Api(api)
    selector = f"{LABEL_MANAGED}={MANAGER},{LABEL_STATE_FOR}"
    if namespace is None:
        claims = core.list_persistent_volume_claim_for_all_namespaces(
            label_selector=selector, _request_timeout=_TIMEOUT
        )
    else:
        claims = core.list_namespaced_persistent_volume_claim(
            namespace, label_selector=selector, _request_timeout=_TIMEOUT
        )
    deleted = []
    for pvc in claims.items:
        meta = pvc.metadata
        if meta is None or meta.name is None or meta.namespace is None:
            continue
        if meta.deletion_timestamp is not None:  # already deleted, waiting for finalizers
            continue
        owners = meta.owner_references or []
        if not orphaned(_owner_alive(api, meta.namespace, ref) for ref in owners):
            continue
        try:
            core.delete_namespaced_persistent_volume_claim(
                meta.name,
                meta.namespace,
                body=k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(uid=meta.uid)),
                _request_timeout=_TIMEOUT,
            )
        except ApiException as e:
            if e.status in (404, 409):
                continue
            raise
        log.info("deleted state claim %s/%s: its owners are gone", meta.namespace, meta.name)
        deleted.append(f"{meta.namespace}/{meta.name}")
    return deleted
