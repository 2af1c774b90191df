"""The kopf handlers called directly, the way kopf calls them, without kopf or a cluster.

Every handler is a module-level function that gets its shared state as kopf's ``param``
keyword argument (:class:`~tsnet2_operator.handlers.Injector`,
:class:`~tsnet2_operator.control.ControlRuntime`, :class:`~tsnet2_operator.app.ClusterSetup`),
so a test imports it and passes fakes. (tests/k8s runs the same handlers under kopf against a
real kube-apiserver.)
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, cast

import kopf
import pytest
from kubernetes import client as k8s
from tsnet2_operator import app, control, handlers
from tsnet2_operator.config import NativeSidecarMode, OperatorConfig, SidecarConfig
from tsnet2_operator.control import ControlRuntime
from tsnet2_operator.handlers import Injector
from tsnet2_operator.metrics import InjectorMetrics
from tsnet2_operator.webhook import (
    KubeLookupError,
    KubeLookups,
    ListeningWebhookServer,
    make_server,
)

LOG = logging.getLogger("tests.operator.handlers")
NAMESPACE = "apps"


class FakeLookups:
    """What the injector asks of the API server, answered from memory."""

    def __init__(self, *, version: tuple[int, int] = (1, 30),
                 labels: dict[str, str] | None = None, fail: bool = False,
                 dns: str | KubeLookupError | None = "10.96.0.10") -> None:
        self.version = version
        self.dns = dns
        self.dns_asked = 0
        self.labels = labels or {}
        self.fail = fail
        self.events: list[dict[str, Any]] = []
        self.asked: list[str] = []
        self.closed = False

    async def namespace_labels(self, name: str) -> dict[str, str]:
        self.asked.append(name)
        if self.fail:
            raise KubeLookupError(f"cannot read namespace {name!r}: Forbidden")
        return dict(self.labels)

    async def server_version(self) -> tuple[int, int]:
        return self.version

    async def cluster_dns(self) -> str | None:
        self.dns_asked += 1
        if isinstance(self.dns, KubeLookupError):
            raise self.dns
        return self.dns

    async def post_event(self, ref: dict[str, str], **fields: str) -> None:
        self.events.append({"ref": ref, **fields})

    def close(self) -> None:
        self.closed = True


def _config(native: NativeSidecarMode = "auto") -> OperatorConfig:
    return OperatorConfig(
        sidecar=SidecarConfig(image="registry.example/tsnet2:1",
                              control_url="http://tsnet2-control.tsnet2-system.svc:8440"),
        native_sidecar=native,
        webhook_addr="127.0.0.1",
        webhook_cert_file="/nonexistent/tls.crt",  # kopf reads them only when it serves
        webhook_key_file="/nonexistent/tls.key",
        metrics_addr="",
    )


def _started(lookups: FakeLookups, native: bool = True) -> Injector:
    """An injector as :func:`handlers.start_injector` leaves it."""
    injector = Injector(_config(), InjectorMetrics())
    injector.lookups = cast(KubeLookups, lookups)
    injector.native_sidecar = native
    return injector


def _pod(name: str = "web", annotations: dict[str, str] | None = None,
         **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}",
                     "annotations": annotations or {}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}], **spec},
    }


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def _admit(handler: Any, injector: Injector, pod: dict[str, Any], *, dryrun: bool = False,
                 **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
    """Call a mutating handler as kopf does; the patched pod and the warnings. Then stop the
    injector, which waits for the Events posted in the background."""
    patch = kopf.Patch()
    warnings: list[str] = []
    try:
        await handler(param=injector, body=kopf.Body(copy.deepcopy(pod)), patch=patch,
                      dryrun=dryrun, warnings=warnings, logger=LOG, **kwargs)
    finally:
        await handlers.stop_injector(param=injector)
    patched = copy.deepcopy(pod)
    for fn in patch.fns:
        patched = fn(patched)
    return patched, warnings


# ---- injector start-up and clean-up ------------------------------------------------------------


@pytest.mark.parametrize(("version", "native"), [((1, 30), True), ((1, 28), False)])
def test_start_injector_sets_the_server_and_decides_the_sidecar(
    version: tuple[int, int], native: bool
) -> None:
    lookups = FakeLookups(version=version)
    told: list[ListeningWebhookServer] = []
    injector = Injector(_config("auto"), InjectorMetrics(), lambda: cast(KubeLookups, lookups),
                        told.append)
    settings = kopf.OperatorSettings()
    _run(handlers.start_injector(param=injector, settings=settings, logger=LOG))
    server = settings.admission.server
    assert isinstance(server, ListeningWebhookServer) and told == [server]
    assert not server.listening
    assert (server.addr, server.port) == ("127.0.0.1", 9443)
    assert settings.admission.managed is None  # the chart owns the webhook configuration
    assert settings.posting.reporting_component == handlers.REPORTING_COMPONENT
    assert injector.lookups is lookups and injector.native_sidecar is native
    _run(handlers.stop_injector(param=injector))
    assert lookups.closed and injector.lookups is None


def test_start_injector_does_not_ask_the_version_unless_auto() -> None:
    def no_version() -> KubeLookups:
        fake = FakeLookups()

        async def fail() -> tuple[int, int]:
            raise AssertionError("the version was asked")

        fake.server_version = fail  # type: ignore[method-assign]
        return cast(KubeLookups, fake)

    injector = Injector(_config("off"), InjectorMetrics(), no_version)
    _run(handlers.start_injector(param=injector, settings=kopf.OperatorSettings(), logger=LOG))
    assert injector.native_sidecar is False


@pytest.mark.parametrize(("found", "upstream"), [
    ("10.96.0.10", "10.96.0.10"),
    (None, ""),
    (KubeLookupError("cannot read Service kube-system/kube-dns: Forbidden"), ""),
])
def test_start_injector_looks_up_the_cluster_dns_once(
        found: str | KubeLookupError | None, upstream: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """No dns_upstream: kube-system/kube-dns's ClusterIP, asked at start-up only; without
    one, tsnet2.io/dns pods are refused with a message and other pods are injected."""
    lookups = FakeLookups(dns=found)
    injector = Injector(_config("off"), InjectorMetrics(), lambda: cast(KubeLookups, lookups))
    with caplog.at_level(logging.INFO, logger=LOG.name):
        _run(handlers.start_injector(param=injector, settings=kopf.OperatorSettings(),
                                     logger=LOG))
    assert injector.config.sidecar.dns_upstream == upstream and lookups.dns_asked == 1
    assert ("pods with tsnet2.io/dns will be refused" in caplog.text) is (not upstream)
    injector.lookups = cast(KubeLookups, lookups)
    pod = _pod(annotations={"tsnet2.io/inject": "enabled", "tsnet2.io/dns": "true"})
    if upstream:
        patched, _ = _run(_admit(handlers.mutate_pod, injector, pod))
        assert patched["spec"]["dnsPolicy"] == "None"
        assert patched["spec"]["dnsConfig"]["nameservers"] == ["127.0.0.1"]
    else:
        with pytest.raises(kopf.AdmissionError, match="no cluster DNS server"):
            _run(_admit(handlers.mutate_pod, injector, pod))
    assert lookups.dns_asked == 1  # never again per pod


def test_start_injector_keeps_a_configured_dns_upstream() -> None:
    lookups = FakeLookups()
    config = _config("off")
    config = replace(config, sidecar=replace(config.sidecar, dns_upstream="10.0.0.53:5353"))
    injector = Injector(config, InjectorMetrics(), lambda: cast(KubeLookups, lookups))
    _run(handlers.start_injector(param=injector, settings=kopf.OperatorSettings(), logger=LOG))
    assert lookups.dns_asked == 0
    assert injector.config.sidecar.dns_upstream == "10.0.0.53:5353"


# ---- /inject -----------------------------------------------------------------------------------


def test_mutate_pod_before_start_up_is_refused_with_503() -> None:
    injector = Injector(_config(), InjectorMetrics())
    with pytest.raises(kopf.AdmissionError) as info:
        _run(_admit(handlers.mutate_pod, injector, _pod(annotations={
            "tsnet2.io/inject": "enabled"})))
    assert info.value.code == 503 and "still starting" in str(info.value)


def test_mutate_pod_injects_counts_and_posts_an_event() -> None:
    lookups = FakeLookups()
    injector = _started(lookups)
    pod, _warnings = _run(_admit(handlers.mutate_pod, injector, _pod(annotations={
        "tsnet2.io/inject": "enabled", "tsnet2.io/hostname": "web-1"})))
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["tsnet2d"]
    assert pod["spec"]["initContainers"][0]["restartPolicy"] == "Always"  # native
    assert "tsnet2.io/status" in pod["metadata"]["annotations"]
    assert injector.metrics.value("injected", "pod_annotation") == 1
    assert lookups.asked == []  # the pod decided by itself
    [event] = lookups.events
    assert event["reason"] == "Injected" and event["ref"]["name"] == "web"
    assert event["component"] == handlers.REPORTING_COMPONENT
    assert not injector.tasks


def test_mutate_pod_regular_sidecar_and_dry_run_posts_nothing() -> None:
    lookups = FakeLookups()
    injector = _started(lookups, native=False)
    pod, _ = _run(_admit(handlers.mutate_pod, injector,
                         _pod(annotations={"tsnet2.io/inject": "enabled"}), dryrun=True))
    assert "tsnet2d" in [c["name"] for c in pod["spec"]["containers"]]
    assert "initContainers" not in pod["spec"]
    assert lookups.events == []


def test_mutate_pod_asks_the_namespace_labels() -> None:
    lookups = FakeLookups(labels={"tsnet2.io/inject": "enabled"})
    injector = _started(lookups)
    pod, _ = _run(_admit(handlers.mutate_pod, injector, _pod()))
    assert lookups.asked == [NAMESPACE]
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["tsnet2d"]
    assert injector.metrics.value("injected", "namespace_label") == 1


def test_mutate_pod_lookup_failure_is_a_500_with_the_reason() -> None:
    injector = _started(FakeLookups(fail=True))
    with pytest.raises(kopf.AdmissionError) as info:
        _run(_admit(handlers.mutate_pod, injector, _pod()))
    assert info.value.code == 500
    assert str(info.value) == f"tsnet2 injector: cannot read namespace {NAMESPACE!r}: Forbidden"
    assert injector.metrics.value("rejected", "lookup_failed") == 1


def test_mutate_pod_invalid_annotation_is_a_400() -> None:
    injector = _started(FakeLookups())
    with pytest.raises(kopf.AdmissionError) as info:
        _run(_admit(handlers.mutate_pod, injector, _pod(annotations={
            "tsnet2.io/inject": "enabled", "tsnet2.io/state": "durable"})))
    assert info.value.code == 400 and "ephemeral, persistent" in str(info.value)
    assert injector.metrics.value("rejected", "invalid_annotation") == 1


def test_mutate_pod_event_failure_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lookups = FakeLookups()

    async def refuse(ref: dict[str, str], **fields: str) -> None:
        raise KubeLookupError(f"cannot post Event {fields['reason']} in {ref['namespace']}")

    lookups.post_event = refuse  # type: ignore[method-assign]
    injector = _started(lookups)
    with caplog.at_level(logging.WARNING, LOG.name):
        pod, _ = _run(_admit(handlers.mutate_pod, injector, _pod(annotations={
            "tsnet2.io/inject": "enabled"})))
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["tsnet2d"]
    assert f"cannot post Event Injected in {NAMESPACE}" in caplog.text


# ---- /ephemeral --------------------------------------------------------------------------------


def _injected() -> dict[str, Any]:
    """A pod as the injector stored it."""
    injector = _started(FakeLookups())
    pod, _ = _run(_admit(handlers.mutate_pod, injector, _pod(annotations={
        "tsnet2.io/inject": "enabled"})))
    return pod


def _with_debugger(pod: dict[str, Any], **security: Any) -> dict[str, Any]:
    new = copy.deepcopy(pod)
    debugger: dict[str, Any] = {"name": "debugger", "image": "busybox:1"}
    if security:
        debugger["securityContext"] = security
    new["spec"]["ephemeralContainers"] = [debugger]
    return new


def test_mutate_ephemeral_confines_a_debug_container() -> None:
    old = _injected()
    lookups = FakeLookups()
    injector = _started(lookups)
    pod, _ = _run(_admit(handlers.mutate_ephemeral, injector, _with_debugger(old),
                         old=kopf.Body(old), operation="UPDATE"))
    [debugger] = pod["spec"]["ephemeralContainers"]
    assert debugger["securityContext"]["capabilities"]["drop"] == ["NET_RAW"]
    assert injector.metrics.value("injected", "ephemeral_container") == 1
    assert [e["reason"] for e in lookups.events] == ["EphemeralContainerChecked"]


def test_mutate_ephemeral_refuses_a_dangerous_debug_container() -> None:
    old = _injected()
    injector = _started(FakeLookups())
    new = _with_debugger(old, capabilities={"add": ["NET_RAW"]})
    with pytest.raises(kopf.AdmissionError) as info:
        _run(_admit(handlers.mutate_ephemeral, injector, new, old=kopf.Body(old),
                    operation="UPDATE"))
    assert info.value.code == 400 and "NET_RAW" in str(info.value)
    assert injector.metrics.value("rejected", "unconfinable_container") == 1


def test_mutate_ephemeral_ignores_other_operations() -> None:
    """kopf routes by path and subresource only: the handler filters the operation."""
    old = _injected()
    injector = _started(FakeLookups())
    new = _with_debugger(old, capabilities={"add": ["NET_RAW"]})
    pod, warnings = _run(_admit(handlers.mutate_ephemeral, injector, new, old=kopf.Body(old),
                                operation="CREATE"))
    assert pod == new and warnings == []


# ---- control server handlers -------------------------------------------------------------------


class FakeControl:
    """The parts of :class:`ControlRuntime` its handlers use."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.settings = control.ControlSettings(namespace="tsnet2-system", host="127.0.0.1",
                                                port=8440)
        self.fail = fail
        self.calls: list[Any] = []

    async def start(self) -> str:
        self.calls.append("start")
        if self.fail is not None:
            raise self.fail
        return "http://127.0.0.1:8440"

    async def close(self) -> None:
        self.calls.append("close")

    async def on_pod_event(self, event: dict[str, Any]) -> None:
        self.calls.append(("pod", event["type"]))

    async def on_owner_deleted(self, namespace: str) -> None:
        self.calls.append(("owner", namespace))


def _control(fake: FakeControl) -> ControlRuntime:
    return cast(ControlRuntime, fake)


def test_start_control_bind_failure_is_permanent_and_cleans_up() -> None:
    fake = FakeControl(OSError(98, "Address already in use"))
    with pytest.raises(kopf.PermanentError, match=r"cannot serve on 127\.0\.0\.1:8440: .*in use"):
        _run(control.start_control(param=_control(fake)))
    assert fake.calls == ["start", "close"]


def test_start_control_other_failure_is_retried_from_scratch() -> None:
    fake = FakeControl(RuntimeError("store not ready"))
    with pytest.raises(RuntimeError, match="store not ready"):
        _run(control.start_control(param=_control(fake)))
    assert fake.calls == ["start", "close"]
    ok = FakeControl()
    _run(control.start_control(param=_control(ok)))
    _run(control.stop_control(param=_control(ok)))
    assert ok.calls == ["start", "close"]


def test_watch_handlers_pass_events_on() -> None:
    fake = FakeControl()
    _run(control.injected_pod_event(param=_control(fake), event={"type": "ADDED"}))
    for kind, ns in (("MODIFIED", "a"), ("DELETED", None), ("DELETED", "b")):
        _run(control.owner_event(param=_control(fake), event={"type": kind}, namespace=ns))
    assert fake.calls == [("pod", "ADDED"), ("owner", "b")]


def test_ensure_peering_without_peering_does_nothing() -> None:
    setup = app.ClusterSetup(cast(k8s.ApiClient, None), None)  # never used
    _run(app.ensure_peering_at_startup(param=setup, logger=LOG))


# ---- the one registry --------------------------------------------------------------------------


def _operator_config(install_crds: bool) -> OperatorConfig:
    config = _config()
    return OperatorConfig(sidecar=config.sidecar, webhook_cert_file=config.webhook_cert_file,
                          webhook_key_file=config.webhook_key_file, namespace="tsnet2-system",
                          install_crds=install_crds)


@pytest.mark.parametrize(("install_crds", "peering", "first"), [
    (True, None, ["install-crds"]),
    (False, "tsnet2", ["ensure-peering"]),
    (False, None, []),
])
def test_operator_registry_holds_the_module_level_handlers(
    install_crds: bool, peering: str | None, first: list[str]
) -> None:
    """Registration is explicit (a registry of its own, never kopf's default one), and each
    handler is the module-level function with its state as ``param``."""
    api = k8s.ApiClient()
    try:
        metrics = InjectorMetrics()
        registry, runtime = app.build_operator_registry(
            _operator_config(install_crds), api, peering=peering, metrics=metrics)
        assert registry is not kopf.get_default_registry()
        activities = registry._activities.get_all_handlers()
        assert [h.id for h in activities] == [
            *first, "login", "start_injector", "stop_injector", "start_control", "stop_control"]
        by_id = {h.id: h for h in activities}
        injector = by_id["start_injector"].param
        assert isinstance(injector, Injector) and injector.metrics is metrics
        assert by_id["start_injector"].fn is handlers.start_injector
        assert by_id["start_control"].fn is control.start_control
        assert by_id["start_control"].param is runtime
        if first:
            setup = by_id[first[0]].param
            assert isinstance(setup, app.ClusterSetup)
            assert (setup.api, setup.peering) == (api, peering)
        hooks = {h.id: h for h in registry._webhooks.get_all_handlers()}
        assert hooks[handlers.HANDLER_ID].fn is handlers.mutate_pod
        assert hooks[handlers.EPHEMERAL_HANDLER_ID].fn is handlers.mutate_ephemeral
        assert all(h.param is injector for h in hooks.values())
        watching = registry._watching.get_all_handlers()
        assert {h.fn for h in watching} == {control.injected_pod_event, control.owner_event}
        assert len(watching) == 1 + len(control.OWNER_KINDS)
        assert all(h.param is runtime for h in watching)
        # Readiness waits for the webhook server that start-up hands over.
        assert runtime.server.ready() == app.WEBHOOK_NOT_LISTENING
        server = make_server(injector.config)
        assert injector.on_server is not None
        injector.on_server(server)
        assert runtime.server.ready() == app.WEBHOOK_NOT_LISTENING
        server.listening = True
        assert runtime.server.ready() is None
    finally:
        api.close()  # type: ignore[no-untyped-call]

