"""An operator run as a local subprocess by a test (its log, polling, failing, stopping), and
the pods such tests create through its webhook."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s


def http_ok(url: str) -> bool:
    """True when ``GET url`` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def log_tail(path: Path, size: int = 6000) -> str:
    """The last ``size`` bytes of a log, as text."""
    data = path.read_bytes()
    return data[-size:].decode("utf-8", "replace")


@dataclass
class OperatorRun:
    """``python -m tsnet2_operator`` started by a test, logging to ``log_path``."""

    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """The whole log so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def fail(self, message: str) -> None:
        """Fail the test with the log's tail."""
        pytest.fail(f"{message}; operator log {self.log_path}:\n{log_tail(self.log_path)}")

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll ``check`` until true (returns the seconds it took); fail the test on a
        timeout or if the operator exits meanwhile."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.popen.poll() is not None:
                self.fail(f"operator exited with {self.popen.returncode} while waiting for "
                          f"{what}")
            if check():
                return time.monotonic() - start
            time.sleep(0.1)
        self.fail(f"timed out after {timeout}s waiting for {what}")
        raise AssertionError  # unreachable: pytest.fail raises

    def stop(self, grace: float = 20.0) -> int:
        """SIGTERM (by pid) unless it already exited, then wait; the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def create_pod(api: k8s.ApiClient, namespace: str, name: str, *,
               annotations: dict[str, str] | None = None,
               labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Create a one-container pod (through the admission webhooks); the stored object as
    plain JSON (as the webhook patched it)."""
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}, "labels": labels or {}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
    }
    resp = k8s.CoreV1Api(api).create_namespaced_pod(namespace, body, _preload_content=False)
    try:
        created: dict[str, Any] = json.loads(resp.data)
    finally:
        resp.release_conn()
    return created
