"""The whole operator in one kopf registry: injector, control server, state volumes, GC.

:func:`build_operator_registry` puts into ONE :class:`kopf.OperatorRegistry` (an explicit
one, never kopf's global default registry), in this order (kopf runs start-up handlers one
after another in registration order):

1. ``install-crds`` (:func:`install_crds_at_startup`, when ``install_crds`` is on): the
   ``tsnet2.io`` CRDs and, with peering, kopf's ``ClusterKopfPeering`` CRD plus the peering
   object itself; else, with peering, ``ensure-peering`` (:func:`ensure_peering_at_startup`);
2. the injector (:func:`tsnet2_operator.handlers.register`): login, webhook server,
   ``/inject``, metrics;
3. the control runtime (:func:`tsnet2_operator.control.register_handlers`): the coordination
   server over the Kubernetes store with TokenReview auth and the periodic sweep, started by
   a start-up handler and stopped by a clean-up handler, plus the pod/owner watch handlers
   (state claims, removal of ephemeral nodes).

Activities (start-up, clean-up) and the admission webhook run in every replica; kopf peering
only pauses the watch handlers, so with ``--peering`` the webhook and the control server are
served by every replica and the watch handlers by one replica at a time.

Every handler is a module-level function that takes what it works on as kopf's ``param``
keyword argument (here a :class:`ClusterSetup`), so a test can call it directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import kopf
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tsnet2_operator.config import OperatorConfig
from tsnet2_operator.control import ControlRuntime, ControlSettings
from tsnet2_operator.control import register_handlers as register_control
from tsnet2_operator.handlers import Injector, kube_lookups
from tsnet2_operator.handlers import register as register_injector
from tsnet2_operator.metrics import InjectorMetrics
from tsnet2_operator.store import install_crds
from tsnet2_operator.webhook import KubeLookups, ListeningWebhookServer

PEERING_GROUP = "kopf.dev"
PEERING_PLURAL = "clusterkopfpeerings"
PEERING_CRD_NAME = f"{PEERING_PLURAL}.{PEERING_GROUP}"
_TIMEOUT = 15.0


def peering_crd() -> dict[str, Any]:
    """kopf's cluster-wide peering CRD (``ClusterKopfPeering``, ``kopf.dev/v1``)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": PEERING_CRD_NAME},
        "spec": {
            "scope": "Cluster",
            "group": PEERING_GROUP,
            "names": {
                "kind": "ClusterKopfPeering",
                "plural": PEERING_PLURAL,
                "singular": "clusterkopfpeering",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def install_peering(api: k8s.ApiClient, name: str, timeout: float = 30.0) -> None:
    """Create kopf's ``ClusterKopfPeering`` CRD and the peering object ``name`` unless they
    exist (blocking). Without the object kopf would keep every replica paused."""
    ext = k8s.ApiextensionsV1Api(api)
    try:
        ext.create_custom_resource_definition(cast(Any, peering_crd()), _request_timeout=_TIMEOUT)
    except ApiException as e:
        if e.status != 409:
            raise
    deadline = time.monotonic() + timeout
    while True:
        crd = ext.read_custom_resource_definition(PEERING_CRD_NAME, _request_timeout=_TIMEOUT)
        conditions = (crd.status.conditions if crd.status else None) or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"CRD {PEERING_CRD_NAME} not established after {timeout:.0f}s")
        time.sleep(0.1)
    ensure_peering_object(api, name)


def ensure_peering_object(api: k8s.ApiClient, name: str) -> None:
    """Create the ``ClusterKopfPeering`` object ``name`` unless it exists (blocking; its CRD
    must exist). Without it kopf keeps every replica paused."""
    body = {
        "apiVersion": f"{PEERING_GROUP}/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": name},
    }
    try:
        k8s.CustomObjectsApi(api).create_cluster_custom_object(
            PEERING_GROUP, "v1", PEERING_PLURAL, body, _request_timeout=_TIMEOUT
        )
    except ApiException as e:
        if e.status != 409:
            raise


@dataclass(frozen=True)
class ClusterSetup:
    """What the CRD and peering start-up handlers need (kopf passes it as ``param``)."""

    api: k8s.ApiClient
    peering: str | None = None
    """The kopf peering whose object must exist, if any."""


async def install_crds_at_startup(param: ClusterSetup, logger: kopf.Logger, **_: Any) -> None:
    """Create or update the CRDs (and, with peering, kopf's) before anything uses them."""
    await asyncio.to_thread(install_crds, param.api)
    if param.peering is not None:
        await asyncio.to_thread(install_peering, param.api, param.peering)
    logger.info(
        "tsnet2: CRDs installed%s",
        f" (with kopf peering {param.peering!r})" if param.peering is not None else "",
    )


async def ensure_peering_at_startup(param: ClusterSetup, logger: kopf.Logger, **_: Any) -> None:
    """The CRDs belong to someone else (the chart): still make sure the peering object exists,
    or every replica would stay paused. Without a peering there is nothing to do."""
    if param.peering is None:
        return
    await asyncio.to_thread(ensure_peering_object, param.api, param.peering)
    logger.info("tsnet2: kopf peering %r present", param.peering)


WEBHOOK_NOT_LISTENING = "the admission webhook server is not listening yet"


def gate_readiness(runtime: ControlRuntime) -> Callable[[ListeningWebhookServer], None]:
    """Make the control server's readiness (its /healthz, the readiness probe) wait for the
    admission webhook; return the callback that start-up tells the webhook server."""
    runtime.server.ready = lambda: WEBHOOK_NOT_LISTENING

    def gate(server: ListeningWebhookServer) -> None:
        runtime.server.ready = lambda: None if server.listening else WEBHOOK_NOT_LISTENING

    return gate


def build_operator_registry(
    config: OperatorConfig,
    api: k8s.ApiClient,
    *,
    peering: str | None = None,
    metrics: InjectorMetrics | None = None,
    lookups_factory: Callable[[], KubeLookups] | None = None,
) -> tuple[kopf.OperatorRegistry, ControlRuntime]:
    """One registry with every handler of the operator, and the control runtime it runs.

    ``api`` is used by the CRD installation and the control runtime (the caller closes it
    after kopf has stopped). ``peering`` names the kopf peering: its object is created at
    start-up if missing (and, with ``install_crds``, its CRD). Raises ConfigError without a
    namespace.
    """
    registry = kopf.OperatorRegistry()
    runtime = ControlRuntime(api, ControlSettings.from_config(config))
    setup = ClusterSetup(api, peering)
    # (The ignores: kopf's handler protocols declare ``param`` optional; ours always get one.)
    if config.install_crds:
        install = kopf.on.startup(registry=registry, id="install-crds", backoff=5.0, param=setup)
        install(install_crds_at_startup)  # type: ignore[arg-type]
    elif peering is not None:
        ensure = kopf.on.startup(registry=registry, id="ensure-peering", backoff=5.0, param=setup)
        ensure(ensure_peering_at_startup)  # type: ignore[arg-type]
    # The replica is Ready only once its admission webhook listens too.
    injector = Injector(
        config,
        metrics if metrics is not None else InjectorMetrics(),
        lookups_factory if lookups_factory is not None else kube_lookups,
        on_server=gate_readiness(runtime),
    )
    register_injector(registry, injector)
    register_control(registry, runtime)
    return registry, runtime
