"""The kopf layer: wiring only. Decisions live in :mod:`tsnet2_operator.inject`.

The handlers are module-level functions; :func:`register` puts them into an explicit
:class:`kopf.OperatorRegistry` (never kopf's global default one) and gives each the
:class:`Injector` they share as kopf's ``param`` keyword argument, so a test can import a
handler and call it with an :class:`Injector` of its own (``await mutate_pod(param=...,
body=..., ...)``). The handlers:

* :func:`login` (in a pod the service account, else ``$KUBECONFIG``);
* :func:`start_injector`, a start-up handler that sets kopf's webhook server (HTTPS,
  certificate files from the config), leaves ``settings.admission.managed`` unset (the chart
  owns the MutatingWebhookConfiguration), decides native vs regular sidecars, looks up the
  cluster DNS Service once when ``dns_upstream`` is unset (for ``tsnet2.io/dns``) and starts
  ``/metrics``;
* :func:`mutate_pod`, ``@kopf.on.mutate('pods', operations=['CREATE'], id='inject')``, served
  at ``/inject``: calls :func:`~tsnet2_operator.inject.inject`, applies its patch, emits the
  Event and counts ``tsnet2_injector_requests_total``;
* :func:`mutate_ephemeral`, ``@kopf.on.mutate('pods', subresource='ephemeralcontainers',
  operations=['UPDATE'], id='ephemeral')``, served at ``/ephemeral``: ephemeral containers
  added to an injected pod (``kubectl debug``) get the same audit-boundary rules
  (:func:`~tsnet2_operator.inject.check_ephemeral`). kopf routes a request by the URL's
  handler id and then matches the request's ``subResource`` exactly (it does not filter on
  the operation; the handler does), so this needs its own handler and path;
* :func:`stop_injector`, a clean-up handler that closes the API client and the metrics
  endpoint.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, cast

import jsonpatch
import kopf

from tsnet2_operator.config import OperatorConfig, resolve_native_sidecar
from tsnet2_operator.events import describe, event_target
from tsnet2_operator.inject import (
    Decision,
    InjectionRejected,
    check_ephemeral,
    inject,
    wants_namespace_labels,
)
from tsnet2_operator.metrics import InjectorMetrics
from tsnet2_operator.webhook import (
    KubeLookupError,
    KubeLookups,
    ListeningWebhookServer,
    load_api_client,
    make_server,
)

HANDLER_ID = "inject"  # kopf serves this handler at https://<addr>:<port>/inject
EPHEMERAL_HANDLER_ID = "ephemeral"  # ... and this one at /ephemeral
REPORTING_COMPONENT = "tsnet2-operator"


def kube_lookups() -> KubeLookups:
    """The API reads of a running operator: credentials from the pod, else ``$KUBECONFIG``."""
    return KubeLookups(load_api_client())


@dataclass
class Injector:
    """What the injector's handlers share (kopf passes it to each as ``param``): the
    configuration and counters, how start-up reaches the API, and what start-up learns."""

    config: OperatorConfig
    metrics: InjectorMetrics = field(default_factory=InjectorMetrics)
    lookups_factory: Callable[[], KubeLookups] = kube_lookups
    """Called (in a thread) by :func:`start_injector`."""
    on_server: Callable[[ListeningWebhookServer], None] | None = None
    """Told the webhook server when start-up makes it (readiness gating)."""
    lookups: KubeLookups | None = None
    """Set by :func:`start_injector`; ``None`` until then and after :func:`stop_injector`."""
    native_sidecar: bool | None = None
    """Decided by :func:`start_injector`."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    """Events being posted in the background."""


async def _logged(post: Coroutine[Any, Any, None], logger: kopf.Logger) -> None:
    """Await ``post``; an Event that cannot be posted is logged, never raised."""
    try:
        await post
    except KubeLookupError as exc:
        logger.warning("tsnet2 injector: %s", exc)


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the service account (via the client library); else ``$KUBECONFIG``.

    (The client library reads ``$KUBECONFIG`` once at import, so outside a pod kopf's own
    kubeconfig reader, which reads it now, is used.)
    """
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return kopf.login_via_client(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


async def start_injector(param: Injector, settings: kopf.OperatorSettings, logger: kopf.Logger,
                         **_: Any) -> None:
    """Webhook server, unmanaged webhook configuration, sidecar mode, metrics."""
    injector, config = param, param.config
    server = make_server(config)
    settings.admission.server = server
    if injector.on_server is not None:
        injector.on_server(server)
    settings.admission.managed = None
    settings.posting.reporting_component = REPORTING_COMPONENT
    lookups = injector.lookups = await asyncio.to_thread(injector.lookups_factory)
    version = (0, 0)
    if config.native_sidecar == "auto":
        version = await lookups.server_version()
    injector.native_sidecar = resolve_native_sidecar(config.native_sidecar, version)
    logger.info("tsnet2 injector: native sidecar %s (mode %s, API server %s)",
                injector.native_sidecar, config.native_sidecar,
                ".".join(map(str, version)) if version != (0, 0) else "not asked")
    if not config.sidecar.dns_upstream:
        await _find_cluster_dns(injector, lookups, logger)
    if config.metrics_addr:
        port = injector.metrics.serve(config.metrics_addr)
        logger.info("tsnet2 injector: /metrics on port %d", port)


async def _find_cluster_dns(injector: Injector, lookups: KubeLookups,
                            logger: kopf.Logger) -> None:
    """No ``dns_upstream`` configured: take kube-system/kube-dns's ClusterIP, once (the
    injector itself stays pure). Without one, pods asking for ``tsnet2.io/dns`` are refused
    with a message saying so; everything else works."""
    try:
        ip = await lookups.cluster_dns()
    except KubeLookupError as exc:
        logger.warning("tsnet2 injector: %s; pods with tsnet2.io/dns will be refused "
                       "(set dns_upstream, chart value dns.upstream)", exc)
        return
    if ip is None:
        logger.warning("tsnet2 injector: no Service kube-system/kube-dns with a ClusterIP; "
                       "pods with tsnet2.io/dns will be refused (set dns_upstream, chart "
                       "value dns.upstream)")
        return
    sidecar = replace(injector.config.sidecar, dns_upstream=ip)
    injector.config = replace(injector.config, sidecar=sidecar)
    logger.info("tsnet2 injector: tsnet2.io/dns forwards to %s (kube-system/kube-dns)", ip)


async def stop_injector(param: Injector, **_: Any) -> None:
    """Close the metrics endpoint and the API client (after the Events still being posted)."""
    injector = param
    injector.metrics.close()
    if injector.tasks:  # Events still being posted: give them 5 s, then cancel them
        pending = (await asyncio.wait(set(injector.tasks), timeout=5))[1]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    if injector.lookups is not None:
        injector.lookups.close()
        injector.lookups = None


async def mutate_pod(param: Injector, body: kopf.Body, patch: kopf.Patch, dryrun: bool,
                     warnings: list[str], logger: kopf.Logger, **_: Any) -> None:
    """Inject tsnet2d into an opted-in pod (or say why not)."""
    injector = param
    lookups, native_sidecar = injector.lookups, injector.native_sidecar
    if lookups is None or native_sidecar is None:
        raise kopf.AdmissionError("tsnet2 injector is still starting", code=503)
    pod = cast(dict[str, Any], dict(body))
    try:
        labels = None
        if wants_namespace_labels(pod):
            namespace = str(body.get("metadata", {}).get("namespace") or "")
            labels = await lookups.namespace_labels(namespace)
        decision = inject(pod, injector.config.sidecar, native_sidecar=native_sidecar,
                          namespace_labels=labels)
    except InjectionRejected as exc:
        injector.metrics.count("rejected", exc.reason)
        raise kopf.AdmissionError(str(exc), code=400) from exc
    except KubeLookupError as exc:
        injector.metrics.count("rejected", "lookup_failed")
        raise kopf.AdmissionError(f"tsnet2 injector: {exc}", code=500) from exc
    apply(injector, decision, pod, patch, dryrun, warnings, logger)


async def mutate_ephemeral(param: Injector, body: kopf.Body, patch: kopf.Patch, dryrun: bool,
                           warnings: list[str], logger: kopf.Logger, **kwargs: Any) -> None:
    """Confine ephemeral containers added to an injected pod (or refuse them).

    ``old`` (the pod before the request) and ``operation`` come as kopf kwargs.
    """
    injector = param
    if injector.lookups is None:
        raise kopf.AdmissionError("tsnet2 injector is still starting", code=503)
    if kwargs.get("operation") != "UPDATE":  # kopf does not filter operations
        return
    pod = cast(dict[str, Any], dict(body))
    old = kwargs.get("old")
    previous = cast(dict[str, Any], dict(old)) if old is not None else None
    try:
        decision = check_ephemeral(pod, previous, injector.config.sidecar)
    except InjectionRejected as exc:
        injector.metrics.count("rejected", exc.reason)
        raise kopf.AdmissionError(str(exc), code=400) from exc
    apply(injector, decision, pod, patch, dryrun, warnings, logger)


def apply(injector: Injector, decision: Decision, pod: dict[str, Any], patch: kopf.Patch,
          dryrun: bool, warnings: list[str], logger: kopf.Logger) -> None:
    """Count, patch, warn, log and post the Event (in the background) for ``decision``."""
    injector.metrics.count(decision.result, decision.reason)
    if decision.patch:
        ops = decision.patch
        patch.fns.append(lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True))
    warnings.extend(decision.warnings)
    logger.info("tsnet2 injector: %s (%s): %s", decision.result, decision.reason,
                decision.message)
    event = describe(decision, pod)
    target = event_target(pod)
    lookups = injector.lookups
    if event is not None and target is not None and not dryrun and lookups is not None:
        kind, reason, message = event
        post = lookups.post_event(target, type=kind, reason=reason, message=message,
                                  component=REPORTING_COMPONENT)
        task = asyncio.create_task(_logged(post, logger))  # never delays admission
        injector.tasks.add(task)
        task.add_done_callback(injector.tasks.discard)


def register(registry: kopf.OperatorRegistry, injector: Injector) -> None:
    """Register the injector's handlers in ``registry``, each with ``param=injector``."""
    # (The ignores: kopf's handler protocols declare ``param`` optional; ours always get one.)
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry, param=injector)(start_injector)  # type: ignore[arg-type]
    kopf.on.cleanup(registry=registry, param=injector)(stop_injector)  # type: ignore[arg-type]
    on_create = kopf.on.mutate("pods", operations=["CREATE"], id=HANDLER_ID, registry=registry,
                               param=injector)
    on_create(mutate_pod)  # type: ignore[arg-type]
    on_debug = kopf.on.mutate("pods", subresource="ephemeralcontainers", operations=["UPDATE"],
                              id=EPHEMERAL_HANDLER_ID, registry=registry, param=injector)
    on_debug(mutate_ephemeral)  # type: ignore[arg-type]


def build_registry(
    config: OperatorConfig,
    *,
    metrics: InjectorMetrics | None = None,
    registry: kopf.OperatorRegistry | None = None,
    lookups_factory: Callable[[], KubeLookups] = kube_lookups,
    on_server: Callable[[ListeningWebhookServer], None] | None = None,
) -> kopf.OperatorRegistry:
    """Register the injector's handlers (in ``registry``, or a new one) and return it.

    ``on_server`` is told the webhook server when start-up makes it (readiness gating)."""
    reg = registry if registry is not None else kopf.OperatorRegistry()
    injector = Injector(config, metrics if metrics is not None else InjectorMetrics(),
                        lookups_factory, on_server)
    register(reg, injector)
    return reg
