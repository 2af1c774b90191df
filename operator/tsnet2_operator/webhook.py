"""What the admission webhook needs from outside the pure core.

* :func:`make_server`: kopf's HTTPS :class:`kopf.WebhookServer` from the configured certificate
  files (kopf re-reads them when they change, so cert-manager rotation needs no restart).
* :class:`KubeLookups`: what the injector asks of the API server, each a single request: the
  namespace's labels (only when the pod does not decide by itself), the server version (once,
  at start-up, for native-sidecar detection) and posting an Event. (kopf's ``kopf.event`` is
  not usable from admission handlers in kopf 1.45: its event queue is not set up there.)
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
from collections.abc import AsyncIterator

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from tsnet2_operator.config import ConfigError, OperatorConfig, parse_server_version


class ListeningWebhookServer(kopf.WebhookServer):
    """kopf's HTTPS webhook server that says when it listens (:attr:`listening`), so the
    operator's readiness can wait for it: kopf starts it after the other start-up handlers,
    and a replica that is Ready before its webhook listens makes the API server's admission
    calls fail (connection refused) during a rollout or restart."""

    listening = False
    """True from the moment the server accepts connections until it stops."""

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        """kopf's server; :attr:`listening` follows it (kopf yields once it listens)."""
        try:
            async for client_config in super().__call__(fn):
                self.listening = True
                yield client_config
        finally:
            self.listening = False


def make_server(config: OperatorConfig) -> ListeningWebhookServer:
    """kopf's webhook server on ``webhook_addr:webhook_port`` with the configured cert files."""
    if not (config.webhook_cert_file and config.webhook_key_file):
        raise ConfigError("the webhook needs TSNET2_WEBHOOK_CERT_FILE and TSNET2_WEBHOOK_KEY_FILE")
    return ListeningWebhookServer(
        addr=config.webhook_addr,
        port=config.webhook_port,
        certfile=config.webhook_cert_file,
        pkeyfile=config.webhook_key_file,
    )


class KubeLookupError(Exception):
    """A Kubernetes API request the operator depends on failed, or there are no credentials
    to make one (the message names what and why). Raised by :func:`load_api_client` and
    :class:`KubeLookups`."""


def load_api_client() -> k8s.ApiClient:
    """An API client from the in-cluster service account, else from ``$KUBECONFIG``/~/.kube."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
    except ConfigException:
        try:
            # The client reads $KUBECONFIG at import time; read it now instead.
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=os.environ.get("KUBECONFIG") or None,
                client_configuration=configuration)
        except (ConfigException, OSError) as exc:
            raise KubeLookupError(
                f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({exc})"
            ) from exc
    return k8s.ApiClient(configuration)


class KubeLookups:
    """Namespace labels and server version over one API client (blocking calls off-loop)."""

    def __init__(self, api: k8s.ApiClient, *, timeout: float = 5.0) -> None:
        """Use ``api`` for every read; each read gives up after ``timeout`` seconds."""
        self.api = api
        self.timeout = timeout

    def close(self) -> None:
        """Close the API client's connection pool."""
        self.api.close()  # type: ignore[no-untyped-call]

    async def namespace_labels(self, name: str) -> dict[str, str]:
        """The labels of namespace ``name``; raises :class:`KubeLookupError` if it cannot tell."""
        def read() -> dict[str, str]:
            ns = k8s.CoreV1Api(self.api).read_namespace(name, _request_timeout=self.timeout)
            labels = ns.metadata.labels if ns.metadata is not None else None
            return dict(labels or {})

        try:
            return await asyncio.to_thread(read)
        except (ApiException, HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            raise KubeLookupError(f"cannot read namespace {name!r}: {reason}") from exc

    async def server_version(self) -> tuple[int, int]:
        """(major, minor) of the API server; raises :class:`KubeLookupError` if it cannot tell."""
        def read() -> tuple[int, int]:
            info = k8s.VersionApi(self.api).get_code(_request_timeout=self.timeout)
            return parse_server_version(str(info.major), str(info.minor))

        try:
            return await asyncio.to_thread(read)
        except (ApiException, HTTPError, OSError) as exc:
            raise KubeLookupError(f"cannot read the API server version: {exc}") from exc

    async def cluster_dns(self, namespace: str = "kube-system",
                          name: str = "kube-dns") -> str | None:
        """The ClusterIP of the cluster DNS Service (``kube-system/kube-dns``, which CoreDNS
        keeps for compatibility), or None when there is no such Service or it has no
        ClusterIP; raises :class:`KubeLookupError` when it cannot tell (e.g. Forbidden)."""
        def read() -> str | None:
            try:
                svc = k8s.CoreV1Api(self.api).read_namespaced_service(
                    name, namespace, _request_timeout=self.timeout)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            ip = svc.spec.cluster_ip if svc.spec is not None else None
            return str(ip) if ip and ip != "None" else None

        try:
            return await asyncio.to_thread(read)
        except (ApiException, HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            raise KubeLookupError(f"cannot read Service {namespace}/{name}: {reason}") from exc

    async def post_event(self, ref: dict[str, str], *, type: str, reason: str,
                         message: str, component: str) -> None:
        """Create a core/v1 Event about ``ref`` (an object reference with a namespace)."""
        now = datetime.datetime.now(datetime.UTC)
        body = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(generate_name=f"{component}-",
                                      namespace=ref["namespace"]),
            involved_object=k8s.V1ObjectReference(
                api_version=ref.get("apiVersion") or None, kind=ref.get("kind") or None,
                name=ref.get("name") or None, namespace=ref["namespace"],
                uid=ref.get("uid") or None),
            type=type,
            reason=reason,
            message=message[:1024],
            source=k8s.V1EventSource(component=component),
            reporting_component=component,
            reporting_instance=socket.gethostname()[:128],
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )

        def create() -> None:
            k8s.CoreV1Api(self.api).create_namespaced_event(
                ref["namespace"], body, _request_timeout=self.timeout)

        try:
            await asyncio.to_thread(create)
        except (ApiException, HTTPError, OSError) as exc:
            raise KubeLookupError(
                f"cannot post Event {reason} in {ref['namespace']}: {exc}") from exc
