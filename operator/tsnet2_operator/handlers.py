"""The kopf layer: wiring only. Decisions live in :mod:`tsnet2_operator.inject`.

:func:`build_registry` returns a :class:`kopf.OperatorRegistry` holding

* a login handler (in a pod the service account, else ``$KUBECONFIG``);
* a start-up handler that sets kopf's webhook server (HTTPS, certificate files from the
  config), leaves ``settings.admission.managed`` unset (the chart owns the
  MutatingWebhookConfiguration), decides native vs regular sidecars and starts ``/metrics``;
* ``@kopf.on.mutate('pods', operations=['CREATE'], id='inject')``, served at ``/inject``:
  calls :func:`~tsnet2_operator.inject.inject`, applies its patch, emits the Event and
  counts ``tsnet2_injector_requests_total``;
* ``@kopf.on.mutate('pods', subresource='ephemeralcontainers', operations=['UPDATE'],
  id='ephemeral')``, served at ``/ephemeral``: ephemeral containers added to an injected pod
  (``kubectl debug``) get the same audit-boundary rules
  (:func:`~tsnet2_operator.inject.check_ephemeral`). kopf routes a request by the URL's
  handler id and then matches the request's ``subResource`` exactly (it does not filter
  on the operation; the handler does), so this needs its own handler and path;
* a clean-up handler that closes the API client and the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
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
    KubeLookups,
    ListeningWebhookServer,
    LookupError_,
    load_api_client,
    make_server,
)

HANDLER_ID = "inject"  # kopf serves this handler at https://<addr>:<port>/inject
EPHEMERAL_HANDLER_ID = "ephemeral"  # ... and this one at /ephemeral
REPORTING_COMPONENT = "tsnet2-operator"


@dataclass
class _Runtime:
    """What start-up learns and the mutate handler uses."""

    lookups: KubeLookups | None = None
    native_sidecar: bool | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # Events being posted


async def _logged(post: Coroutine[Any, Any, None], logger: kopf.Logger) -> None:
    """Await ``post``; an Event that cannot be posted is logged, never raised."""
    try:
        await post
    except LookupError_ as exc:
        logger.warning("tsnet2 injector: %s", exc)


def build_registry(
    config: OperatorConfig,
    *,
    metrics: InjectorMetrics | None = None,
    registry: kopf.OperatorRegistry | None = None,
    lookups_factory: Callable[[], KubeLookups] = lambda: KubeLookups(load_api_client()),
    on_server: Callable[[ListeningWebhookServer], None] | None = None,
) -> kopf.OperatorRegistry:
    """Register the injector's handlers (in ``registry``, or a new one) and return it.

    ``on_server`` is told the webhook server when start-up makes it (readiness gating)."""
    reg = registry if registry is not None else kopf.OperatorRegistry()
    counters = metrics if metrics is not None else InjectorMetrics()
    runtime = _Runtime()

    @kopf.on.login(registry=reg)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """In a pod: the service account (via the client library); else ``$KUBECONFIG``.

        (The client library reads ``$KUBECONFIG`` once at import, so outside a pod kopf's
        own kubeconfig reader, which reads it now, is used.)
        """
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return kopf.login_via_client(**kwargs)
        return kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=reg)
    async def configure(settings: kopf.OperatorSettings, logger: kopf.Logger,
                        **_: Any) -> None:
        """Webhook server, unmanaged webhook configuration, sidecar mode, metrics."""
        server = make_server(config)
        settings.admission.server = server
        if on_server is not None:
            on_server(server)
        settings.admission.managed = None
        settings.posting.reporting_component = REPORTING_COMPONENT
        runtime.lookups = await asyncio.to_thread(lookups_factory)
        version = (0, 0)
        if config.native_sidecar == "auto":
            version = await runtime.lookups.server_version()
        runtime.native_sidecar = resolve_native_sidecar(config.native_sidecar, version)
        logger.info("tsnet2 injector: native sidecar %s (mode %s, API server %s)",
                    runtime.native_sidecar, config.native_sidecar,
                    ".".join(map(str, version)) if version != (0, 0) else "not asked")
        if config.metrics_addr:
            port = counters.serve(config.metrics_addr)
            logger.info("tsnet2 injector: /metrics on port %d", port)

    @kopf.on.cleanup(registry=reg)
    async def close(**_: Any) -> None:
        """Close the API client and the metrics endpoint."""
        counters.close()
        if runtime.tasks:  # Events still being posted: give them 5 s, then cancel them
            pending = (await asyncio.wait(set(runtime.tasks), timeout=5))[1]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if runtime.lookups is not None:
            runtime.lookups.close()
            runtime.lookups = None

    @kopf.on.mutate("pods", operations=["CREATE"], id=HANDLER_ID, registry=reg)
    async def mutate(body: kopf.Body, patch: kopf.Patch, dryrun: bool, warnings: list[str],
                     logger: kopf.Logger, **_: Any) -> None:
        """Inject tsnet2d into an opted-in pod (or say why not)."""
        if runtime.lookups is None or runtime.native_sidecar is None:
            raise kopf.AdmissionError("tsnet2 injector is still starting", code=503)
        pod = cast(dict[str, Any], dict(body))
        try:
            labels = None
            if wants_namespace_labels(pod):
                namespace = str(body.get("metadata", {}).get("namespace") or "")
                labels = await runtime.lookups.namespace_labels(namespace)
            decision = inject(pod, config.sidecar, native_sidecar=runtime.native_sidecar,
                              namespace_labels=labels)
        except InjectionRejected as exc:
            counters.count("rejected", exc.reason)
            raise kopf.AdmissionError(str(exc), code=400) from exc
        except LookupError_ as exc:
            counters.count("rejected", "lookup_failed")
            raise kopf.AdmissionError(f"tsnet2 injector: {exc}", code=500) from exc
        apply(decision, pod, patch, dryrun, warnings, logger)

    @kopf.on.mutate("pods", subresource="ephemeralcontainers", operations=["UPDATE"],
                    id=EPHEMERAL_HANDLER_ID, registry=reg)
    async def ephemeral(body: kopf.Body, patch: kopf.Patch, dryrun: bool, warnings: list[str],
                        logger: kopf.Logger, **kwargs: Any) -> None:
        """Confine ephemeral containers added to an injected pod (or refuse them).

        ``old`` (the pod before the request) and ``operation`` come as kopf kwargs.
        """
        if runtime.lookups is None:
            raise kopf.AdmissionError("tsnet2 injector is still starting", code=503)
        if kwargs.get("operation") != "UPDATE":  # kopf does not filter operations
            return
        pod = cast(dict[str, Any], dict(body))
        old = kwargs.get("old")
        previous = cast(dict[str, Any], dict(old)) if old is not None else None
        try:
            decision = check_ephemeral(pod, previous, config.sidecar)
        except InjectionRejected as exc:
            counters.count("rejected", exc.reason)
            raise kopf.AdmissionError(str(exc), code=400) from exc
        apply(decision, pod, patch, dryrun, warnings, logger)

    def apply(decision: Decision, pod: dict[str, Any], patch: kopf.Patch, dryrun: bool,
              warnings: list[str], logger: kopf.Logger) -> None:
        """Count, patch, warn, log and post the Event (in the background) for ``decision``."""
        counters.count(decision.result, decision.reason)
        if decision.patch:
            ops = decision.patch
            patch.fns.append(lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True))
        warnings.extend(decision.warnings)
        logger.info("tsnet2 injector: %s (%s): %s", decision.result, decision.reason,
                    decision.message)
        event = describe(decision, pod)
        target = event_target(pod)
        if event is not None and target is not None and not dryrun and runtime.lookups:
            kind, reason, message = event
            post = runtime.lookups.post_event(target, type=kind, reason=reason,
                                              message=message, component=REPORTING_COMPONENT)
            task = asyncio.create_task(_logged(post, logger))  # never delays admission
            runtime.tasks.add(task)
            task.add_done_callback(runtime.tasks.discard)

    return reg
