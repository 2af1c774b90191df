"""Pure builders of everything the kind suite applies: the chart's values and the two sample
apps (the same Python programs as the podman pod test, tests/image/apps.py).

* the apps' namespace, labelled ``tsnet2.io/inject=enabled``: pods there go through the
  webhook with ``failurePolicy: Fail``, so a pod created while the operator is not ready yet
  waits instead of starting without its sidecar (the pod-annotation webhook is ``Ignore``);
  and ``privileged`` Pod Security, which the sidecar's ``NET_ADMIN`` needs;
* the server: a StatefulSet (a stable pod name is the stable tailnet hostname that
  ``tsnet2.io/state: persistent`` needs; its rolling update replaces the pod in place, so the
  old and the new pod never hold the state claim at once), with its traffic log to standard
  output and to the file in its state volume (``tsnet2.io/traffic-log-sink: both``);
* the client: a Deployment (ephemeral state: its node goes with its pod; the traffic log
  to standard output, the default).

Both pod templates carry ``tsnet2.io/inject: enabled`` as well, as an app would.
"""

from __future__ import annotations

from typing import Any

from tests.image import apps

APPS_NAMESPACE = "tsnet2-e2e-apps"
SERVER = "echo-server"
SERVER_POD = f"{SERVER}-0"  # the StatefulSet's only pod: its name is its tailnet hostname
CLIENT = "echo-client"
APP_PORT = 8080
APP_CONTAINER = "app"
APP_UID = 10001  # the image's non-root user

INJECT = "tsnet2.io/inject"
STATE = "tsnet2.io/state"
TRAFFIC_LOG_SINK = "tsnet2.io/traffic-log-sink"
INJECT_LABEL = {INJECT: "enabled"}
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"  # what `kubectl rollout restart` sets


def helm_values(repository: str, tag: str, *, backend: str = "userspace",
                pull_policy: str = "IfNotPresent") -> dict[str, Any]:
    """The suite's chart values: the operator from the full image and the sidecar from the
    sidecar image (``repository`` + ``-sidecar``, as the chart's default), both loaded into
    the nodes (``IfNotPresent``: never pulled, they are there), the sidecar's WireGuard
    ``backend``; everything else is the chart's defaults (two operator replicas with kopf
    peering)."""
    return {
        "operator": {"image": {"repository": repository, "tag": tag,
                               "pullPolicy": pull_policy}},
        "sidecar": {"image": {"repository": f"{repository}-sidecar", "tag": tag,
                              "pullPolicy": pull_policy}, "backend": backend},
    }


def apps_namespace(name: str = APPS_NAMESPACE) -> dict[str, Any]:
    """The namespace of the sample apps (see the module docstring for its labels)."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {
            **INJECT_LABEL,
            "pod-security.kubernetes.io/enforce": "privileged",
        }},
    }


def _app_container(image: str, code: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": APP_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-c", code],
        "env": env,
        # Non-root: the injector opens the sidecar's socket to the app (0660 in the pod's
        # fsGroup, which the server sets; otherwise 0666, reaching no further than the pod).
        "securityContext": {
            "runAsUser": APP_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
        },
    }


def _template(labels: dict[str, str], container: dict[str, Any],
              annotations: dict[str, str], fs_group: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"terminationGracePeriodSeconds": 5, "containers": [container]}
    if fs_group is not None:
        spec["securityContext"] = {"fsGroup": fs_group}
    return {
        "metadata": {"labels": labels, "annotations": {INJECT: "enabled", **annotations}},
        "spec": spec,
    }


def server_statefulset(image: str, namespace: str = APPS_NAMESPACE) -> dict[str, Any]:
    """The echo server (``tsnet2.Server().listen``) with persistent tailnet state."""
    labels = {"app.kubernetes.io/name": SERVER, "app.kubernetes.io/part-of": "tsnet2-e2e"}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": SERVER, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": _template(labels, _app_container(image, apps.SERVER, []),
                                  {STATE: "persistent", TRAFFIC_LOG_SINK: "both"},
                                  fs_group=APP_UID),
        },
    }


def client_deployment(image: str, server_host: str = SERVER_POD,
                      namespace: str = APPS_NAMESPACE) -> dict[str, Any]:
    """The client: dials ``server_host:8080`` over the tailnet (ephemeral state)."""
    labels = {"app.kubernetes.io/name": CLIENT, "app.kubernetes.io/part-of": "tsnet2-e2e"}
    env: list[dict[str, Any]] = [
        {"name": "SERVER_HOST", "value": server_host},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": CLIENT, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": _template(labels, _app_container(image, apps.CLIENT, env),
                                  {STATE: "ephemeral"}),
        },
    }


def client_pod(name: str, image: str, server_host: str = SERVER_POD,
               namespace: str = APPS_NAMESPACE) -> dict[str, Any]:
    """A bare pod of the client app (ephemeral state), as a one-off job would be."""
    template = client_deployment(image, server_host, namespace)["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "tsnet2-e2e"},
                     "annotations": template["metadata"]["annotations"]},
        "spec": template["spec"],
    }


PLAIN_WEB = "plain-web"  # an unmodified web server, reachable on the tailnet by tsnet2.io/serve
PLAIN_CLIENT = "plain-client"  # an unmodified client: tsnet2.io/egress and tsnet2.io/dns
PLAIN_PORT = 80  # the tailnet port of tsnet2.io/serve
PLAIN_TARGET_PORT = 8080  # where the stock web server listens, on loopback
SERVE = "tsnet2.io/serve"
EGRESS = "tsnet2.io/egress"
DNS = "tsnet2.io/dns"
PLAIN_FILE = "hello.txt"


def plain_body(pod: str) -> str:
    """What the plain web server of pod ``pod`` serves at /hello.txt."""
    return f"hello from {pod}\n"


def _plain_pod(name: str, image: str, command: list[str], annotations: dict[str, str],
               namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "tsnet2-e2e",
                                "app.kubernetes.io/name": name},
                     "annotations": {INJECT: "enabled", **annotations}},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": APP_CONTAINER,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": command,
                "securityContext": {"runAsUser": APP_UID, "runAsNonRoot": True,
                                    "allowPrivilegeEscalation": False},
            }],
        },
    }


def plain_web_pod(image: str, namespace: str = APPS_NAMESPACE) -> dict[str, Any]:
    """A stock ``python3 -m http.server`` on 127.0.0.1:8080 (no tsnet2 in the app), served on
    the tailnet at port 80 by its sidecar (``tsnet2.io/serve: "80=127.0.0.1:8080"``)."""
    www = "/tmp/www"
    script = (f"mkdir -p {www} && printf 'hello from %s\\n' \"$(hostname)\" "
              f"> {www}/{PLAIN_FILE} && exec python3 -m http.server {PLAIN_TARGET_PORT} "
              f"--bind 127.0.0.1 --directory {www}")
    return _plain_pod(PLAIN_WEB, image, ["sh", "-c", script],
                      {SERVE: f"{PLAIN_PORT}=127.0.0.1:{PLAIN_TARGET_PORT}"}, namespace)


def plain_client_pod(image: str, namespace: str = APPS_NAMESPACE) -> dict[str, Any]:
    """An app container that only sleeps; the test runs stdlib-only programs in it with
    ``kubectl exec`` through its sidecar's egress proxy and DNS responder."""
    return _plain_pod(PLAIN_CLIENT, image, ["sleep", "infinity"],
                      {EGRESS: "true", DNS: "true"}, namespace)


SECURE_SERVER = "tls-udp-server"  # listen_tls on 443 and a UDP echo on 5353 (apps.SECURE_SERVER)
SECURE_CLIENT = "tls-udp-client"  # an app that only sleeps: the test execs TLS/UDP clients
TLS_PORT = 443
UDP_PORT = 5353


def secure_server_pod(image: str, namespace: str = APPS_NAMESPACE) -> dict[str, Any]:
    """The TLS and UDP server (``tsnet2.Server().listen_tls`` / ``listen_packet``); its
    traffic log to standard output, the default."""
    return _plain_pod(SECURE_SERVER, image, ["python3", "-c", apps.SECURE_SERVER],
                      {STATE: "ephemeral"}, namespace)


def secure_client_pod(image: str, namespace: str = APPS_NAMESPACE) -> dict[str, Any]:
    """An app container that only sleeps (it never asks for a certificate, nor does TLS
    until the test runs :data:`apps.TLS_CLIENT` / :data:`apps.UDP_CLIENT` in it)."""
    return _plain_pod(SECURE_CLIENT, image, ["sleep", "infinity"], {STATE: "ephemeral"},
                      namespace)


def restart_patch(stamp: str) -> dict[str, Any]:
    """A strategic-merge patch that rolls a workload's pods (as ``kubectl rollout restart``)."""
    return {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}
