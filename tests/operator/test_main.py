"""The ``tsnet2-operator`` entry point without a cluster: --help, exit statuses, docs drift.

Runs the real command (``python -m tsnet2_operator``) in a subprocess; every case here stops
before kopf starts, so no API server is needed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tsnet2_operator.config import FIELDS, ConfigError, OperatorConfig, load_config
from tsnet2_operator.control import ControlSettings

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "operator.md"
GOOD = {
    "TSNET2_CONTROL_URL": "http://tsnet2-control.tsnet2-system.svc:8440",
    "TSNET2_WEBHOOK_CERT_FILE": "/c.pem",
    "TSNET2_WEBHOOK_KEY_FILE": "/k.pem",
    "TSNET2_NAMESPACE": "tsnet2-system",
}


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the entry point with a clean tsnet2 environment plus ``env``."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("TSNET2_") and k not in ("POD_NAMESPACE", "KUBECONFIG")}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "operator")])
    base["COLUMNS"] = "100"
    base["KUBECONFIG"] = "/nonexistent/kubeconfig"  # never reach a real cluster
    return subprocess.run(
        [sys.executable, "-m", "tsnet2_operator", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_the_flags_and_matches_the_docs() -> None:
    result = run(["--help"])
    assert result.returncode == 0, result.stderr
    for flag in ("--liveness URL", "--peering NAME", "--priority N", "--verbose"):
        assert flag in result.stdout
    doc = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- help:[^\n]*-->\n```\n(.*?)```", doc, re.S)
    assert block is not None, "docs/operator.md lost its --help block"
    assert block.group(1) == result.stdout, "docs/operator.md --help block is stale"


def test_docs_table_names_every_setting() -> None:
    doc = DOC.read_text(encoding="utf-8")
    for f in FIELDS:
        assert f"`{f.env}`" in doc, f.env
        assert re.search(rf"^\| [^|]*\b{f.key}\b", doc, re.M), f.key


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"TSNET2_BACKEND": "ebpf"}, "TSNET2_BACKEND: invalid value 'ebpf'"),
        ({"TSNET2_NAMESPACE": ""}, "TSNET2_NAMESPACE: must not be empty"),
        ({"TSNET2_CONTROL_ADDR": "8440"}, "TSNET2_CONTROL_ADDR: '8440' is not HOST:PORT"),
        ({"TSNET2_CONTROL_ADDR": "0.0.0.0:99999"}, "port 99999 is outside"),
        ({"TSNET2_SWEEP_INTERVAL": "0"}, "TSNET2_SWEEP_INTERVAL: '0' must be a positive"),
        ({"TSNET2_EPHEMERAL_TIMEOUT": "soon"}, "not a number of seconds"),
        ({"TSNET2_INSTALL_CRDS": "maybe"}, "TSNET2_INSTALL_CRDS: invalid value 'maybe'"),
        ({"TSNET2_DOMAIN": "-bad-"}, "TSNET2_DOMAIN"),
        ({"TSNET2_CONTROL_TLS_CERT_FILE": "/c.pem"}, "TSNET2_CONTROL_TLS_KEY_FILE"),
        ({"TSNET2_CONTROL_URL": ""}, "control_url is required"),
        # What a Service named tsnet2-webhook gives a pod that keeps Service links on.
        ({"TSNET2_WEBHOOK_PORT": "tcp://10.96.0.43:443"},
         "TSNET2_WEBHOOK_PORT: 'tcp://10.96.0.43:443' is not a port number; it looks like a "
         "Kubernetes Service-link variable"),
    ],
)
def test_bad_setting_exits_2_naming_it(env: dict[str, str], needle: str) -> None:
    result = run([], {**GOOD, **env})
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_namespace_exits_2() -> None:
    env = {k: v for k, v in GOOD.items() if k != "TSNET2_NAMESPACE"}
    result = run([], env)
    assert result.returncode == 2
    assert "namespace is required: set TSNET2_NAMESPACE" in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--priority", "3"], "--priority needs --peering"),
        (["--peering", " "], "--peering needs a non-empty NAME"),
        (["--peering", "p", "--priority", "high"], "invalid int value"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flag_exits_2(args: list[str], needle: str) -> None:
    result = run(args, GOOD)
    assert result.returncode == 2
    assert needle in result.stderr


def test_no_credentials_exits_1() -> None:
    """Good settings but no kubeconfig: a clear message, status 1, no traceback."""
    result = run([], GOOD)
    assert result.returncode == 1, result.stderr
    assert "no Kubernetes credentials" in result.stderr
    assert "Traceback" not in result.stderr


def test_pod_namespace_fallback_and_precedence() -> None:
    base = {k: v for k, v in GOOD.items() if k != "TSNET2_NAMESPACE"}
    assert load_config({**base, "POD_NAMESPACE": "ops"}).namespace == "ops"
    assert load_config({**base, "POD_NAMESPACE": "ops", "TSNET2_NAMESPACE": "t"}).namespace == "t"
    assert load_config(base).namespace == ""  # only the entry point requires it


def test_control_settings_from_config() -> None:
    config = load_config({
        **GOOD,
        "TSNET2_CONTROL_ADDR": "[::]:9440",
        "TSNET2_CONTROL_TLS_CERT_FILE": "/t.crt",
        "TSNET2_CONTROL_TLS_KEY_FILE": "/t.key",
        "TSNET2_DOMAIN": "corp.example",
        "TSNET2_EPHEMERAL_TIMEOUT": "120",
        "TSNET2_SWEEP_INTERVAL": "2.5",
        "TSNET2_INSTALL_CRDS": "false",
        "TSNET2_CERT_LIFETIME": "3600",
    })
    settings = ControlSettings.from_config(config)
    assert settings == ControlSettings(
        namespace="tsnet2-system", host="::", port=9440, domain="corp.example",
        ephemeral_timeout=120.0, sweep_interval=2.5, tls_cert="/t.crt", tls_key="/t.key",
        cert_lifetime=3600.0,
    )
    assert config.install_crds is False
    defaults = ControlSettings.from_config(OperatorConfig(namespace="n"))
    assert (defaults.host, defaults.port, defaults.tls_cert) == ("0.0.0.0", 8440, None)
    assert defaults.cert_lifetime == 90 * 86400.0
    for bad in ("0.5", "0", "-1", "inf", "soon"):
        with pytest.raises(ConfigError, match="TSNET2_CERT_LIFETIME"):
            load_config({**GOOD, "TSNET2_CERT_LIFETIME": bad})


def test_the_control_server_issues_certificates_for_cert_lifetime() -> None:
    """The chart's control.certLifetime (cert_lifetime) reaches the ControlServer the
    operator runs: what POST /v1/cert gives a node."""
    from kubernetes import client as k8s
    from tsnet2_operator.control import ControlRuntime

    with k8s.ApiClient() as api:
        runtime = ControlRuntime(api, ControlSettings(namespace="n", cert_lifetime=3600.0))
        assert runtime.server.cert_lifetime == 3600.0
        assert ControlRuntime(api, ControlSettings(namespace="n")).server.cert_lifetime == (
            90 * 86400.0)


def test_peering_identity_needs_no_passwd_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf's own identity starts with ``getpass.getuser()``, a ``KeyError`` for a uid
    without a passwd entry (the chart's old default 65532 crash-looped the operator on a
    real cluster); the operator passes an identity of its own to ``kopf.run``."""
    import getpass
    import pwd

    import kopf
    import tsnet2_operator.__main__ as entry
    from kopf._core.engines import peering

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME", "POD_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(KeyError):
        getpass.getuser()
    with pytest.raises(KeyError):
        peering.detect_own_id(manual=False)  # what kopf.run does without an identity
    seen: dict[str, object] = {}

    def fake_run(**kwargs: object) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(kopf, "run", fake_run)
    monkeypatch.setattr(entry, "load_config", lambda require_namespace: object())
    monkeypatch.setattr(entry, "load_api_client",
                        lambda: type("Api", (), {"close": lambda self: None})())
    monkeypatch.setattr(entry, "build_operator_registry", lambda c, a, peering: (None, None))
    assert entry.main(["--peering", "tsnet2"]) == 0
    identity = str(seen["identity"])
    assert identity.startswith(f"{os.uname().nodename}/{os.getpid()}/"), identity
    assert entry.own_identity() != entry.own_identity()  # replicas never share one
