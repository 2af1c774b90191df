"""A :class:`tsnet2.control.store.Store` kept in Kubernetes custom resources (``tsnet2.io``).

The API server (so etcd) holds the tailnet state, and several operator replicas can serve the
coordination API from it at once. Kubernetes has no multi-object transactions, so every
operation is built from steps that are each atomic on the API server, and every step that
must be exclusive uses one of two primitives:

* **name uniqueness** -- a ``TailnetClaim`` named ``ip-<offset>``, ``name-<node name>`` or
  ``key-<sha256(public key)>`` reserves one address, name or public key: the API server
  refuses a second object with the same name, so two replicas can never hand out the same
  address, name or key;
* **compare-and-swap** -- counters (``TailnetCounter``: netmap version, node/user/auth-key
  ids) and the consumption of a single-use ``TailnetAuthKey`` are updates with the
  ``resourceVersion`` read before, so a concurrent change makes one of them fail with 409
  and retry.

A failing :meth:`KubernetesStore.create_node` undoes the steps it already did (auth key
consumption, claims), so a refused registration leaves nothing behind. The netmap version is
bumped *after* the change is stored, so a reader that sees the new version also sees the
change. A replica that dies between steps can leave a claim without a node:
:meth:`KubernetesStore.collect_orphan_claims` (run by the operator's sweeper) removes them.
See docs/kubernetes-store.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar, cast

import yaml  # type: ignore[import-untyped]
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tsnet2.control import ipam
from tsnet2.control.names import name_candidates
from tsnet2.control.store import (
    AddressPoolExhaustedError,
    AuthKeyRecord,
    AuthKeyUsedError,
    CARecord,
    IPAllocation,
    NewNode,
    NodeRecord,
    PublicKeyInUseError,
    StoreError,
    UserRecord,
)

GROUP = "tsnet2.io"
"""API group of the tsnet2 custom resources."""
VERSION = "v1alpha1"
"""API version of the tsnet2 custom resources."""
API_VERSION = f"{GROUP}/{VERSION}"
NODES, USERS, AUTH_KEYS, CLAIMS, COUNTERS = (
    "tailnetnodes",
    "tailnetusers",
    "tailnetauthkeys",
    "tailnetclaims",
    "tailnetcounters",
)
PLURALS = (NODES, USERS, AUTH_KEYS, CLAIMS, COUNTERS)
"""Plural names of every custom resource the store uses."""
_KINDS = {
    NODES: "TailnetNode",
    USERS: "TailnetUser",
    AUTH_KEYS: "TailnetAuthKey",
    CLAIMS: "TailnetClaim",
    COUNTERS: "TailnetCounter",
}
LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_CREDENTIAL = "tsnet2.io/credential"
LABEL_POD_UID = "tsnet2.io/pod-uid"
LABEL_USER_ID = "tsnet2.io/user-id"
LABEL_AUTH_KEY_ID = "tsnet2.io/auth-key-id"
LABEL_CLAIM_KIND = "tsnet2.io/claim-kind"
LABEL_NODE_ID = "tsnet2.io/node-id"
ANNOTATION_TRAFFIC_LOG_KEY = "tsnet2.io/traffic-log-key"
"""The node's traffic-log public key, on its ``TailnetNode`` (absent: none). An annotation,
not a spec field: the CRD's structural schema would prune an unknown spec field on an API
server whose CRD predates it, and annotations survive any CRD version."""

CA_SECRET = "tsnet2-tailnet-ca"
"""The Secret (in the store's namespace) holding the tailnet CA: ``tls.key`` and ``tls.crt``
(type ``kubernetes.io/tls``). Created once, by whichever replica needs it first."""

_MAX_CONFLICT_RETRIES = 64
_MAX_NAME_TRIES = 1000
_TIMEOUT = 30.0

T = TypeVar("T")


class _AlreadyExists(Exception):
    pass


class _Conflict(Exception):
    pass


@dataclass(frozen=True)
class PodRef:
    """The pod a node runs in."""

    namespace: str
    name: str
    uid: str


def _hex(value: str, length: int = 40) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:length]


def _node_name(node_id: int) -> str:
    return f"n-{node_id}"


def _key_claim(public_key: str) -> str:
    return f"key-{_hex(public_key)}"


def _user_name(login: str) -> str:
    return f"u-{_hex(login)}"


def _num(value: Any) -> float | None:
    return float(value) if value is not None else None


def _user(spec: dict[str, Any]) -> UserRecord:
    return UserRecord(
        id=int(spec["id"]),
        login_name=str(spec["loginName"]),
        display_name=str(spec["displayName"]),
        created=float(spec["created"]),
    )


def _user_spec(user: UserRecord) -> dict[str, Any]:
    return {
        "id": user.id,
        "loginName": user.login_name,
        "displayName": user.display_name,
        "created": user.created,
    }


def _node(obj: dict[str, Any]) -> NodeRecord:
    spec = obj["spec"]
    return NodeRecord(
        id=int(spec["id"]),
        stable_id=str(spec["stableId"]),
        name=str(spec["name"]),
        public_key=str(spec["publicKey"]),
        credential_hash=str(spec["credentialHash"]),
        user=_user(spec["user"]),
        tags=tuple(spec.get("tags") or ()),
        ephemeral=bool(spec.get("ephemeral", False)),
        endpoints=tuple(spec.get("endpoints") or ()),
        ipv4=str(spec["ipv4"]),
        ipv6=str(spec["ipv6"]),
        created=float(spec["created"]),
        last_seen=_num(spec.get("lastSeen")),
        auth_key_id=int(spec["authKeyId"]) if spec.get("authKeyId") is not None else None,
        traffic_log_key=_traffic_log_key(obj),
    )


def _traffic_log_key(obj: dict[str, Any]) -> str | None:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(ANNOTATION_TRAFFIC_LOG_KEY)
    return str(value) if value else None


def _set_traffic_log_key(obj: dict[str, Any], key: str | None) -> None:
    """Set (or, for None/"", remove) the traffic-log key annotation of ``obj``."""
    metadata = obj.setdefault("metadata", {})
    annotations = metadata.get("annotations") or {}
    if key:
        annotations[ANNOTATION_TRAFFIC_LOG_KEY] = key
    else:
        annotations.pop(ANNOTATION_TRAFFIC_LOG_KEY, None)
    metadata["annotations"] = annotations


def node_pod(obj: dict[str, Any]) -> PodRef | None:
    """The pod reference of a ``TailnetNode`` object, if it has one."""
    pod = obj.get("spec", {}).get("pod")
    if not pod:
        return None
    return PodRef(str(pod["namespace"]), str(pod["name"]), str(pod["uid"]))


def _key(obj: dict[str, Any]) -> AuthKeyRecord:
    spec = obj["spec"]
    return AuthKeyRecord(
        id=int(spec["id"]),
        key_hash=str(spec["keyHash"]),
        user=_user(spec["user"]),
        reusable=bool(spec["reusable"]),
        ephemeral=bool(spec["ephemeral"]),
        tags=tuple(spec.get("tags") or ()),
        created=float(spec["created"]),
        expires=_num(spec.get("expires")),
        used_at=_num(spec.get("usedAt")),
        used_by=int(spec["usedBy"]) if spec.get("usedBy") is not None else None,
    )


def crd_manifests() -> list[dict[str, Any]]:
    """The CustomResourceDefinitions (parsed from the package's ``crds/*.yaml``)."""
    folder = resources.files("tsnet2_operator").joinpath("crds")
    docs: list[dict[str, Any]] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            docs.append(yaml.safe_load(entry.read_text(encoding="utf-8")))
    return docs


def install_crds(api: k8s.ApiClient, timeout: float = 30.0) -> None:
    """Create (or replace) the CRDs and wait until the API server serves them (blocking)."""
    ext = k8s.ApiextensionsV1Api(api)
    names = []
    for doc in crd_manifests():
        name = doc["metadata"]["name"]
        names.append(name)
        try:
            ext.create_custom_resource_definition(cast(Any, doc), _request_timeout=_TIMEOUT)
        except ApiException as e:
            if e.status != 409:
                raise
            current = ext.read_custom_resource_definition(name, _request_timeout=_TIMEOUT)
            if current.metadata is None:
                raise StoreError(
                    f"CRD {name}: the API server returned it without metadata") from None
            doc["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(name, cast(Any, doc), _request_timeout=_TIMEOUT)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            crd = ext.read_custom_resource_definition(name, _request_timeout=_TIMEOUT)
            conditions = (crd.status.conditions if crd.status else None) or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise StoreError(f"CRD {name} not established after {timeout:.0f}s")
            time.sleep(0.1)


class KubernetesStore:
    """Tailnet state as ``tsnet2.io/v1alpha1`` objects in one namespace.

    ``api`` is a configured :class:`kubernetes.client.ApiClient` (the caller owns and closes
    it); the CRDs must be installed (:func:`install_crds`, or the Helm chart). Calls run the
    synchronous client in worker threads.
    """

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        """Remember the client and namespace; nothing is contacted until :meth:`open`."""
        self.api = api
        self.namespace = namespace
        self._objects = k8s.CustomObjectsApi(api)
        self._core = k8s.CoreV1Api(api)
        self._open = False

    async def __aenter__(self) -> KubernetesStore:
        """Open the store."""
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the store."""
        await self.close()

    # -- plumbing (synchronous; run in threads) -----------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        if not self._open:
            raise StoreError(f"kubernetes store in namespace {self.namespace!r} is not open")
        try:
            return await asyncio.to_thread(fn)
        except ApiException as e:
            raise StoreError(
                f"kubernetes store {self.namespace}: API server answered {e.status} {e.reason}: "
                f"{_message(e)}"
            ) from e
        except OSError as e:  # urllib3 errors derive from OSError subclasses or wrap them
            raise StoreError(f"kubernetes store {self.namespace}: {e}") from e

    def _get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            obj = cast(
                dict[str, Any],
                self._objects.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, plural, name, _request_timeout=_TIMEOUT
                ),
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return obj

    def _list(self, plural: str, selector: str | None = None) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {"_request_timeout": _TIMEOUT}
        if selector:
            kwargs["label_selector"] = selector
        result = cast(
            dict[str, Any],
            self._objects.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, **kwargs
            ),
        )
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    def _create(
        self,
        plural: str,
        name: str,
        spec: dict[str, Any],
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": name,
            "labels": {LABEL_MANAGED: "tsnet2", **(labels or {})},
        }
        if annotations:
            metadata["annotations"] = dict(annotations)
        body = {
            "apiVersion": API_VERSION,
            "kind": _KINDS[plural],
            "metadata": metadata,
            "spec": spec,
        }
        try:
            obj = cast(
                dict[str, Any],
                self._objects.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, plural, body, _request_timeout=_TIMEOUT
                ),
            )
        except ApiException as e:
            if e.status == 409:
                raise _AlreadyExists(name) from None
            raise
        return obj

    def _replace(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Write ``obj`` back; its metadata.resourceVersion is the precondition."""
        try:
            new = cast(
                dict[str, Any],
                self._objects.replace_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    plural,
                    obj["metadata"]["name"],
                    obj,
                    _request_timeout=_TIMEOUT,
                ),
            )
        except ApiException as e:
            if e.status in (404, 409):
                raise _Conflict(obj["metadata"]["name"]) from None
            raise
        return new

    def _delete(self, plural: str, name: str, uid: str | None = None) -> bool:
        kwargs: dict[str, Any] = {"_request_timeout": _TIMEOUT}
        if uid is not None:
            kwargs["body"] = k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(uid=uid))
        try:
            self._objects.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, name, **kwargs
            )
        except ApiException as e:
            if e.status in (404, 409):
                return False
            raise
        return True

    def _counter_add(self, name: str) -> int:
        """Compare-and-swap ``counter += 1``; return the new value."""
        for _ in _attempts():
            obj = self._get(COUNTERS, name)
            if obj is None:
                try:
                    self._create(COUNTERS, name, {"value": 1})
                except _AlreadyExists:
                    continue
                return 1
            value = int(obj["spec"]["value"]) + 1
            obj["spec"]["value"] = value
            try:
                self._replace(COUNTERS, obj)
            except _Conflict:
                continue
            return value
        raise StoreError(f"counter {name}: too many concurrent updates; retry")

    def _counter(self, name: str) -> int:
        obj = self._get(COUNTERS, name)
        return int(obj["spec"]["value"]) if obj is not None else 0

    def _user_by_id(self, user_id: int) -> UserRecord:
        items = self._list(USERS, f"{LABEL_USER_ID}={user_id}")
        if not items:
            raise StoreError(f"no user with id {user_id}")
        return _user(items[0]["spec"])

    def _key_obj_by_id(self, key_id: int) -> dict[str, Any]:
        items = self._list(AUTH_KEYS, f"{LABEL_AUTH_KEY_ID}={key_id}")
        if not items:
            raise StoreError(f"no auth key with id {key_id}")
        return items[0]

    def _update_key(self, key_id: int, change: Callable[[dict[str, Any]], bool]) -> None:
        """Apply ``change`` to the key's spec with compare-and-swap; it returns False to stop."""
        for _ in _attempts():
            obj = self._key_obj_by_id(key_id)
            if not change(obj["spec"]):
                return
            try:
                self._replace(AUTH_KEYS, obj)
            except _Conflict:
                continue
            return
        raise StoreError(f"auth key {key_id}: too many concurrent updates; retry")

    def _claim(self, name: str, kind: str, value: str, node_id: int, **extra: Any) -> None:
        spec = {"kind": kind, "value": value, "nodeId": node_id, "created": time.time(), **extra}
        self._create(CLAIMS, name, spec, {LABEL_CLAIM_KIND: kind, LABEL_NODE_ID: str(node_id)})

    def _release(self, name: str, node_id: int) -> None:
        """Delete claim ``name`` if (and only if) it belongs to ``node_id``."""
        obj = self._get(CLAIMS, name)
        if obj is not None and int(obj["spec"]["nodeId"]) == node_id:
            self._delete(CLAIMS, name, uid=obj["metadata"]["uid"])

    def _release_node(self, node_id: int) -> None:
        self._delete(NODES, _node_name(node_id))

    # -- Store: lifecycle, version, users -------------------------------------------------

    async def open(self) -> None:
        """Check that the CRDs are served; idempotent."""
        if self._open:
            return
        self._open = True
        try:
            await self._run(lambda: self._list(COUNTERS))
        except StoreError as e:
            self._open = False
            raise StoreError(
                f"{e}; are the tsnet2.io CRDs installed and may this account use "
                f"namespace {self.namespace!r}?"
            ) from e

    async def close(self) -> None:
        """Mark the store closed (the caller closes the ApiClient). Idempotent."""
        self._open = False

    async def version(self) -> int:
        """The current netmap version."""
        return await self._run(lambda: self._counter("netmap-version"))

    async def bump_version(self) -> int:
        """Increase the netmap version and return it."""
        return await self._run(lambda: self._counter_add("netmap-version"))

    async def ensure_user(self, login_name: str, display_name: str) -> UserRecord:
        """Return the user ``login_name``, creating it if needed."""

        def run() -> UserRecord:
            name = _user_name(login_name)
            for _ in _attempts():
                obj = self._get(USERS, name)
                if obj is not None:
                    return _user(obj["spec"])
                user_id = self._counter_add("user-id")
                spec = {
                    "id": user_id,
                    "loginName": login_name,
                    "displayName": display_name,
                    "created": time.time(),
                }
                try:
                    return _user(
                        self._create(USERS, name, spec, {LABEL_USER_ID: str(user_id)})["spec"]
                    )
                except _AlreadyExists:
                    continue
            raise StoreError(f"user {login_name!r}: too many concurrent creations; retry")

        return await self._run(run)

    # -- Store: auth keys -----------------------------------------------------------------

    async def add_auth_key(
        self,
        key_hash: str,
        *,
        user_id: int,
        reusable: bool,
        ephemeral: bool,
        tags: tuple[str, ...],
        expires: float | None,
    ) -> AuthKeyRecord:
        """Store a new auth key by its hash."""

        def run() -> AuthKeyRecord:
            user = self._user_by_id(user_id)
            key_id = self._counter_add("auth-key-id")
            spec = {
                "id": key_id,
                "keyHash": key_hash,
                "user": _user_spec(user),
                "reusable": reusable,
                "ephemeral": ephemeral,
                "tags": list(tags),
                "created": time.time(),
                "expires": expires,
                "usedAt": None,
                "usedBy": None,
            }
            try:
                obj = self._create(
                    AUTH_KEYS, f"ak-{key_hash}", spec, {LABEL_AUTH_KEY_ID: str(key_id)}
                )
            except _AlreadyExists:
                raise StoreError("an auth key with this hash already exists") from None
            return _key(obj)

        return await self._run(run)

    async def get_auth_key(self, key_hash: str) -> AuthKeyRecord | None:
        """The auth key with this hash, or None."""
        if len(key_hash) != 64 or any(c not in "0123456789abcdef" for c in key_hash):
            return None

        def run() -> AuthKeyRecord | None:
            obj = self._get(AUTH_KEYS, f"ak-{key_hash}")
            return _key(obj) if obj is not None else None

        return await self._run(run)

    async def list_auth_keys(self) -> list[AuthKeyRecord]:
        """All auth keys, oldest first."""

        def run() -> list[AuthKeyRecord]:
            return sorted((_key(o) for o in self._list(AUTH_KEYS)), key=lambda k: k.id)

        return await self._run(run)

    # -- Store: nodes ---------------------------------------------------------------------

    async def create_node(self, spec: NewNode) -> tuple[NodeRecord, int]:
        """Create a node (see :meth:`tsnet2.control.store.Store.create_node`); undo on failure."""
        return await self._run(lambda: self._create_node(spec))

    def _create_node(self, spec: NewNode) -> tuple[NodeRecord, int]:
        undo: list[Callable[[], None]] = []
        now = time.time()
        try:
            user = self._user_by_id(spec.user_id)
            if spec.consume_auth_key:
                if spec.auth_key_id is None:
                    raise StoreError("consume_auth_key needs auth_key_id")
                key_id = spec.auth_key_id

                def consume(key: dict[str, Any]) -> bool:
                    if key.get("usedAt") is not None:
                        raise AuthKeyUsedError("auth key already used")
                    key["usedAt"] = now
                    return True

                def unconsume(key: dict[str, Any]) -> bool:
                    key["usedAt"] = key["usedBy"] = None
                    return True

                self._update_key(key_id, consume)
                undo.append(lambda: self._update_key(key_id, unconsume))
            node_id = self._counter_add("node-id")
            key_claim = _key_claim(spec.public_key)
            try:
                self._claim(key_claim, "key", spec.public_key, node_id)
            except _AlreadyExists:
                raise PublicKeyInUseError(
                    "public key is already registered to another node"
                ) from None
            undo.append(lambda: self._release(key_claim, node_id))
            name = self._claim_name(spec.hostname, node_id)
            undo.append(lambda: self._release(f"name-{name}", node_id))
            offset = self._claim_address(node_id)
            undo.append(lambda: self._release(f"ip-{offset}", node_id))
            v4, v6 = ipam.addresses(offset)
            node_spec: dict[str, Any] = {
                "id": node_id,
                "stableId": spec.stable_id,
                "name": name,
                "publicKey": spec.public_key,
                "credentialHash": spec.credential_hash,
                "user": _user_spec(user),
                "tags": list(spec.tags),
                "ephemeral": spec.ephemeral,
                "endpoints": list(spec.endpoints),
                "offset": offset,
                "ipv4": str(v4),
                "ipv6": str(v6),
                "created": now,
                "lastSeen": None,
                "authKeyId": spec.auth_key_id,
            }
            labels = {LABEL_CREDENTIAL: spec.credential_hash[:63], LABEL_USER_ID: str(user.id)}
            annotations = (
                {ANNOTATION_TRAFFIC_LOG_KEY: spec.traffic_log_key} if spec.traffic_log_key else {}
            )
            obj = self._create(NODES, _node_name(node_id), node_spec, labels, annotations)
            undo.append(lambda: self._release_node(node_id))
            if spec.consume_auth_key and spec.auth_key_id is not None:

                def mark(key: dict[str, Any]) -> bool:
                    key["usedBy"] = node_id
                    return True

                self._update_key(spec.auth_key_id, mark)
            version = self._counter_add("netmap-version")
        except BaseException:
            for step in reversed(undo):
                with contextlib.suppress(Exception):  # the orphan sweep removes leftovers
                    step()
            raise
        return _node(obj), version

    def _claim_name(self, hostname: str, node_id: int) -> str:
        for index, candidate in enumerate(name_candidates(hostname)):
            if index >= _MAX_NAME_TRIES:
                break
            try:
                self._claim(f"name-{candidate}", "name", candidate, node_id)
            except _AlreadyExists:
                continue
            return candidate
        raise StoreError(f"no free name for {hostname!r} after {_MAX_NAME_TRIES} tries")

    def _claim_address(self, node_id: int) -> int:
        for _ in _attempts():
            used = [int(c["spec"]["offset"]) for c in self._list(CLAIMS, f"{LABEL_CLAIM_KIND}=ip")]
            try:
                offset = ipam.first_free(used)
            except ipam.AddressPoolExhausted as e:
                raise AddressPoolExhaustedError(str(e)) from e
            v4, v6 = ipam.addresses(offset)
            try:
                self._claim(
                    f"ip-{offset}",
                    "ip",
                    str(v4),
                    node_id,
                    offset=offset,
                    ipv6=str(v6),
                    ipv4=str(v4),
                )
            except _AlreadyExists:
                continue
            return offset
        raise StoreError("address allocation: too many concurrent allocations; retry")

    async def get_node(self, node_id: int) -> NodeRecord | None:
        """The node with this id, or None."""

        def run() -> NodeRecord | None:
            obj = self._get(NODES, _node_name(node_id))
            return _node(obj) if obj is not None else None

        return await self._run(run)

    async def get_node_by_credential(self, credential_hash: str) -> NodeRecord | None:
        """The node with this credential hash, or None."""
        if len(credential_hash) != 64 or any(c not in "0123456789abcdef" for c in credential_hash):
            return None

        def run() -> NodeRecord | None:
            for obj in self._list(NODES, f"{LABEL_CREDENTIAL}={credential_hash[:63]}"):
                if obj["spec"]["credentialHash"] == credential_hash:
                    return _node(obj)
            return None

        return await self._run(run)

    async def list_nodes(self) -> list[NodeRecord]:
        """All nodes ordered by id."""
        return await self._run(
            lambda: sorted((_node(o) for o in self._list(NODES)), key=lambda n: n.id)
        )

    async def update_node(
        self,
        node_id: int,
        *,
        public_key: str | None = None,
        endpoints: tuple[str, ...] | None = None,
        last_seen: float | None = None,
        traffic_log_key: str | None = None,
    ) -> tuple[NodeRecord, int] | None:
        """Change the given fields with compare-and-swap, bumping the version on a change
        (``traffic_log_key=""`` removes the key)."""

        def run() -> tuple[NodeRecord, int] | None:
            for _ in _attempts():
                obj = self._get(NODES, _node_name(node_id))
                if obj is None:
                    return None
                node = _node(obj)
                spec = obj["spec"]
                changed = False
                new_claim: str | None = None
                if public_key is not None and public_key != node.public_key:
                    new_claim = _key_claim(public_key)
                    try:
                        self._claim(new_claim, "key", public_key, node_id)
                    except _AlreadyExists:
                        holder = self._get(CLAIMS, new_claim)
                        if holder is None or int(holder["spec"]["nodeId"]) != node_id:
                            raise PublicKeyInUseError(
                                "public key is already registered to another node"
                            ) from None
                    spec["publicKey"] = public_key
                    changed = True
                if endpoints is not None and tuple(endpoints) != node.endpoints:
                    spec["endpoints"] = list(endpoints)
                    changed = True
                if last_seen is not None and last_seen != node.last_seen:
                    spec["lastSeen"] = last_seen
                    changed = True
                if traffic_log_key is not None and (traffic_log_key or None) != (
                    node.traffic_log_key
                ):
                    _set_traffic_log_key(obj, traffic_log_key)
                    changed = True
                if not changed:
                    return node, self._counter("netmap-version")
                try:
                    updated = self._replace(NODES, obj)
                except _Conflict:
                    if new_claim is not None:
                        self._release(new_claim, node_id)
                    continue
                if new_claim is not None:
                    self._release(_key_claim(node.public_key), node_id)
                return _node(updated), self._counter_add("netmap-version")
            raise StoreError(f"node {node_id}: too many concurrent updates; retry")

        return await self._run(run)

    async def delete_node(self, node_id: int) -> int | None:
        """Delete a node and release its claims; return the new version or None."""

        def run() -> int | None:
            obj = self._get(NODES, _node_name(node_id))
            if obj is None:
                return None
            if not self._delete(NODES, _node_name(node_id), uid=obj["metadata"]["uid"]):
                return None
            node = _node(obj)
            for claim in self._list(CLAIMS, f"{LABEL_NODE_ID}={node_id}"):
                self._delete(CLAIMS, claim["metadata"]["name"], uid=claim["metadata"]["uid"])
            del node
            return self._counter_add("netmap-version")

        return await self._run(run)

    async def list_allocations(self) -> list[IPAllocation]:
        """All address allocations ordered by offset."""

        def run() -> list[IPAllocation]:
            claims = self._list(CLAIMS, f"{LABEL_CLAIM_KIND}=ip")
            allocations = [
                IPAllocation(
                    int(c["spec"]["offset"]),
                    str(c["spec"]["ipv4"]),
                    str(c["spec"]["ipv6"]),
                    int(c["spec"]["nodeId"]),
                )
                for c in claims
            ]
            return sorted(allocations, key=lambda a: a.offset)

        return await self._run(run)

    # -- Kubernetes extras (used by the operator) -----------------------------------------

    async def set_node_pod(self, node_id: int, pod: PodRef) -> bool:
        """Record the pod a node runs in (spec.pod and a pod-uid label); False if no node."""

        def run() -> bool:
            for _ in _attempts():
                obj = self._get(NODES, _node_name(node_id))
                if obj is None:
                    return False
                obj["spec"]["pod"] = {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid}
                obj["metadata"].setdefault("labels", {})[LABEL_POD_UID] = pod.uid
                try:
                    self._replace(NODES, obj)
                except _Conflict:
                    continue
                return True
            raise StoreError(f"node {node_id}: too many concurrent updates; retry")

        return await self._run(run)

    async def node_objects(self, selector: str | None = None) -> list[dict[str, Any]]:
        """The raw ``TailnetNode`` objects (optionally filtered by a label selector)."""
        return await self._run(lambda: self._list(NODES, selector))

    async def nodes_of_pod(self, pod_uid: str) -> list[tuple[NodeRecord, PodRef]]:
        """The nodes whose pod has this uid."""
        objs = await self.node_objects(f"{LABEL_POD_UID}={pod_uid}")
        out = []
        for obj in objs:
            ref = node_pod(obj)
            if ref is not None and ref.uid == pod_uid:
                out.append((_node(obj), ref))
        return out

    async def nodes_with_pods(self) -> list[tuple[NodeRecord, PodRef]]:
        """Every node that has a pod reference."""
        out = []
        for obj in await self.node_objects(LABEL_POD_UID):
            ref = node_pod(obj)
            if ref is not None:
                out.append((_node(obj), ref))
        return out

    async def collect_orphan_claims(self, min_age: float = 120.0) -> list[str]:
        """Delete claims older than ``min_age`` seconds whose node does not exist.

        Such claims are left only by a replica that died inside :meth:`create_node`. Returns
        the names deleted.
        """

        def run() -> list[str]:
            nodes = {int(o["spec"]["id"]) for o in self._list(NODES)}
            now = time.time()
            deleted = []
            for claim in self._list(CLAIMS):
                spec = claim["spec"]
                if int(spec["nodeId"]) in nodes or now - float(spec["created"]) < min_age:
                    continue
                # Re-check: the node may have been created since the list.
                if self._get(NODES, _node_name(int(spec["nodeId"]))) is not None:
                    continue
                if self._delete(CLAIMS, claim["metadata"]["name"], uid=claim["metadata"]["uid"]):
                    deleted.append(claim["metadata"]["name"])
            return deleted

        return await self._run(run)


    # -- Store: the tailnet CA (a Secret) ------------------------------------------------

    def _read_ca(self) -> CARecord | None:
        try:
            secret = self._core.read_namespaced_secret(
                CA_SECRET, self.namespace, _request_timeout=_TIMEOUT)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return _ca_record(secret.data or {})

    async def get_ca(self) -> CARecord | None:
        """The tailnet CA from Secret :data:`CA_SECRET`, or None if it does not exist."""
        return await self._run(self._read_ca)

    async def put_ca_if_absent(self, key_pem: str, cert_pem: str) -> CARecord:
        """Create Secret :data:`CA_SECRET` unless it exists; return the stored CA. Two
        replicas racing: the API server lets one create succeed, the other gets 409 and
        reads the winner's."""

        def run() -> CARecord:
            body = k8s.V1Secret(
                metadata=k8s.V1ObjectMeta(
                    name=CA_SECRET, labels={LABEL_MANAGED: "tsnet2"},
                    annotations={"tsnet2.io/what": "the tailnet CA; its key signs every "
                                 "node certificate"}),
                type="kubernetes.io/tls",
                data={"tls.key": _b64(key_pem), "tls.crt": _b64(cert_pem)},
            )
            try:
                secret = self._core.create_namespaced_secret(
                    self.namespace, body, _request_timeout=_TIMEOUT)
            except ApiException as e:
                if e.status != 409:
                    raise
                existing = self._read_ca()
                if existing is None:
                    raise StoreError(f"Secret {self.namespace}/{CA_SECRET} was reported to "
                                     "exist but cannot be read; retry") from None
                return existing
            return _ca_record(secret.data or {})

        return await self._run(run)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _ca_record(data: dict[str, Any]) -> CARecord:
    try:
        key_pem = base64.b64decode(data["tls.key"]).decode()
        cert_pem = base64.b64decode(data["tls.crt"]).decode()
    except (KeyError, ValueError) as e:
        raise StoreError(f"Secret {CA_SECRET} does not hold a tailnet CA (tls.key and "
                         f"tls.crt): {e!r}; delete it to create a new CA") from None
    return CARecord(key_pem=key_pem, cert_pem=cert_pem)


def _attempts() -> Iterator[int]:
    """Retry budget for compare-and-swap loops, with a short growing back-off."""
    for attempt in range(_MAX_CONFLICT_RETRIES):
        if attempt:
            time.sleep(min(0.2, 0.005 * attempt))
        yield attempt


def _message(e: ApiException) -> str:
    try:
        body = json.loads(e.body or "{}")
    except (TypeError, ValueError):
        return str(e.body)[:200]
    return str(body.get("message", ""))[:300] if isinstance(body, dict) else str(body)[:200]
