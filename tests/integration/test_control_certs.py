"""Certificates for tailnet names over real HTTP on 127.0.0.1 with a real SQLite file:
``POST /v1/cert`` and ``GET /v1/ca`` of the control server, and the daemon's NodeCerts
(key, CSR, files, CA bundle, renewal, restart, an old control server) against it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.test_control_server import control, register, run, within
from tsnet2.control import ca
from tsnet2.control.server import ControlServer
from tsnet2.control.sqlite_store import SQLiteStore
from tsnet2.control.store import StoreError
from tsnet2.controlclient import (
    AuthError,
    ControlClient,
    ControlError,
    ControlUnavailable,
    RegisterResult,
)
from tsnet2.daemon.certs import CA_BUNDLE_NAME, CertUnavailable, NodeCerts

DOMAIN = "tsnet2.internal"


def csr_for(*names: str, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


async def raw(server: ControlServer, method: str, path: str, *, credential: str | None = None,
              body: bytes | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    async with aiohttp.ClientSession() as http, http.request(
            method, server.url + path, data=body, headers=headers) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def test_issue_and_fetch_the_ca(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tsnet2.control")

    async def main() -> None:
        async with control(tmp_path / "c.db", cert_lifetime=3600) as (server, client):
            node = await register(client, await server.create_auth_key(), "web")
            fqdn = f"web.{DOMAIN}"
            result = await client.issue_cert(node.node_credential, csr_for(fqdn))
            chain = result.cert_chain.encode()
            leaf = x509.load_pem_x509_certificate(chain)
            ca_pem = await client.ca()
            assert chain.endswith(ca_pem.encode())
            leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem.encode()))
            life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
            assert life.total_seconds() == 3600 + ca.BACKDATE
            assert result.not_after == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
            assert server.cert_stats == {"issued": 1, "refused": 0}
            serial = format(leaf.serial_number, "x")
            assert any(f"issued certificate serial {serial} for node" in r.getMessage()
                       and f"names={fqdn}" in r.getMessage() for r in caplog.records)
            # The CA key is never in the log.
            record = await server.store.get_ca()
            assert record is not None
            secret_line = record.key_pem.splitlines()[1]
            assert all(secret_line not in r.getMessage() for r in caplog.records)
            # GET /v1/ca is public and is the PEM itself.
            status, text = await raw(server, "GET", "/v1/ca")
            assert status == 200 and text == ca_pem

    run(main)
    assert stat.S_IMODE(os.stat(tmp_path / "c.db").st_mode) == 0o600


def test_cert_refusals(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db") as (server, client):
            key = await server.create_auth_key(reusable=True)
            node = await register(client, key, "web")
            await register(client, key, "db")
            cred = node.node_credential
            with pytest.raises(AuthError, match="missing node credential") as e401:
                await client.issue_cert("", csr_for(f"web.{DOMAIN}"))
            assert e401.value.status == 401
            with pytest.raises(AuthError, match="invalid node credential"):
                await client.issue_cert("tsnet2-node-nope", csr_for(f"web.{DOMAIN}"))
            # Another node's name, or the domain itself: 403 with what it may have.
            for name in (f"db.{DOMAIN}", DOMAIN):
                with pytest.raises(AuthError, match=f"may not have a certificate for '{name}'; "
                                   f"it may ask for web.{DOMAIN}") as e403:
                    await client.issue_cert(cred, csr_for(f"web.{DOMAIN}", name))
                assert e403.value.status == 403
            bad = [
                (json.dumps({"csr": "nope"}).encode(), "not a PEM certificate signing request"),
                (json.dumps({}).encode(), "csr is required"),
                (json.dumps({"csr": "x" * (ca.MAX_CSR_PEM + 1)}).encode(),
                 f"at most {ca.MAX_CSR_PEM}"),
                (b"x" * (70 * 1024), "too large"),
                (b"{not json", "JSON"),
                (json.dumps({"csr": csr_for(f"web.{DOMAIN}"), "key": "x"}).encode(),
                 "unknown fields key"),
            ]
            for body, message in bad:
                status, reply = await raw(server, "POST", "/v1/cert", credential=cred,
                                          body=body)
                assert status == 400, (body[:40], reply)
                assert message in reply["error"], reply
            assert server.cert_stats["issued"] == 0
            assert server.cert_stats["refused"] == 5  # the CSR checks (not auth, not JSON)
            # No credential at all: refused before the body is looked at.
            status, reply = await raw(server, "POST", "/v1/cert", body=b"{}")
            assert status == 401

    run(main)


def test_replicas_on_one_store_agree_on_one_ca(tmp_path: Path) -> None:
    async def main() -> None:
        db = tmp_path / "c.db"
        async with SQLiteStore(db) as one, SQLiteStore(db) as two:
            servers = [ControlServer(one), ControlServer(two), ControlServer(one)]
            cas = await asyncio.gather(*(s.tailnet_ca() for s in servers))
            assert len({c.cert_pem for c in cas}) == 1
        async with control(db) as (_server, client):  # a restart keeps it
            assert (await client.ca()).encode() == cas[0].cert_pem

    run(main)


def test_cert_lifetime_is_validated(tmp_path: Path) -> None:
    async def main() -> None:
        async with SQLiteStore(tmp_path / "c.db") as store:
            for bad in (0.5, 0, -1, float("inf"), float("nan")):
                with pytest.raises(ValueError, match="cert_lifetime must be at least 1"):
                    ControlServer(store, cert_lifetime=bad)

    run(main)


# ---- the daemon's NodeCerts against the real server ---------------------------------------


class Recorder:
    """A CertMetrics that remembers what it was told."""

    def __init__(self) -> None:
        self.results: list[str] = []
        self.expiry = 0.0

    def tls_cert_renewal(self, result: str, not_after: float | None = None) -> None:
        self.results.append(result)
        if not_after is not None:
            self.expiry = not_after

    def set_tls_cert_expiry(self, not_after: float) -> None:
        self.expiry = not_after


@contextlib.asynccontextmanager
async def node_certs(tmp_path: Path, client: ControlClient, node: RegisterResult,
                     metrics: Recorder) -> AsyncIterator[NodeCerts]:
    certs = NodeCerts(tmp_path / "state" / "tls", bundle_dir=tmp_path / "run", metrics=metrics)
    (tmp_path / "run").mkdir(exist_ok=True)
    fqdn = str(node.node["fqdn"]).rstrip(".")
    certs.start(client, node.node_credential, lambda: fqdn)
    try:
        yield certs
    finally:
        await certs.stop()


async def changed(certs: NodeCerts, since: int, what: str) -> int:
    """Wait until the NodeCerts saw a change after count ``since``; return the new count."""
    return await within(certs.wait_changed(since), what, 60)


def test_node_certs_issue_files_contexts_and_renewal(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db", cert_lifetime=6) as (server, client):
            node = await register(client, await server.create_auth_key(), "web")
            fqdn = f"web.{DOMAIN}"
            metrics = Recorder()
            async with node_certs(tmp_path, client, node, metrics) as certs:
                with pytest.raises(CertUnavailable, match="being requested"):
                    certs.server_context()
                seen = await changed(certs, 0, "the first certificate")
                first = certs.info()
                assert first is not None and first.names == (fqdn,)
                assert metrics.results == ["ok"] and metrics.expiry == first.not_after
                tls = tmp_path / "state" / "tls"
                assert stat.S_IMODE((tls / "node.key").stat().st_mode) == 0o600
                assert (tls / "node.crt").read_bytes() == certs.chain_pem()
                ca_pem = (await client.ca()).encode()
                assert certs.ca_pem() == ca_pem == (tls / "ca.pem").read_bytes()
                bundle = tmp_path / "run" / CA_BUNDLE_NAME
                assert bundle.read_bytes() == ca_pem
                assert stat.S_IMODE(bundle.stat().st_mode) == 0o644
                key_before = (tls / "node.key").read_bytes()
                server_ctx = certs.server_context()
                client_ctx = certs.client_context()
                assert client_ctx.verify_mode == ssl.CERT_REQUIRED and client_ctx.check_hostname
                assert client_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
                assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
                assert len(client_ctx.get_ca_certs()) == 1  # the tailnet CA, nothing else
                # Renewal: 6 s certificates are renewed 4 s after issue.
                await changed(certs, seen, "the renewal")
                second = certs.info()
                assert second is not None and second.serial != first.serial
                assert second.not_after > first.not_after
                assert metrics.results == ["ok", "ok"]
                assert certs.server_context() is server_ctx  # the same object, reloaded
                assert (tls / "node.key").read_bytes() == key_before  # the same key
                assert server.cert_stats["issued"] == 2

    run(main)


def test_node_certs_reuse_the_saved_certificate_after_a_restart(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db", cert_lifetime=3600) as (server, client):
            node = await register(client, await server.create_auth_key(), "web")
            async with node_certs(tmp_path, client, node, Recorder()) as certs:
                await changed(certs, 0, "the first certificate")
                first = certs.info()
            assert first is not None and server.cert_stats["issued"] == 1
            metrics = Recorder()
            async with node_certs(tmp_path, client, node, metrics) as again:
                await changed(again, 0, "the saved certificate")
                assert again.info() == first
                assert metrics.results == [] and metrics.expiry == first.not_after
                assert again.server_context() is not None
            assert server.cert_stats["issued"] == 1
            # Renamed (another FQDN): the saved certificate is not used, a new one is asked
            # for (and refused here: the node is still called web).
            renamed = RegisterResult({**node.node, "fqdn": f"www.{DOMAIN}."},
                                     node.node_credential, node.domain)
            metrics = Recorder()
            async with node_certs(tmp_path, client, renamed, metrics) as other:
                await changed(other, 0, "the refused request")
                assert other.info() is None and metrics.results == ["error"]
                assert "may not have a certificate for 'www." in other.last_error
            # The same NodeCerts, node restarted under another name: the old name's
            # certificate is no longer served.
            async with node_certs(tmp_path, client, node, Recorder()) as same:
                await changed(same, 0, "the saved certificate")
                assert same.info() == first
                await same.stop()
                seen = same.changes
                same.start(client, node.node_credential, lambda: f"www.{DOMAIN}")
                await changed(same, seen, "the refused request for the new name")
                assert same.info() is None and same.chain_pem() is None
                with pytest.raises(CertUnavailable, match="may not have a certificate"):
                    same.server_context()

    run(main)


def test_node_certs_without_a_cert_endpoint(tmp_path: Path) -> None:
    """An old control server (no /v1/cert: 404): the node runs without a certificate and
    CertUnavailable says why."""
    async def main() -> None:
        app = web.Application()
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with ControlClient(f"http://127.0.0.1:{port}") as client:
                with pytest.raises(ControlError) as e:
                    await client.ca()
                assert e.value.status == 404
                node = RegisterResult({"fqdn": "web.x.example."}, "cred", "x.example")
                async with node_certs(tmp_path, client, node, Recorder()) as certs:
                    await changed(certs, 0, "giving up on certificates")
                    assert certs.unsupported is not None
                    with pytest.raises(CertUnavailable, match="issues no certificates"):
                        certs.server_context()
                    with pytest.raises(CertUnavailable, match="issues no certificates"):
                        certs.client_context()
                    assert certs.ca_pem() is None
        finally:
            await runner.cleanup()

    run(main)


def test_failed_requests_back_off_and_count(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db") as (server, client):
            node = await register(client, await server.create_auth_key(), "web")
            metrics = Recorder()
            bad = RegisterResult(node.node, "tsnet2-node-wrong", node.domain)
            async with node_certs(tmp_path, client, bad, metrics) as certs:
                seen = await changed(certs, 0, "the first failure")
                assert metrics.results == ["error"]
                with pytest.raises(CertUnavailable, match=r"the last request failed .*invalid "
                                   "node credential"):
                    certs.server_context()
                await changed(certs, seen, "the retry")
                assert metrics.results == ["error", "error"]

    run(main)


class NoCAStore(SQLiteStore):
    """A store whose CA cannot be read (e.g. the operator may not read its Secret)."""

    async def get_ca(self) -> Any:
        raise StoreError("kubernetes store: API server answered 403 Forbidden")


def test_a_store_that_cannot_hold_the_ca_is_503(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with NoCAStore(tmp_path / "c.db") as store:
            server = ControlServer(store)
            await server.start()
            try:
                async with ControlClient(server.url) as client:
                    node = await register(client, await server.create_auth_key(), "web")
                    with pytest.raises(ControlUnavailable, match="tailnet CA cannot be loaded"):
                        await client.issue_cert(node.node_credential, csr_for(f"web.{DOMAIN}"))
                    with pytest.raises(ControlUnavailable):
                        await client.ca()
            finally:
                await server.close()
        assert any("403 Forbidden" in r.getMessage() for r in caplog.records)

    run(main)
