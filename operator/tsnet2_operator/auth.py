"""Registration with the pod's projected ServiceAccount token, verified by TokenReview.

A sidecar registers with ``Authorization: Bearer <token>`` where the token is the pod's
projected ServiceAccount token with audience ``tsnet2``. :class:`TokenReviewAuthenticator`
(an :class:`tsnet2.control.api.Authenticator`) accepts it only if

1. TokenReview (audience ``tsnet2``) authenticates it as ``system:serviceaccount:<ns>:<sa>``
   and it is bound to a pod (``authentication.kubernetes.io/pod-name`` / ``pod-uid`` in the
   extra info) -- the API server also refuses a bound token once its pod is gone;
2. that pod exists with that uid, runs as that ServiceAccount and carries the injection
   status annotation ``tsnet2.io/status``;
3. the requested hostname is the pod's (``tsnet2.io/hostname``, else the pod name,
   sanitized like every node name), and requested tags are in ``tsnet2.io/tags``;
4. no other *live* pod runs this identity: if a node with that name belongs to another pod
   that still exists, the registration is refused (409) and a Warning Event is put on the
   refused pod. A node left by a pod that is gone is replaced (ephemeral) or taken over with
   its node credential (persistent state). A name held by a node outside the cluster (auth
   key) is refused too: a pod is never silently renamed.

The node's user is ``system:serviceaccount:<ns>:<sa>``; pods are ephemeral nodes unless
``tsnet2.io/state: persistent``. After registration the node records its pod
(``spec.pod`` of the ``TailnetNode``), which the garbage collector uses.

RBAC: ``create`` tokenreviews, ``get`` pods, ``create`` events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
from dataclasses import dataclass

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tsnet2.control.api import AuthenticationError, Identity, RegisterRequest
from tsnet2.control.names import parse_tags, sanitize_hostname
from tsnet2.control.store import NodeRecord
from tsnet2_operator.store import KubernetesStore, PodRef, node_pod

log = logging.getLogger("tsnet2.operator.auth")

AUDIENCE = "tsnet2"
"""Audience of the projected ServiceAccount token the sidecar presents."""
ANNOTATION_STATUS = "tsnet2.io/status"
ANNOTATION_HOSTNAME = "tsnet2.io/hostname"
ANNOTATION_TAGS = "tsnet2.io/tags"
ANNOTATION_STATE = "tsnet2.io/state"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
_SA_PREFIX = "system:serviceaccount:"
_TIMEOUT = 15.0


@dataclass(frozen=True)
class TokenSubject:
    """What TokenReview says about a token: its ServiceAccount and bound pod."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str

    @property
    def username(self) -> str:
        """``system:serviceaccount:<ns>:<sa>``."""
        return f"{_SA_PREFIX}{self.namespace}:{self.service_account}"


def subject_from_review(status: k8s.V1TokenReviewStatus | None, audience: str) -> TokenSubject:
    """Turn a TokenReview status into a :class:`TokenSubject` or raise AuthenticationError."""
    if status is None or not status.authenticated:
        reason = (status.error if status is not None else None) or "not authenticated"
        raise AuthenticationError(
            f"ServiceAccount token refused by TokenReview: {reason} (send the pod's projected "
            f"token with audience {audience!r}; it must be unexpired and its pod must exist)"
        )
    if audience not in (status.audiences or []):
        raise AuthenticationError(f"token is not valid for audience {audience!r}")
    user = status.user
    username = (user.username if user is not None else None) or ""
    if not username.startswith(_SA_PREFIX) or username.count(":") != 3:
        raise AuthenticationError(f"token user {username!r} is not a ServiceAccount")
    namespace, service_account = username[len(_SA_PREFIX) :].split(":")
    extra: dict[str, list[str]] = (user.extra if user is not None else None) or {}
    pod_name = (extra.get(EXTRA_POD_NAME) or [""])[0]
    pod_uid = (extra.get(EXTRA_POD_UID) or [""])[0]
    if not pod_name or not pod_uid:
        raise AuthenticationError(
            "token is not bound to a pod: mount the projected ServiceAccount token "
            f"(audience {audience!r}) into the sidecar instead of a Secret-based token"
        )
    return TokenSubject(namespace, service_account, pod_name, pod_uid)


def pod_metadata(pod: k8s.V1Pod) -> k8s.V1ObjectMeta:
    """The pod's metadata. The client's model allows none, but the API server always sends
    it: without it, raise AuthenticationError (503, the node retries)."""
    if pod.metadata is None:
        raise AuthenticationError(
            "the API server returned a pod without metadata; cannot check the token's pod, "
            "retry", status=503)
    return pod.metadata


def pod_hostname(pod: k8s.V1Pod) -> str:
    """The tailnet hostname of a pod: ``tsnet2.io/hostname``, else the pod name, sanitized."""
    meta = pod_metadata(pod)
    raw = (meta.annotations or {}).get(ANNOTATION_HOSTNAME) or meta.name or ""
    return sanitize_hostname(raw)


def pod_tags(pod: k8s.V1Pod) -> tuple[str, ...]:
    """The tags a pod may use (``tsnet2.io/tags``: comma-separated ``tag:x``)."""
    raw = (pod_metadata(pod).annotations or {}).get(ANNOTATION_TAGS, "")
    return parse_tags(t.strip() for t in raw.split(",") if t.strip())


def pod_is_persistent(pod: k8s.V1Pod) -> bool:
    """True if the pod asked for ``tsnet2.io/state: persistent``."""
    annotations = pod_metadata(pod).annotations or {}
    return annotations.get(ANNOTATION_STATE, "ephemeral") == "persistent"


def check_pod(pod: k8s.V1Pod, subject: TokenSubject, request: RegisterRequest) -> None:
    """Check the token's pod against the registration; raise AuthenticationError if wrong."""
    meta, spec = pod_metadata(pod), pod.spec
    where = f"pod {subject.namespace}/{subject.pod_name}"
    if meta.uid != subject.pod_uid:
        raise AuthenticationError(f"{where} was replaced (uid differs from the token's)")
    sa = (spec.service_account_name if spec is not None else None) or "default"
    if sa != subject.service_account:
        raise AuthenticationError(f"{where} runs as ServiceAccount {sa!r}, not the token's")
    if ANNOTATION_STATUS not in (meta.annotations or {}):
        raise AuthenticationError(
            f"{where} has no {ANNOTATION_STATUS} annotation: it was not injected by tsnet2",
            status=403,
        )
    try:
        expected = pod_hostname(pod)
    except ValueError as e:
        raise AuthenticationError(f"{where}: {e}", status=403) from None
    if request.hostname != expected:
        raise AuthenticationError(
            f"hostname {request.hostname!r} does not match {where}, whose hostname is "
            f"{expected!r} ({ANNOTATION_HOSTNAME} annotation, else the pod name)",
            status=403,
        )
    try:
        allowed = pod_tags(pod)
    except ValueError as e:
        raise AuthenticationError(f"{where}: {ANNOTATION_TAGS}: {e}", status=403) from None
    for tag in request.tags:
        if tag not in allowed:
            raise AuthenticationError(
                f"tag {tag!r} is not in {where}'s {ANNOTATION_TAGS} annotation", status=403
            )


class TokenReviewAuthenticator:
    """Authenticates sidecars by their ServiceAccount token (see the module docstring)."""

    def __init__(
        self, api: k8s.ApiClient, store: KubernetesStore, *, audience: str = AUDIENCE
    ) -> None:
        """Use ``api`` for TokenReview, pods and events; ``store`` for the nodes."""
        self.api = api
        self.store = store
        self.audience = audience
        self._auth = k8s.AuthenticationV1Api(api)
        self._core = k8s.CoreV1Api(api)

    # -- Kubernetes calls (blocking, run in threads) ----------------------------------------

    def _review(self, token: str) -> k8s.V1TokenReviewStatus | None:
        review = k8s.V1TokenReview(
            spec=k8s.V1TokenReviewSpec(token=token, audiences=[self.audience])
        )
        result = self._auth.create_token_review(review, _request_timeout=_TIMEOUT)
        status: k8s.V1TokenReviewStatus | None = result.status
        return status

    def _pod(self, namespace: str, name: str) -> k8s.V1Pod | None:
        try:
            pod: k8s.V1Pod = self._core.read_namespaced_pod(
                name, namespace, _request_timeout=_TIMEOUT
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return pod

    def _pod_alive(self, ref: PodRef) -> bool:
        """True if the pod still exists with this uid and has not finished."""
        pod = self._pod(ref.namespace, ref.name)
        if pod is None or pod.metadata is None or pod.metadata.uid != ref.uid:
            return False
        phase = pod.status.phase if pod.status is not None else None
        return phase not in ("Succeeded", "Failed")

    def event(self, pod: PodRef, reason: str, message: str, *, warning: bool = True) -> None:
        """Record a core/v1 Event on ``pod`` (blocking; errors are logged, never raised)."""
        now = dt.datetime.now(dt.UTC)
        body = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(
                name=f"{pod.name}.tsnet2.{secrets.token_hex(6)}", namespace=pod.namespace
            ),
            involved_object=k8s.V1ObjectReference(
                api_version="v1", kind="Pod", name=pod.name, namespace=pod.namespace, uid=pod.uid
            ),
            reason=reason,
            message=message[:1024],
            type="Warning" if warning else "Normal",
            source=k8s.V1EventSource(component="tsnet2-operator"),
            reporting_component="tsnet2.io/operator",
            reporting_instance="tsnet2-operator",
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self._core.create_namespaced_event(pod.namespace, body, _request_timeout=_TIMEOUT)
        except (ApiException, OSError) as e:
            log.warning(
                "cannot record event %s on pod %s/%s: %s", reason, pod.namespace, pod.name, e
            )

    # -- Authenticator ----------------------------------------------------------------------

    async def authenticate(
        self, token: str, request: RegisterRequest, existing: NodeRecord | None
    ) -> Identity:
        """Verify the token and the pod, and that no other live pod has this identity."""
        try:
            status = await asyncio.to_thread(self._review, token)
        except (ApiException, OSError) as e:
            log.warning("TokenReview failed: %s", e)
            raise AuthenticationError(
                "cannot verify the token now (TokenReview failed); retry", status=503
            ) from None
        subject = subject_from_review(status, self.audience)
        ref = PodRef(subject.namespace, subject.pod_name, subject.pod_uid)
        pod = await asyncio.to_thread(self._pod, subject.namespace, subject.pod_name)
        if pod is None:
            raise AuthenticationError(
                f"pod {subject.namespace}/{subject.pod_name} named in the token does not exist"
            )
        try:
            check_pod(pod, subject, request)
            await self._check_identity(ref, request.hostname, existing)
        except AuthenticationError as e:
            await asyncio.to_thread(self.event, ref, "TailnetRegistrationRefused", e.message)
            raise
        return Identity(
            login_name=subject.username,
            display_name=subject.service_account,
            tags=pod_tags(pod),
            ephemeral=not pod_is_persistent(pod),
            exact_name=True,
            subject=f"{ref.namespace}/{ref.name}/{ref.uid}",
        )

    async def _check_identity(
        self, ref: PodRef, hostname: str, existing: NodeRecord | None
    ) -> None:
        if existing is not None and existing.name != hostname:
            raise AuthenticationError(
                f"the node credential belongs to node {existing.name!r}, not {hostname!r}",
                status=409,
            )
        holders = [
            (obj, node_pod(obj))
            for obj in await self.store.node_objects()
            if obj["spec"]["name"] == hostname
        ]
        for obj, holder in holders:
            node_id = int(obj["spec"]["id"])
            if holder is None:
                raise AuthenticationError(
                    f"hostname {hostname!r} is taken by node {node_id}, registered outside "
                    "the cluster; remove it or choose another hostname",
                    status=409,
                )
            if holder.uid == ref.uid:
                if existing is None:  # this pod lost its credential: start over
                    await self.store.delete_node(node_id)
                continue
            if await asyncio.to_thread(self._pod_alive, holder):
                raise AuthenticationError(
                    f"hostname {hostname!r} is in use by live pod {holder.namespace}/"
                    f"{holder.name} (node {node_id}); two pods never run one tailnet identity. "
                    "Registration is retried; it succeeds once that pod is gone",
                    status=409,
                )
            if existing is None or existing.id != node_id:
                log.info(
                    "replacing node %d of gone pod %s/%s", node_id, holder.namespace, holder.name
                )
                await self.store.delete_node(node_id)

    async def registered(self, identity: Identity, node: NodeRecord) -> None:
        """Record the pod on the node and put a Normal Event on the pod."""
        namespace, name, uid = identity.subject.split("/")
        ref = PodRef(namespace, name, uid)
        await self.store.set_node_pod(node.id, ref)
        await asyncio.to_thread(
            self.event,
            ref,
            "TailnetNodeRegistered",
            f"registered as {node.name} ({node.ipv4}, node {node.id})",
            warning=False,
        )
