"""tsnet2.daemon.certtool: the child process that does the node's X.509 work, and
NodeCerts' runner of it (real child processes, no control server)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tsnet2.daemon.certs import CertToolError, run_certtool


def test_csr_creates_the_key_once_and_check_refuses_a_bad_chain(tmp_path: Path) -> None:
    key = tmp_path / "tls" / "node.key"
    first = asyncio.run(run_certtool("csr", key, "a.ts.example"))
    assert first["created_key"] is True
    assert first["csr"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    pem = key.read_bytes()
    again = asyncio.run(run_certtool("csr", key, "a.ts.example"))
    assert again["created_key"] is False and key.read_bytes() == pem
    with pytest.raises(CertToolError, match="must hold the node's certificate and the CA") as e:
        asyncio.run(run_certtool("check", key, "a.ts.example", b"not a chain"))
    assert not e.value.key_problem


def test_a_key_that_cannot_be_created_is_a_key_problem(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CertToolError, match="the node's TLS key") as e:
        asyncio.run(run_certtool("csr", blocker / "node.key", "a.ts.example"))
    assert e.value.key_problem


def test_usage() -> None:
    out = subprocess.run([sys.executable, "-m", "tsnet2.daemon.certtool", "sign"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "usage:" in out.stderr


def test_the_daemon_does_not_load_x509_for_its_certificate() -> None:
    """The point of the child: the daemon loads cryptography's Ed25519 (the traffic log's
    signatures) but not its X.509 code."""
    code = ("import sys, tsnet2.daemon.certs, tsnet2.daemon.server; "
            "print(any(m.startswith('cryptography.x509') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
