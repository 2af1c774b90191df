"""The coordination server inside the operator: Kubernetes store, TokenReview auth, GC.

:class:`ControlRuntime` owns one :class:`~tsnet2.control.server.ControlServer` over a
:class:`~tsnet2_operator.store.KubernetesStore`, authenticated by
:class:`~tsnet2_operator.auth.TokenReviewAuthenticator` (auth keys keep working for nodes
outside the cluster), plus the garbage collectors. :func:`register_handlers` wires it into a
kopf registry: the HTTP server starts at operator start-up in *every* replica (they share
the store, so any of them can serve a node), while the watch handlers (pod events: state
claims, removal of ephemeral nodes) run only in the replica that kopf peering lets
reconcile. A periodic sweep repairs whatever a missed event left behind.

Limitation: a node's *online* state is kept in the memory of the replica it polls (see
``tsnet2/control/server.py``). With several replicas, prefer a long ``ephemeral_timeout``
(the default here is one hour): nodes of pods are removed by the pod GC anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client as k8s

from tsnet2.control.authkeys import DEFAULT_DOMAIN
from tsnet2.control.ca import DEFAULT_CERT_LIFETIME
from tsnet2.control.server import ControlServer
from tsnet2_operator.auth import ANNOTATION_STATUS, TokenReviewAuthenticator
from tsnet2_operator.config import ConfigError, OperatorConfig
from tsnet2_operator.gc import NodeCollector, collect_pvcs
from tsnet2_operator.store import KubernetesStore
from tsnet2_operator.volumes import ensure_pvc, state_mode

log = logging.getLogger("tsnet2.operator.control")

OWNER_KINDS = (
    ("apps", "v1", "deployments"),
    ("apps", "v1", "statefulsets"),
    ("apps", "v1", "daemonsets"),
    ("apps", "v1", "replicasets"),
    ("batch", "v1", "jobs"),
)
"""Owners whose deletion triggers an immediate state-claim collection in their namespace."""


@dataclass(frozen=True)
class ControlSettings:
    """Configuration of the in-operator control server."""

    namespace: str
    """Namespace of the ``tsnet2.io`` objects (the operator's own)."""
    host: str = "0.0.0.0"
    port: int = 8440
    domain: str = DEFAULT_DOMAIN
    ephemeral_timeout: float = 3600.0
    sweep_interval: float = 10.0
    tls_cert: str | None = None
    tls_key: str | None = None
    cert_lifetime: float = DEFAULT_CERT_LIFETIME
    """Seconds a node certificate from the tailnet CA is valid (``cert_lifetime``)."""

    @classmethod
    def from_config(cls, config: OperatorConfig) -> ControlSettings:
        """The control server's part of the operator configuration (``TSNET2_NAMESPACE``,
        ``TSNET2_CONTROL_ADDR``, ``TSNET2_CONTROL_TLS_*``, ``TSNET2_DOMAIN``,
        ``TSNET2_EPHEMERAL_TIMEOUT``, ``TSNET2_SWEEP_INTERVAL``, ``TSNET2_CERT_LIFETIME``; see
        :mod:`tsnet2_operator.config`). Raises ConfigError without a namespace."""
        if not config.namespace:
            raise ConfigError("namespace is required: set TSNET2_NAMESPACE (or POD_NAMESPACE)")
        host, _, port = config.control_addr.rpartition(":")
        return cls(
            namespace=config.namespace,
            host=host.strip("[]") or "0.0.0.0",
            port=int(port),
            domain=config.domain,
            ephemeral_timeout=config.ephemeral_timeout,
            sweep_interval=config.sweep_interval,
            tls_cert=config.control_tls_cert_file or None,
            tls_key=config.control_tls_key_file or None,
            cert_lifetime=config.cert_lifetime,
        )


class ControlRuntime:
    """Control server + store + authenticator + collectors, started and closed together."""

    def __init__(self, api: k8s.ApiClient, settings: ControlSettings) -> None:
        """Build the parts; nothing runs until :meth:`start`."""
        self.api = api
        self.settings = settings
        self.store = KubernetesStore(api, settings.namespace)
        self.authenticator = TokenReviewAuthenticator(api, self.store)
        self.server = ControlServer(
            self.store,
            settings.domain,
            settings.ephemeral_timeout,
            authenticator=self.authenticator,
            cert_lifetime=settings.cert_lifetime,
        )
        self.nodes = NodeCollector(api, self.store)
        self._claimed: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Open the store, serve HTTP, start the periodic sweep; return the URL."""
        await self.store.open()
        url = await self.server.start(
            self.settings.host,
            self.settings.port,
            tls_cert=self.settings.tls_cert,
            tls_key=self.settings.tls_key,
        )
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="tsnet2-operator-gc")
        return url

    async def close(self) -> None:
        """Stop the sweep and the server, close the store. Idempotent."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await self.server.close()
        await self.store.close()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("operator GC sweep failed; retrying")

    async def sweep_once(self) -> None:
        """One pass of every collector."""
        await self.nodes.sweep()
        await asyncio.to_thread(collect_pvcs, self.api)
        await self.store.collect_orphan_claims()

    async def on_pod_event(self, event: dict[str, Any]) -> None:
        """A watch event of an injected pod: create its state claim, or clean up after it."""
        pod = event.get("object") or {}
        meta = pod.get("metadata") or {}
        uid = meta.get("uid")
        if not uid:
            return
        if event.get("type") == "DELETED":
            self._claimed.discard(uid)
            await self.nodes.pod_gone(uid)
            await asyncio.to_thread(collect_pvcs, self.api, meta.get("namespace"))
            return
        if uid in self._claimed or meta.get("deletionTimestamp"):
            return
        try:
            mode = state_mode(meta.get("annotations"))
        except ValueError as e:
            log.warning("pod %s/%s: %s", meta.get("namespace"), meta.get("name"), e)
            return
        if mode == "persistent":
            name, created = await asyncio.to_thread(ensure_pvc, self.api, pod)
            if created:
                log.info("created state claim %s/%s", meta.get("namespace"), name)
        self._claimed.add(uid)

    async def on_owner_deleted(self, namespace: str) -> None:
        """A workload was deleted: collect state claims in its namespace now."""
        await asyncio.to_thread(collect_pvcs, self.api, namespace)


async def start_control(param: ControlRuntime, **_: Any) -> None:
    """Start-up: open the store, serve the control API, start the sweep (store errors retry;
    a bind or TLS failure, which never fixes itself, stops the operator)."""
    runtime = param
    try:
        url = await runtime.start()
    except (OSError, ssl.SSLError, ValueError) as e:  # bind or TLS files: never fixes itself
        await runtime.close()
        raise kopf.PermanentError(
            f"tsnet2 control server cannot serve on {runtime.settings.host}:"
            f"{runtime.settings.port}: {e}"
        ) from e
    except BaseException:
        await runtime.close()  # a retried start begins from scratch
        raise
    log.info("tsnet2 control server on %s (store namespace %s)", url, runtime.settings.namespace)


async def stop_control(param: ControlRuntime, **_: Any) -> None:
    """Clean-up: stop the sweep and the server."""
    await param.close()


async def injected_pod_event(param: ControlRuntime, event: dict[str, Any], **_: Any) -> None:
    """A watch event of an injected pod (see :meth:`ControlRuntime.on_pod_event`)."""
    await param.on_pod_event(event)


async def owner_event(param: ControlRuntime, event: dict[str, Any], namespace: str | None,
                      **_: Any) -> None:
    """A watch event of a possible owner of state claims: on deletion, collect its namespace."""
    if event.get("type") == "DELETED" and namespace:
        await param.on_owner_deleted(namespace)


def register_handlers(registry: kopf.OperatorRegistry, runtime: ControlRuntime) -> None:
    """Register start-up/clean-up and the watch handlers in ``registry``, each with
    ``param=runtime`` (the handlers are the module-level functions above)."""
    # (The ignores: kopf's handler protocols declare ``param`` optional; ours always get one.)
    kopf.on.startup(registry=registry, backoff=5.0, param=runtime)(
        start_control)  # type: ignore[arg-type]
    kopf.on.cleanup(registry=registry, param=runtime)(stop_control)  # type: ignore[arg-type]
    on_pod = kopf.on.event("v1", "pods", annotations={ANNOTATION_STATUS: kopf.PRESENT},
                           registry=registry, param=runtime)
    on_pod(injected_pod_event)  # type: ignore[arg-type]
    for group, version, plural in OWNER_KINDS:
        on_owner = kopf.on.event(group, version, plural, registry=registry, param=runtime)
        on_owner(owner_event)  # type: ignore[arg-type]
