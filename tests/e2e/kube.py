"""Small helpers for the end-to-end suite: plain JSON requests to the API server (create
with strict validation, dry runs, strategic-merge patches), bounded waits, pod logs,
``kubectl exec`` in a container, the tailnet nodes, and a namespace summary for failure
messages.

Requests go over one ``http.client`` connection each, closed before the function returns:
the kubernetes client is used only for its configuration (server, CA, credentials from a
kubeconfig). Its own HTTP pool and its websocket ``stream`` left SSL sockets to the garbage
collector, and under ``filterwarnings = error`` their ``ResourceWarning`` failed whatever test
was running at the time.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

from kubernetes import client as k8s
from tsnet2_operator.store import GROUP, NODES, VERSION

T = TypeVar("T")
MAX_EXEC_OUTPUT = 8 << 20
_POLL = 1.0


def wait_for(pred: Callable[[], T | None], timeout: float, what: str,
             detail: Callable[[], str] = lambda: "") -> T:
    """Poll ``pred`` every second until it returns something truthy; fail after ``timeout``
    with ``detail()`` (e.g. :func:`describe`) in the message."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail()}")
        time.sleep(_POLL)


class KubeError(RuntimeError):
    """The API server refused a request; ``status`` is its HTTP status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        """Keep the status; the message has the request and the server's answer."""
        super().__init__(f"{method} {path}: {status} {body[:2000]}")
        self.status = status


def _send(api: k8s.ApiClient, method: str, path: str, body: bytes | None,
          headers: Mapping[str, str], limit: int) -> tuple[int, bytes]:
    """One HTTPS request on a connection of its own, closed before returning; at most
    ``limit`` bytes of the body are read."""
    cfg = api.configuration
    url = urlsplit(cfg.host)
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    hdrs = dict(headers)
    token = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
        "authorization")
    if token:
        hdrs["Authorization"] = token
    conn = http.client.HTTPSConnection(url.hostname or "", url.port or 443, context=ctx,
                                       timeout=60)
    try:
        conn.request(method, (url.path.rstrip("/") + path), body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read(limit)
        return resp.status, data
    finally:
        conn.close()


def request(api: k8s.ApiClient, method: str, path: str, body: Any = None,
            query: Mapping[str, str] | None = None,
            content_type: str = "application/json") -> dict[str, Any]:
    """One JSON request to the API server (``path`` like ``/api/v1/namespaces``).

    Plain JSON in and out (no generated models), with the client's TLS and credentials.
    """
    target = path + (f"?{urlencode(query)}" if query else "")
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        headers["Content-Type"] = content_type
        data = json.dumps(body).encode()
    status, raw = _send(api, method, target, data, headers, 64 << 20)
    text = (raw or b"{}").decode("utf-8", "replace")
    if not 200 <= status < 300:
        raise KubeError(method, path, status, text)
    doc: dict[str, Any] = json.loads(text)
    return doc


def resource_path(api: k8s.ApiClient, api_version: str, kind: str,
                  namespace: str | None = None) -> str:
    """The collection path of ``kind`` (found by discovery), in ``namespace`` if namespaced."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    for res in request(api, "GET", base).get("resources", []):
        if res.get("kind") == kind and "/" not in res["name"]:
            if res.get("namespaced"):
                if not namespace:
                    raise ValueError(f"{kind} is namespaced: give a namespace")
                return f"{base}/namespaces/{namespace}/{res['name']}"
            return f"{base}/{res['name']}"
    raise ValueError(f"the API server serves no {kind} in {api_version}")


def create(api: k8s.ApiClient, obj: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    """POST ``obj`` with strict field validation (unknown fields are errors); with
    ``dry_run`` the server checks and admits it but stores nothing."""
    meta = obj.get("metadata") or {}
    path = resource_path(api, str(obj["apiVersion"]), str(obj["kind"]), meta.get("namespace"))
    query = {"fieldValidation": "Strict"}
    if dry_run:
        query["dryRun"] = "All"
    return request(api, "POST", path, dict(obj), query)


def get(api: k8s.ApiClient, api_version: str, kind: str, name: str,
        namespace: str | None = None) -> dict[str, Any]:
    """GET one object as JSON."""
    return request(api, "GET", f"{resource_path(api, api_version, kind, namespace)}/{name}")


def strategic_patch(api: k8s.ApiClient, api_version: str, kind: str, name: str,
                    patch: Mapping[str, Any], namespace: str | None = None, *,
                    dry_run: bool = False) -> dict[str, Any]:
    """A strategic-merge PATCH (as ``kubectl patch``); returns the patched object."""
    path = f"{resource_path(api, api_version, kind, namespace)}/{name}"
    query = {"fieldValidation": "Strict", **({"dryRun": "All"} if dry_run else {})}
    return request(api, "PATCH", path, dict(patch), query,
                   content_type="application/strategic-merge-patch+json")


def list_pods(api: k8s.ApiClient, namespace: str, selector: str = "") -> list[dict[str, Any]]:
    """Pods of a namespace as JSON, optionally by label selector."""
    query = {"labelSelector": selector} if selector else None
    items: list[dict[str, Any]] = request(
        api, "GET", f"/api/v1/namespaces/{namespace}/pods", query=query)["items"]
    return items


def pod_logs(api: k8s.ApiClient, namespace: str, pod: str, container: str) -> str:
    """The container's log ('' when there is none yet), at most 8 MiB.

    ``Accept: */*``: the log endpoint serves ``text/plain`` but kube-apiserver 1.37 answers
    ``406 Not Acceptable`` to a request that asks for exactly that.
    """
    path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
    target = path + "?" + urlencode({"container": container,
                                     "limitBytes": str(MAX_EXEC_OUTPUT)})
    status, data = _send(api, "GET", target, None, {"Accept": "*/*"}, MAX_EXEC_OUTPUT)
    if status in (400, 404):  # not started yet / gone
        return ""
    if not 200 <= status < 300:
        raise KubeError("GET", path, status, data.decode("utf-8", "replace"))
    return data.decode("utf-8", "replace")


def exec_in(kubectl: Sequence[str], namespace: str, pod: str, container: str,
            argv: Sequence[str], timeout: float = 60.0) -> str:
    """Run ``argv`` in the container with ``kubectl exec`` (``kubectl``: the command with its
    ``--kubeconfig``); its stdout. Fails with its stderr when it exits non-zero, runs longer
    than ``timeout`` or prints more than 8 MiB."""
    cmd = [*kubectl, "exec", "-n", namespace, pod, "-c", container, "--", *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"exec {list(argv)} in {pod}/{container}: still running after "
                             f"{timeout:.0f}s") from None
    if len(proc.stdout) > MAX_EXEC_OUTPUT:
        raise AssertionError(f"exec {list(argv)} in {pod}/{container}: output over "
                             f"{MAX_EXEC_OUTPUT} bytes")
    if proc.returncode != 0:
        raise AssertionError(f"exec {list(argv)} in {pod}/{container} exited "
                             f"{proc.returncode}: {proc.stderr.decode('utf-8', 'replace')[-2000:]}")
    return proc.stdout.decode("utf-8", "replace")


def tailnet_nodes(api: k8s.ApiClient, namespace: str) -> list[dict[str, Any]]:
    """Every ``TailnetNode`` in the operator's namespace (the store)."""
    items: list[dict[str, Any]] = request(
        api, "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{NODES}")["items"]
    return items


def node_summary(node: Mapping[str, Any]) -> str:
    """One line about a ``TailnetNode`` for messages."""
    spec = node.get("spec", {})
    return (f"{node['metadata']['name']}: name={spec.get('name')} ipv4={spec.get('ipv4')} "
            f"key={str(spec.get('publicKey'))[:16]}... ephemeral={spec.get('ephemeral')} "
            f"pod={json.dumps(spec.get('pod'))}")


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Running, not being deleted, and Ready (every container and native sidecar)."""
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in status.get("conditions") or [])


def describe(api: k8s.ApiClient, namespace: str, tail: int = 25) -> str:
    """Pods (phase, containers' states) and the latest events of a namespace."""
    lines = [f"-- namespace {namespace}"]
    try:
        for pod in list_pods(api, namespace):
            meta, status = pod["metadata"], pod.get("status") or {}
            lines.append(f"pod {meta['name']} uid={meta['uid']} phase={status.get('phase')}")
            for cs in (status.get("initContainerStatuses") or []) + (
                    status.get("containerStatuses") or []):
                lines.append(f"  {cs['name']}: ready={cs.get('ready')} "
                             f"restarts={cs.get('restartCount')} "
                             f"{json.dumps(cs.get('state'))[:300]}")
        events = request(api, "GET", f"/api/v1/namespaces/{namespace}/events")["items"]
        events.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
        for e in events[-tail:]:
            obj = e.get("involvedObject") or {}
            lines.append(f"event {e.get('type')} {e.get('reason')} {obj.get('kind')}/"
                         f"{obj.get('name')}: {(e.get('message') or '')[:300]}")
    except KubeError as exc:
        lines.append(f"(cannot describe: {exc})")
    return "\n".join(lines)
