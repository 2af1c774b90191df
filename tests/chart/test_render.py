"""``helm lint --strict`` and ``helm template`` over the matrix in tests/chart/values/.

Every values file must lint strictly and render; the rendered objects are then checked for
the properties the chart promises (webhook wiring, TLS, config = operator settings, RBAC
subjects, CRD toggles). The operator configuration is checked by the operator's own loader
(:func:`tsnet2_operator.config.load_config`), not by re-implementing it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tsnet2_operator.config import field_names, load_config
from tsnet2_operator.inject import InjectionRejected, inject
from tsnet2_operator.store import CA_SECRET

from tests.chart.conftest import (
    CHART,
    NAMESPACE,
    RELEASE,
    VALUES_FILES,
    Helm,
    HelmError,
    by_kind,
    one,
    values_args,
)

THIRD_PARTY_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/")
CLUSTER_KINDS = {
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
}


def _values(path: Path) -> dict[str, Any]:
    """Chart defaults deep-merged with one values file (what helm computes, for assertions)."""
    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    return merge(defaults, yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


@pytest.fixture(scope="module", params=VALUES_FILES, ids=_ids(VALUES_FILES))
def rendered(request: pytest.FixtureRequest, helm: Helm) -> tuple[Path, list[dict[str, Any]]]:
    """(values file, objects rendered from it)."""
    path: Path = request.param
    return path, helm.template(*values_args(path))


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=_ids(VALUES_FILES))
def test_lint_strict(helm: Helm, values_file: Path) -> None:
    """helm lint --strict passes (warnings are failures) for every values file."""
    out = helm.run("lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                   *values_args(values_file))
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def _config_map(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator's ConfigMap (the dashboard's, when on, is the other one)."""
    found = [o for o in by_kind(objects, "ConfigMap") if "config.json" in o.get("data", {})]
    assert len(found) == 1, [o["metadata"]["name"] for o in by_kind(objects, "ConfigMap")]
    return found[0]


def _config(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    cm = _config_map(objects)
    text: str = cm["data"]["config.json"]
    return json.loads(text), text


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deploy = one(objects, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def test_every_object_labelled_and_placed(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    """Recommended labels on every object; namespaced objects in the release namespace."""
    path, objects = rendered
    common = _values(path)["global"]["commonLabels"]
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert labels.get("app.kubernetes.io/instance") == RELEASE, where
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", where
        assert labels.get("app.kubernetes.io/component"), where
        assert common.items() <= labels.items(), where
        if obj["kind"] in CLUSTER_KINDS:
            assert "namespace" not in obj["metadata"], where
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, where
        assert len(obj["metadata"]["name"]) <= 63, where


def test_config_is_the_operators_settings(
    rendered: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """config.json has every operator setting (namespace comes from POD_NAMESPACE) and the
    operator's loader accepts it; the Deployment mounts it, the TLS files and the ports."""
    path, objects = rendered
    values = _values(path)
    config, text = _config(objects)
    assert set(config) == set(field_names()) - {"namespace"}
    container = _container(objects)
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    config_path = env["TSNET2_OPERATOR_CONFIG"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in one(objects, "Deployment")["spec"]["template"]["spec"]
               ["volumes"]}
    assert volumes[mounts[str(Path(config_path).parent)]]["configMap"]["name"] == \
        _config_map(objects)["metadata"]["name"]
    (tmp_path / "config.json").write_text(text, encoding="utf-8")
    loaded = load_config(
        {"TSNET2_OPERATOR_CONFIG": str(tmp_path / "config.json"), "POD_NAMESPACE": NAMESPACE},
        require_webhook=True, require_namespace=True,
    )
    sc = values["sidecar"]
    assert loaded.namespace == NAMESPACE
    assert loaded.sidecar.backend == sc["backend"]
    assert loaded.sidecar.traffic_log_default == sc["trafficLog"]
    assert loaded.sidecar.traffic_log_sink == sc["trafficLogSink"]
    assert loaded.sidecar.traffic_log_max_bytes == sc["trafficLogRotation"]["maxBytes"]
    assert loaded.sidecar.traffic_log_keep == sc["trafficLogRotation"]["keep"]
    assert loaded.sidecar.audit_bypass_policy == sc["auditBypassPolicy"]
    assert loaded.sidecar.egress_port == values["egress"]["port"]
    assert loaded.sidecar.dns_upstream == values["dns"]["upstream"]
    assert loaded.sidecar.dns_cluster_domain == values["dns"]["clusterDomain"]
    assert loaded.native_sidecar == sc["nativeSidecar"]
    assert loaded.sidecar.cpu_request == sc["resources"]["requests"]["cpu"]
    assert loaded.sidecar.memory_limit == sc["resources"]["limits"]["memory"]
    assert loaded.sidecar.image_pull_policy == sc["image"]["pullPolicy"]
    assert loaded.install_crds is (not values["crds"]["install"])
    assert loaded.domain == values["operator"]["domain"]
    # The certificate files live in mounted Secret volumes of the right Secrets.
    secrets = {"webhook": f"{_fullname(values)}-webhook-tls",
               "control": f"{_fullname(values)}-control-tls"}
    files = [("webhook", loaded.webhook_cert_file), ("webhook", loaded.webhook_key_file)]
    if values["control"]["tls"]["enabled"]:
        files += [("control", loaded.control_tls_cert_file),
                  ("control", loaded.control_tls_key_file)]
    else:
        assert loaded.control_tls_cert_file == loaded.control_tls_key_file == ""
    for part, file in files:
        volume = volumes[mounts[str(Path(file).parent)]]
        assert volume["secret"]["secretName"] == secrets[part]
    # Ports: the listeners the config names are the container's named ports.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["webhook"] == loaded.webhook_port
    assert ports["control"] == int(loaded.control_addr.rpartition(":")[2])
    if values["metrics"]["enabled"]:
        assert ports["metrics"] == int(loaded.metrics_addr.rpartition(":")[2])
    else:
        assert loaded.metrics_addr == "" and "metrics" not in ports
    # Pods roll when the settings change.
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/config"] == hashlib.sha256(
        text.rstrip("\n").encode()).hexdigest()


def _fullname(values: dict[str, Any]) -> str:
    return values["fullnameOverride"] or f"{RELEASE}-tsnet2"


def test_deployment_args_and_security(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    """`tsnet2-operator --liveness ... [--peering NAME]`, replicas, PDB, spread, hardening."""
    path, objects = rendered
    values = _values(path)
    op = values["operator"]
    deploy = one(objects, "Deployment")
    container = _container(objects)
    args = container["args"]
    assert container["command"] == ["tsnet2-operator"]
    assert args[:2] == ["--liveness", f"http://0.0.0.0:{op['livenessPort']}/healthz"]
    if op["peering"]["enabled"]:
        name = op["peering"]["name"] or f"{_fullname(values)}-{NAMESPACE}"
        assert args[2:4] == ["--peering", name]
    else:
        assert "--peering" not in args
    assert by_kind(objects, "ClusterKopfPeering") == []  # the operator creates it
    assert deploy["spec"]["replicas"] == op["replicaCount"]
    pdbs = by_kind(objects, "PodDisruptionBudget")
    assert len(pdbs) == (1 if op["replicaCount"] > 1 else 0)
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    for pdb in pdbs:
        assert pdb["spec"]["selector"]["matchLabels"] == selector
    spread = deploy["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {
        "kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"]["matchLabels"] == selector for c in spread)
    pod_sc = deploy["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    # The Services of a release named "tsnet2" (tsnet2-webhook, tsnet2-control) would give
    # the pod Service-link variables TSNET2_WEBHOOK_PORT=tcp://... that the operator reads as
    # its own settings (it crash-looped on a real cluster).
    assert deploy["spec"]["template"]["spec"]["enableServiceLinks"] is False
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["scheme"] == ("HTTPS" if values["control"]["tls"]["enabled"] else "HTTP")


def _expected_images(values: dict[str, Any]) -> tuple[str, str]:
    """The operator's and the sidecar's image refs for ``values`` (see values.yaml): the
    sidecar's repository defaults to the operator's + ``-sidecar`` (the sidecar image),
    its tag to the operator's, then appVersion; the operator's digest is not the
    sidecar's."""
    op, sc = values["operator"]["image"], values["sidecar"]["image"]
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    expected_op = (f"{op['repository']}@{op['digest']}" if op["digest"]
                   else f"{op['repository']}:{op['tag'] or app_version}")
    repository = sc["repository"] or f"{op['repository']}-sidecar"
    expected_sc = (f"{repository}@{sc['digest']}" if sc["digest"]
                   else f"{repository}:{sc['tag'] or op['tag'] or app_version}")
    return expected_op, expected_sc


def test_images(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    """Operator image from repository/tag/digest; sidecar image from its own, defaulting to
    the operator's repository + ``-sidecar`` and the operator's tag."""
    path, objects = rendered
    expected_op, expected_sc = _expected_images(_values(path))
    assert _container(objects)["image"] == expected_op
    config, _ = _config(objects)
    assert config["image"] == expected_sc


@pytest.mark.parametrize(("sets", "operator", "sidecar"), [
    ((), "tsnet2:{v}", "tsnet2-sidecar:{v}"),
    (("operator.image.repository=reg.example/t2", "operator.image.tag=1.2.3"),
     "reg.example/t2:1.2.3", "reg.example/t2-sidecar:1.2.3"),
    # The operator's digest pins the full image only: the sidecar keeps a tag.
    (("operator.image.repository=reg.example/t2", f"operator.image.digest=sha256:{'a' * 64}"),
     f"reg.example/t2@sha256:{'a' * 64}", "reg.example/t2-sidecar:{v}"),
    (("sidecar.image.repository=reg.example/full", f"sidecar.image.digest=sha256:{'b' * 64}"),
     "tsnet2:{v}", f"reg.example/full@sha256:{'b' * 64}"),
    (("operator.image.tag=9.9.9", "sidecar.image.tag=1.0.0"),
     "tsnet2:9.9.9", "tsnet2-sidecar:1.0.0"),
], ids=["defaults", "operator-repo-and-tag", "operator-digest", "sidecar-digest",
        "sidecar-tag"])
def test_sidecar_image_defaults(helm: Helm, sets: tuple[str, ...], operator: str,
                                sidecar: str) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    objects = helm.template(*[arg for s in sets for arg in ("--set", s)])
    assert _container(objects)["image"] == operator.replace("{v}", app_version)
    config, _ = _config(objects)
    assert config["image"] == sidecar.replace("{v}", app_version)


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    key = ca.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert cert.signature_hash_algorithm is not None
    key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
               cert.signature_hash_algorithm)
    assert cert.issuer == ca.subject


def _dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


def test_webhook_configuration(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    """Every webhook points at the release's webhook Service (which targets the container's
    webhook port), excludes kube-system and the release namespace, and carries a caBundle that
    signed the served certificate (or defers to cert-manager's cainjector). Pod creation goes
    to /inject; ephemeral containers (UPDATE pods/ephemeralcontainers) to /ephemeral, from
    every other namespace and with no objectSelector."""
    path, objects = rendered
    values = _values(path)
    wh = values["webhook"]
    config = one(objects, "MutatingWebhookConfiguration")
    svc_name = f"{_fullname(values)}-webhook"
    svc = one(objects, "Service", svc_name)
    assert svc["spec"]["ports"][0]["targetPort"] == "webhook"
    assert svc["spec"]["selector"].items() <= \
        one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    hooks = config["webhooks"]
    expected = {"namespaces.inject.tsnet2.io": wh["failurePolicy"]}
    if wh["podOptIn"]["enabled"]:
        expected["pods.inject.tsnet2.io"] = wh["podOptIn"]["failurePolicy"]
    if wh["ephemeralContainers"]["enabled"]:
        expected["ephemeral.inject.tsnet2.io"] = wh["ephemeralContainers"]["failurePolicy"]
    assert {h["name"]: h["failurePolicy"] for h in hooks} == expected
    cert_manager = values["certManager"]["enabled"]
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    for hook in hooks:
        ephemeral = hook["name"] == "ephemeral.inject.tsnet2.io"
        assert hook["clientConfig"]["service"] == {
            "name": svc_name, "namespace": NAMESPACE,
            "path": "/ephemeral" if ephemeral else "/inject",
            "port": svc["spec"]["ports"][0]["port"]}
        assert hook["sideEffects"] == "None"
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["timeoutSeconds"] == wh["timeoutSeconds"]
        rule = ({"operations": ["UPDATE"], "resources": ["pods/ephemeralcontainers"]}
                if ephemeral else {"operations": ["CREATE"], "resources": ["pods"]})
        assert hook["rules"] == [{**rule, "apiGroups": [""], "apiVersions": ["v1"],
                                  "scope": "Namespaced"}]
        exprs = hook["namespaceSelector"]["matchExpressions"]
        assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": ["kube-system", NAMESPACE]} in exprs
        for extra in wh["namespaceSelectorExpressions"]:
            assert extra in exprs
        if ephemeral:  # every namespace, whatever its opt-in label; no object selector
            assert all(e["key"] != "tsnet2.io/inject" for e in exprs)
            assert "objectSelector" not in hook
        else:
            assert hook["objectSelector"] == wh["objectSelector"]
        if cert_manager:
            assert "caBundle" not in hook["clientConfig"]
        else:
            secret = secrets[f"{_fullname(values)}-webhook-tls"]
            ca_pem = base64.b64decode(hook["clientConfig"]["caBundle"])
            assert ca_pem == base64.b64decode(secret["data"]["ca.crt"])
            served = _cert(base64.b64decode(secret["data"]["tls.crt"]))
            _verify_signed_by(served, _cert(ca_pem))
            assert f"{svc_name}.{NAMESPACE}.svc" in _dns_names(served)
    if cert_manager:
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
            f"{NAMESPACE}/{svc_name}"
        assert not secrets
        certs = {c["metadata"]["name"]: c for c in by_kind(objects, "Certificate")}
        assert certs[svc_name]["spec"]["secretName"] == f"{_fullname(values)}-webhook-tls"
        assert f"{svc_name}.{NAMESPACE}.svc" in certs[svc_name]["spec"]["dnsNames"]
        issuer = values["certManager"]["issuerRef"]
        ref = certs[svc_name]["spec"]["issuerRef"]
        if issuer["name"]:
            assert ref == issuer and not by_kind(objects, "Issuer")
        else:
            issuers = {i["metadata"]["name"] for i in by_kind(objects, "Issuer")}
            assert ref["name"] in issuers and ref["kind"] == "Issuer"
        assert (f"{_fullname(values)}-control" in certs) == values["control"]["tls"]["enabled"]
    else:
        assert not by_kind(objects, "Certificate")
        assert (f"{_fullname(values)}-control-tls" in secrets) == \
            values["control"]["tls"]["enabled"]


def test_services_and_control_url(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    """Webhook/control/metrics Services; the sidecars' control URL is the control Service."""
    path, objects = rendered
    values = _values(path)
    full = _fullname(values)
    names = {s["metadata"]["name"] for s in by_kind(objects, "Service")}
    expected = {f"{full}-webhook", f"{full}-control"}
    if values["metrics"]["enabled"]:
        expected.add(f"{full}-metrics")
    assert names == expected
    control = one(objects, "Service", f"{full}-control")
    config, _ = _config(objects)
    scheme = "https" if values["control"]["tls"]["enabled"] else "http"
    default = f"{scheme}://{full}-control.{NAMESPACE}.svc:{control['spec']['ports'][0]['port']}"
    assert config["control_url"] == (values["sidecar"]["controlURL"] or default)


def test_rbac(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    """Bindings name the Deployment's ServiceAccount; CRD write rules exist only when the
    operator installs CRDs itself, peering rules (create too) whenever peering is on; the
    store rules are namespaced."""
    path, objects = rendered
    values = _values(path)
    sa = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    assert [s["metadata"]["name"] for s in by_kind(objects, "ServiceAccount")] == (
        [sa] if values["operator"]["serviceAccount"]["create"] else [])
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        binding = one(objects, kind)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    rules = one(objects, "ClusterRole")["rules"]
    verbs = {(g, r, v) for rule in rules for g in rule["apiGroups"]
             for r in rule["resources"] for v in rule["verbs"]}
    assert ("", "secrets", "get") not in verbs and not any(r == "*" for _, r, _ in verbs)
    assert ("authentication.k8s.io", "tokenreviews", "create") in verbs
    writes_crds = ("apiextensions.k8s.io", "customresourcedefinitions", "create") in verbs
    assert writes_crds is (not values["crds"]["install"])
    peering = values["operator"]["peering"]["enabled"]
    assert (("kopf.dev", "clusterkopfpeerings", "patch") in verbs) is peering
    assert (("kopf.dev", "clusterkopfpeerings", "create") in verbs) is peering
    # The cluster DNS lookup (tsnet2.io/dns without dns.upstream): one Service, by name.
    dns_rules = [rule for rule in rules if "services" in rule["resources"]]
    if values["dns"]["upstream"]:
        assert dns_rules == []
    else:
        assert dns_rules == [{"apiGroups": [""], "resources": ["services"],
                              "resourceNames": ["kube-dns"], "verbs": ["get"]}]
    role = one(objects, "Role")
    assert {r for rule in role["rules"] for r in rule["resources"]} == {
        "tailnetnodes", "tailnetusers", "tailnetauthkeys", "tailnetclaims", "tailnetcounters",
        "secrets"}
    # Secrets: read only the tailnet CA's (by name); create it (create takes no name).
    secret_rules = [rule for rule in role["rules"] if "secrets" in rule["resources"]]
    assert secret_rules == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [CA_SECRET],
         "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}]


def test_crd_toggles(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    """CRDs rendered iff crds.install (kopf's only with peering), keep policy iff crds.keep
    (never another value: Helm's uninstall neither keeps nor deletes those)."""
    path, objects = rendered
    values = _values(path)
    crds = by_kind(objects, "CustomResourceDefinition")
    names = {c["metadata"]["name"] for c in crds}
    if not values["crds"]["install"]:
        assert names == set()
        return
    expected = {f"tailnet{p}.tsnet2.io" for p in ("nodes", "users", "authkeys", "claims",
                                                  "counters")}
    if values["operator"]["peering"]["enabled"]:
        expected.add("clusterkopfpeerings.kopf.dev")
    assert names == expected
    for crd in crds:
        policy = crd["metadata"].get("annotations", {}).get("helm.sh/resource-policy")
        assert policy == ("keep" if values["crds"]["keep"] else None)


def test_optional_objects(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    """ServiceMonitor selects the metrics Service's port; NetworkPolicy names real ports."""
    path, objects = rendered
    values = _values(path)
    monitors = by_kind(objects, "ServiceMonitor")
    assert len(monitors) == int(values["metrics"]["enabled"]
                                and values["metrics"]["serviceMonitor"]["enabled"])
    for mon in monitors:
        svc = one(objects, "Service", f"{_fullname(values)}-metrics")
        assert mon["spec"]["selector"]["matchLabels"].items() <= \
            svc["metadata"]["labels"].items()
        assert mon["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
        assert values["metrics"]["serviceMonitor"]["labels"].items() <= \
            mon["metadata"]["labels"].items()
    policies = by_kind(objects, "NetworkPolicy")
    assert len(policies) == int(values["networkPolicy"]["enabled"])
    port_names = {p["name"] for p in _container(objects)["ports"]}
    for policy in policies:
        used = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert used <= port_names and {"webhook", "control"} <= used
        assert policy["spec"]["podSelector"]["matchLabels"] == \
            one(objects, "Deployment")["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "webhook.typo=1"],
        ["--set", "typo=1"],
        ["--set", "sidecar.resources.requests.gpu=1"],
        ["--set", "sidecar.backend=wireguard"],
        ["--set", "sidecar.nativeSidecar=maybe"],
        ["--set", "webhook.failurePolicy=Sometimes"],
        ["--set", "sidecar.resources.requests.memory=lots"],
        ["--set", "sidecar.trafficLogSink=loki"],
        ["--set", "egress.port=0"],
        ["--set", "egress.port=70000"],
        ["--set", "dns.upstream=kube-dns.kube-system.svc"],
        ["--set", "dns.clusterDomain=Cluster_Local"],
        ["--set", "dns.typo=1"],
    ],
    ids=["nested-unknown", "top-unknown", "deep-unknown", "bad-backend", "bad-native",
         "bad-failure-policy", "bad-quantity", "bad-traffic-log-sink", "bad-egress-port",
         "big-egress-port", "dns-upstream-name", "bad-cluster-domain", "dns-unknown"],
)
def test_schema_rejects(helm: Helm, args: list[str]) -> None:
    """values.schema.json refuses unknown keys and bad values in template and lint."""
    with pytest.raises(HelmError) as info:
        helm.template(*args)
    assert "values don't meet the specifications of the schema" in info.value.stderr
    with pytest.raises(HelmError):
        helm.run("lint", "--strict", str(CHART), *args)


def test_schema_rejects_unknown_key_in_values_file(helm: Helm, tmp_path: Path) -> None:
    """A typo in a -f values file fails too, naming the key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("sidecar:\n  trafficlog: off\n", encoding="utf-8")
    with pytest.raises(HelmError) as info:
        helm.template("-f", str(bad))
    assert "trafficlog" in info.value.stderr


@pytest.mark.parametrize(("sink", "flags"), [
    (None, ["--traffic-log", "-"]),
    ("stdout", ["--traffic-log", "-"]),
    ("file", ["--traffic-log", "/var/lib/tsnet2/traffic.jsonl", "--traffic-log-max-bytes",
              "1048576", "--traffic-log-keep", "3"]),
    ("both", ["--traffic-log", "-", "--traffic-log", "/var/lib/tsnet2/traffic.jsonl",
              "--traffic-log-max-bytes", "1048576", "--traffic-log-keep", "3"]),
])
def test_traffic_log_sink_value_reaches_the_sidecar(
        helm: Helm, tmp_path: Path, sink: str | None, flags: list[str]) -> None:
    """sidecar.trafficLogSink (default stdout) -> config.json's traffic_log_sink -> the
    operator's loader -> the injected tsnet2d's --traffic-log flags (rotation only with a
    file)."""
    args = ["--set", "sidecar.trafficLogRotation.maxBytes=1048576",
            "--set", "sidecar.trafficLogRotation.keep=3"]
    if sink is not None:
        args += ["--set", f"sidecar.trafficLogSink={sink}"]
    config, text = _config(helm.template(*args))
    assert config["traffic_log_sink"] == (sink or "stdout")
    (tmp_path / "config.json").write_text(text, encoding="utf-8")
    loaded = load_config({"TSNET2_OPERATOR_CONFIG": str(tmp_path / "config.json"),
                          "POD_NAMESPACE": NAMESPACE})
    pod = {"metadata": {"name": "web", "namespace": "apps",
                        "annotations": {"tsnet2.io/inject": "enabled"}},
           "spec": {"containers": [{"name": "app", "image": "a:1"}]}}
    decision = inject(pod, loaded.sidecar, native_sidecar=True)
    (sidecar,) = [op["value"][0] for op in decision.patch if op["path"] == "/spec/initContainers"]
    got = [a for i, a in enumerate(sidecar["args"])
           if (a.startswith("--traffic-log") and a != "--traffic-log-mode")
           or (i and sidecar["args"][i - 1].startswith("--traffic-log")
               and sidecar["args"][i - 1] != "--traffic-log-mode")]
    assert got == flags


@pytest.mark.parametrize(("args", "listen", "upstream", "domain"), [
    ([], "127.0.0.1:1055", None, "cluster.local"),
    (["--set", "egress.port=3128", "--set", "dns.upstream=10.43.0.10",
      "--set", "dns.clusterDomain=corp.example"], "127.0.0.1:3128", "10.43.0.10",
     "corp.example"),
])
def test_egress_and_dns_values_reach_the_sidecar(
        helm: Helm, tmp_path: Path, args: list[str], listen: str, upstream: str | None,
        domain: str) -> None:
    """egress.port and dns.* -> config.json -> the operator's loader -> the injected pod of
    a pod annotated tsnet2.io/egress and tsnet2.io/dns (without dns.upstream the operator
    looks kube-dns up at start-up, which a render cannot: such a pod is then refused)."""
    _config_json, text = _config(helm.template(*args))
    (tmp_path / "config.json").write_text(text, encoding="utf-8")
    loaded = load_config({"TSNET2_OPERATOR_CONFIG": str(tmp_path / "config.json"),
                          "POD_NAMESPACE": NAMESPACE})
    pod = {"metadata": {"name": "web", "namespace": "apps",
                        "annotations": {"tsnet2.io/inject": "enabled",
                                        "tsnet2.io/egress": "true", "tsnet2.io/dns": "true"}},
           "spec": {"containers": [{"name": "app", "image": "a:1"}]}}
    if upstream is None:
        with pytest.raises(InjectionRejected, match="knows no cluster DNS server"):
            inject(pod, loaded.sidecar, native_sidecar=True)
        return
    decision = inject(pod, loaded.sidecar, native_sidecar=True)
    (sidecar,) = [op["value"][0] for op in decision.patch if op["path"] == "/spec/initContainers"]
    args_ = sidecar["args"]
    assert args_[args_.index("--egress-listen") + 1] == listen
    assert args_[args_.index("--dns-upstream") + 1] == upstream
    (dns,) = [op["value"] for op in decision.patch if op["path"] == "/spec/dnsConfig"]
    assert dns["searches"] == [f"apps.svc.{domain}", f"svc.{domain}", domain]


def test_replicas_need_peering(helm: Helm) -> None:
    """Two replicas without kopf peering would both run the watch handlers: refused."""
    with pytest.raises(HelmError) as info:
        helm.template("--set", "operator.peering.enabled=false")
    assert "needs operator.peering.enabled=true" in info.value.stderr



def _image_user() -> tuple[int, int]:
    """The ``USER uid:gid`` of the Containerfile (the image's one non-root user)."""
    for line in (CHART.parents[1] / "Containerfile").read_text().splitlines():
        if line.startswith("USER "):
            uid, _, gid = line.split()[1].partition(":")
            return int(uid), int(gid or uid)
    raise AssertionError("the Containerfile has no USER line")


def test_default_operator_user_is_the_images_user() -> None:
    """The operator looks its uid up (getpwuid): a uid without a passwd entry in the image
    (the old default 65532) crash-looped it on a real cluster."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    pod_sc = defaults["operator"]["podSecurityContext"]
    assert (pod_sc["runAsUser"], pod_sc["runAsGroup"]) == _image_user()
