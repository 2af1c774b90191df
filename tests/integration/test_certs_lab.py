"""Certificates for tailnet names in the lab: a real control server (``--cert-lifetime``) and
a real tsnet2d (``--up``) in a network namespace. The node gets a certificate for its FQDN
that Python's ssl verifies with only the tailnet CA, the CA bundle appears next to the
socket, ``tsnet2 cert`` shows it, the LocalAPI refuses the key, and the certificate is
renewed (new serial, metric, log line) and its key reused across a daemon restart."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import urllib.request
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

import tsnet2
from tsnet2.daemon.certs import CA_BUNDLE_NAME
from tsnet2.lab.tailnet import DaemonProc, LocalTailnet

from .tailnet import running_tailnet, wait_for

pytestmark = pytest.mark.netns

DOMAIN = "tail-scale.ts.net"
FQDN = f"web.{DOMAIN}"
PORT = 9464
LIFETIME = 30
"""Seconds: renewed 20 s after issue. Long enough that the checks before the renewal see
one certificate even on a loaded machine (they compare only what a renewal keeps), short
enough that the test waits for a real renewal."""
WAIT = 120.0


def scrape(net: LocalTailnet, d: DaemonProc) -> dict[tuple[str, frozenset[Any]], float]:
    with (net.lab.in_netns(d.node.netns),
          urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10) as r):
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tsnet2.cli", *argv], capture_output=True,
                          text=True, timeout=60)


def chain_now(local: tsnet2.LocalClient) -> bytes | None:
    try:
        return local.cert_pem(FQDN)
    except tsnet2.LocalAPIError as exc:
        assert exc.status == 503, exc
        return None


def serial_of(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def handshake(chain: bytes, key: bytes, ca_file: str, name: str, tmp: os.PathLike[str]) -> str:
    """A TLS handshake: a server with ``chain``/``key``, a client trusting only ``ca_file``
    and verifying ``name``. Returns the peer's verified subjectAltName DNS names."""
    chain_file, key_file = os.path.join(tmp, "chain.pem"), os.path.join(tmp, "key.pem")
    with open(chain_file, "wb") as f:
        f.write(chain)
    with open(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(chain_file, key_file)
    client = ssl.create_default_context(cafile=ca_file)  # the tailnet CA and nothing else
    a, b = socket.socketpair()

    def serve() -> None:
        with contextlib.suppress(ssl.SSLError, OSError), \
                server.wrap_socket(a, server_side=True) as s:
            s.sendall(b"ok")

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client.wrap_socket(b, server_hostname=name) as c:
            assert c.recv(2) == b"ok"
            cert = c.getpeercert()
            return ",".join(v for k, v in cert.get("subjectAltName", ()) if k == "DNS")
    finally:
        b.close()
        t.join(30)
        a.close()


def test_node_certificate_issue_use_cli_refusals_renewal_restart(
        tmp_path: os.PathLike[str]) -> None:
    with running_tailnet(control_args=("--cert-lifetime", str(LIFETIME))) as net:
        d = net.add_daemon("web", auth_key=net.authkey(),
                           extra_args=("--up", "--hostname", "web",
                                       "--metrics-addr", f"127.0.0.1:{PORT}"))
        local = tsnet2.LocalClient(str(d.socket_path))
        chain = wait_for(lambda: chain_now(local), WAIT, "the node's first certificate")
        first = serial_of(chain)
        leaf = x509.load_pem_x509_certificate(chain)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [FQDN]

        # The CA bundle next to the socket (0644), the same as the LocalAPI's and the chain's.
        bundle = d.socket_path.parent / CA_BUNDLE_NAME
        ca_pem = local.tailnet_ca_pem()
        assert bundle.read_bytes() == ca_pem and chain.endswith(ca_pem)
        assert stat.S_IMODE(bundle.stat().st_mode) == 0o644
        key_file = d.state_dir / "tls" / "node.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_bytes()

        # Python's ssl with only the tailnet CA verifies the certificate for the FQDN (the
        # test reads the key from the state dir: it runs as root; apps never can).
        assert handshake(chain, key, str(bundle), FQDN, tmp_path) == FQDN
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            handshake(chain, key, str(bundle), f"db.{DOMAIN}", tmp_path)

        # The LocalAPI: the key never leaves the daemon; other domains are not ours.
        for kind in ("key", "pair"):
            with pytest.raises(tsnet2.LocalAPIError) as refused:
                local.get(f"cert/{FQDN}?type={kind}")
            assert refused.value.status == 403
            assert "the node's private key never leaves tsnet2d; use listen_tls" in \
                refused.value.body
        with pytest.raises(tsnet2.LocalAPIError) as other:
            local.cert_pem(f"db.{DOMAIN}")
        assert other.value.status == 404 and FQDN in other.value.body

        # tsnet2 cert, as a user runs it.
        sock = str(d.socket_path)
        out = cli("cert", "--socket", sock)
        assert out.returncode == 0, out.stderr
        assert f"Names:       {FQDN}\n" in out.stdout
        assert f"Issuer:      O=tsnet2,CN=tsnet2 tailnet CA {DOMAIN}\n" in out.stdout
        for label in ("Serial:", "Not before:", "Not after:", "Time left:", "SHA-256:"):
            assert label in out.stdout
        doc = json.loads(cli("cert", "--socket", sock, "--json").stdout)
        assert doc["domain"] == FQDN and doc["names"] == [FQDN]
        assert 0 < doc["seconds_left"] <= LIFETIME
        assert len(doc["sha256_fingerprint"].split(":")) == 32
        pem = cli("cert", "--socket", sock, "--pem").stdout.encode()
        assert pem.endswith(ca_pem) and pem.count(b"BEGIN CERTIFICATE") == 2
        assert cli("cert", "--socket", sock, "--ca").stdout.encode() == ca_pem

        # Renewal: a new serial, the metric and the log line.
        renewed = wait_for(lambda: (c := chain_now(local)) and serial_of(c) != first and c,
                           WAIT, "the renewed certificate")
        second = x509.load_pem_x509_certificate(renewed)
        assert second.not_valid_after_utc > leaf.not_valid_after_utc
        samples = wait_for(
            lambda: (m := scrape(net, d)) and m.get(
                ("tsnet2_tls_cert_renewals_total", frozenset({("result", "ok")})), 0) >= 2
            and m, WAIT, "the renewal in the metrics")
        expiry = samples[("tsnet2_tls_cert_expiry_timestamp_seconds", frozenset())]
        assert expiry >= second.not_valid_after_utc.timestamp()
        log = wait_for(lambda: (t := d.log_text()) and
                       f"serial {format(second.serial_number, 'x')}" in t and t,
                       WAIT, "the renewal's log line")
        assert f"TLS certificate renewed for {FQDN}: serial " \
            f"{format(second.serial_number, 'x')}, not_after " in log
        assert "BEGIN" not in log  # no PEM (let alone the key) in the daemon's log

        # A restart reuses the key (and the saved certificate while it is valid).
        saved = d.state_dir / "tls" / "node.crt"
        net.stop_daemon("web")
        net.start_daemon("web")
        wait_for(lambda: chain_now(local), WAIT, "a certificate after the restart")
        assert key_file.read_bytes() == key
        assert saved.exists()
