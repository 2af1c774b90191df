"""The injector's Prometheus metrics, in a registry of their own (one per operator).

``tsnet2_injector_requests_total{result,reason}``: one count per admission decision.
``result`` is ``injected``, ``skipped`` or ``rejected``; ``reason`` is a short, bounded
label (``namespace_label``, ``pod_annotation``, ``not_opted_in``, ``host_network``,
``invalid_annotation``, ...), never a pod or namespace name.
"""

from __future__ import annotations

from http.server import HTTPServer
from threading import Thread

from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server


class InjectorMetrics:
    """Counters for injection decisions, plus an optional HTTP endpoint serving them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Register the metrics in ``registry`` (a fresh one by default)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "tsnet2_injector_requests",
            "Pod admission requests seen by the tsnet2 injector, by decision.",
            ["result", "reason"],
            registry=self.registry,
        )
        self._server: HTTPServer | None = None
        self._thread: Thread | None = None

    def count(self, result: str, reason: str) -> None:
        """Count one decision."""
        self.requests.labels(result=result, reason=reason).inc()

    def value(self, result: str, reason: str) -> float:
        """The current count for one (result, reason) pair (0 if never seen)."""
        sample = self.registry.get_sample_value(
            "tsnet2_injector_requests_total", {"result": result, "reason": reason}
        )
        return sample or 0.0

    def render(self) -> bytes:
        """The Prometheus text exposition of these metrics."""
        return generate_latest(self.registry)

    def serve(self, host_port: str) -> int:
        """Serve ``/metrics`` on ``HOST:PORT`` in a thread; returns the bound port."""
        host, _, port = host_port.rpartition(":")
        server, thread = start_http_server(int(port), addr=host or "0.0.0.0",
                                           registry=self.registry)
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP endpoint if it runs (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
