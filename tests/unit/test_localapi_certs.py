"""The LocalAPI's certificate endpoints over a real Backend and NodeCerts (no node: the
backend's state and the certificate are set by the test): ``cert/<domain>?type=cert``
(chain, 404 other domain, 503 none yet), ``type=key``/``pair`` refused, ``tailnet-ca``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tsnet2.control import ca
from tsnet2.daemon.backend import Backend, DeviceConfig, NodeState
from tsnet2.daemon.certs import CERT_FILE, KEY_FILE, _check_chain
from tsnet2.daemon.localapi import LocalAPI, LocalAPIRequest, Reply

FQDN = "web.tail.example"


def get(api: LocalAPI, endpoint: str, **query: str) -> Reply:
    req = LocalAPIRequest("GET", endpoint, {k: [v] for k, v in query.items()},
                          cast(Any, None))
    reply = asyncio.run(api.dispatch(req))
    assert reply is not None
    return reply


def error(reply: Reply) -> str:
    return str(json.loads(reply.body)["error"])


@pytest.fixture
def api(tmp_path: Path) -> LocalAPI:
    backend = Backend(tmp_path / "state", DeviceConfig())
    backend.state = NodeState.RUNNING
    backend.self_node = {"fqdn": FQDN + ".", "name": "web"}
    return LocalAPI(backend)


def give_certificate(backend: Backend) -> bytes:
    """Issue a real chain for FQDN and install it the way NodeCerts does."""
    tls = backend.certs.tls_dir
    assert tls is not None
    tls.mkdir(parents=True)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (tls / KEY_FILE).write_bytes(key_pem)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, FQDN)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(FQDN)]), critical=False)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    authority = ca.load_ca(*ca.new_ca("tail.example"))
    chain = ca.issue_from_csr(authority, csr, [FQDN], lifetime=3600).chain_pem
    (tls / CERT_FILE).write_bytes(chain)
    ca_pem, info = _check_chain(chain, key_pem, FQDN)
    backend.certs._install(chain, ca_pem, info)
    return chain


@pytest.mark.parametrize("kind", ["key", "pair", ""])
def test_the_key_never_leaves(api: LocalAPI, kind: str) -> None:
    give_certificate(api.backend)
    reply = get(api, f"cert/{FQDN}", **({"type": kind} if kind else {}))
    assert reply.status == 403
    assert "the node's private key never leaves tsnet2d; use listen_tls" in error(reply)
    assert b"PRIVATE KEY" not in reply.body


def test_the_chain_and_the_ca(api: LocalAPI) -> None:
    chain = give_certificate(api.backend)
    reply = get(api, f"cert/{FQDN}", type="cert")
    assert (reply.status, reply.body, reply.content_type) == (
        200, chain, "application/x-pem-file")
    assert get(api, f"cert/{FQDN.upper()}.", type="cert").body == chain
    ca_reply = get(api, "tailnet-ca")
    assert ca_reply.status == 200 and chain.endswith(ca_reply.body)
    other = get(api, "cert/db.tail.example", type="cert")
    assert other.status == 404
    assert error(other) == f"db.tail.example is not a cert domain of this node; it has {FQDN}"
    bad = get(api, f"cert/{FQDN}", type="der")
    assert bad.status == 400 and "only type=cert" in error(bad)


def test_no_certificate_yet_is_503_with_the_reason(api: LocalAPI) -> None:
    reply = get(api, f"cert/{FQDN}", type="cert")
    assert reply.status == 503
    assert "has no TLS certificate" in error(reply)
    ca_reply = get(api, "tailnet-ca")
    assert ca_reply.status == 503 and "no TLS certificate" in error(ca_reply)
    api.backend.certs.unsupported = "the control server http://c issues no certificates"
    assert "issues no certificates" in error(get(api, f"cert/{FQDN}", type="cert"))


def test_a_node_not_running_is_503(api: LocalAPI) -> None:
    api.backend.state = NodeState.STARTING
    reply = get(api, f"cert/{FQDN}", type="cert")
    assert reply.status == 503 and "not running yet" in error(reply)
