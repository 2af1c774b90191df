"""The node's TLS certificate and the tailnet CA, as the daemon's TLS code uses them.

:class:`NodeCerts` belongs to the backend (``Backend.certs``). When the node reaches RUNNING
the backend calls :meth:`NodeCerts.start`; one task it owns then:

1. has the node's key, ``<state dir>/tls/node.key`` (EC P-256, mode 0600, created once and
   reused across restarts; it never leaves the daemon's container);
2. loads ``tls/node.crt`` and ``tls/ca.pem`` from a previous run if the certificate is still
   valid, matches the key and names the node's current FQDN;
3. otherwise, and whenever a third of the certificate's lifetime is left, sends a CSR for
   the FQDN over the node's control session (``POST /v1/cert``), checks the chain it gets
   (our key, our name, signed by the CA in it), stores it, loads it into the one server
   :class:`ssl.SSLContext`, writes the CA bundle next to the daemon's socket
   (:data:`CA_BUNDLE_NAME`, mode 0644, atomic rename) and logs one line (serial, not_after);
4. retries a failed request with exponential backoff (:data:`RETRY_MIN` .. :data:`RETRY_MAX`
   seconds, and never longer than a quarter of the time the current certificate has left).

The X.509 work (making the key, the CSR, checking a chain) runs in a short-lived child
process, :mod:`tsnet2.daemon.certtool`, so the daemon does not carry ``cryptography``'s X.509
code and OpenSSL state for good (about 2.7 MB); the daemon loads the result with :mod:`ssl`.
The server context is made when a TLS listener first asks for it.

A control server without ``/v1/cert`` (404: an older ``tsnet2 control``) means the node runs
without a certificate; :class:`CertUnavailable` says so. :meth:`NodeCerts.stop` cancels and
awaits the task (the backend's teardown). See docs/certs.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tsnet2.controlclient import ControlClient, ControlError
from tsnet2.proto.codes import ErrorCode

__all__ = [
    "CA_BUNDLE_NAME",
    "CertInfo",
    "CertMetrics",
    "CertUnavailable",
    "NodeCerts",
    "cert_info",
]

log = logging.getLogger("tsnet2d.certs")

CA_BUNDLE_NAME = "tailnet-ca.pem"
"""The tailnet CA bundle's file name, written next to the daemon's socket (in a pod: on the
shared emptyDir, ``/var/run/tsnet2/tailnet-ca.pem``) for apps that verify tailnet TLS."""
TLS_DIR = "tls"
"""The directory under the state dir that holds the key, the certificate and the CA."""
KEY_FILE = "node.key"
"""The node's TLS private key (PKCS#8 PEM, 0600) in :data:`TLS_DIR`."""
CERT_FILE = "node.crt"
"""The node's certificate chain (leaf, then CA) in :data:`TLS_DIR`."""
CA_FILE = "ca.pem"
"""The tailnet CA certificate in :data:`TLS_DIR`."""
SERVER_BACKDATE = 60.0
"""Seconds the control server back-dates ``not_before``; the lifetime the renewal time is
computed from starts that much after ``not_before``."""
RENEW_LEFT = 1 / 3
"""Renew when this fraction of the certificate's lifetime is left."""
RETRY_MIN = 1.0
"""First pause (seconds) after a failed certificate request; it doubles each time."""
RETRY_MAX = 300.0
"""Longest pause (seconds) between attempts."""
MAX_PEM = 64 * 1024
"""Largest certificate or key file read from the state dir."""
TOOL_TIMEOUT = 60.0
"""Seconds one :mod:`tsnet2.daemon.certtool` run may take (a loaded machine starts Python
slowly); it is killed after that and the attempt counts as failed."""


class CertUnavailable(Exception):
    """The node has no certificate (or the tailnet CA is unknown) right now; the message
    says why and what to do. ``code`` is :data:`ErrorCode.NO_CERTIFICATE`."""

    code = ErrorCode.NO_CERTIFICATE


class CertToolError(ValueError):
    """A :mod:`tsnet2.daemon.certtool` run failed; ``key_problem`` when the node's key
    cannot be read or created (the node then runs without a certificate)."""

    def __init__(self, message: str, *, key_problem: bool = False) -> None:
        super().__init__(message)
        self.key_problem = key_problem


async def run_certtool(command: str, key: Path, fqdn: str, stdin: bytes = b"") -> Any:
    """Run ``python -m tsnet2.daemon.certtool command key fqdn`` and return its JSON.

    The child gets this process's Python and finds this copy of the package; it is killed
    after :data:`TOOL_TIMEOUT` seconds (or when the caller is cancelled). Raises
    :class:`CertToolError` with the tool's message."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tsnet2.daemon.certtool", command, str(key), fqdn,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    try:
        async with asyncio.timeout(TOOL_TIMEOUT):
            out, err = await proc.communicate(stdin)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise CertToolError(lines[-1] if lines else f"certtool {command} exited with "
                            f"status {proc.returncode}", key_problem=proc.returncode == 3)
    try:
        return json.loads(out)
    except ValueError:
        raise CertToolError(f"certtool {command} printed no JSON") from None


def _info_from_json(doc: dict[str, Any]) -> CertInfo:
    return CertInfo(**{**doc, "names": tuple(doc["names"])})


class CertMetrics(Protocol):
    """What :class:`NodeCerts` reports to (``tsnet2.daemon.metrics.Metrics`` fits)."""

    def tls_cert_renewal(self, result: str, not_after: float | None = None) -> None:
        """A certificate request ended ("ok"/"error")."""

    def set_tls_cert_expiry(self, not_after: float) -> None:
        """The certificate in use expires at ``not_after``."""


@dataclasses.dataclass(frozen=True)
class CertInfo:
    """What a certificate says, for status, the CLI and logs."""

    names: tuple[str, ...]
    """The DNS names of its subjectAltName."""
    subject: str
    issuer: str
    serial: str
    """Serial number, lowercase hex."""
    not_before: float
    not_after: float
    fingerprint: str
    """SHA-256 of the DER certificate, uppercase hex pairs joined by ``:``."""

    def to_json(self) -> dict[str, Any]:
        """A JSON object: the fields, times as RFC 3339 UTC."""
        return {
            "names": list(self.names), "subject": self.subject, "issuer": self.issuer,
            "serial": self.serial, "not_before": _rfc3339(self.not_before),
            "not_after": _rfc3339(self.not_after), "sha256_fingerprint": self.fingerprint,
        }


def _rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _pem_blocks(pem: bytes) -> list[bytes]:
    """The ``CERTIFICATE`` PEM blocks of ``pem``, in order."""
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    out: list[bytes] = []
    pos = 0
    while True:
        start = pem.find(begin, pos)
        if start < 0:
            return out
        stop = pem.find(end, start)
        if stop < 0:
            return out
        out.append(pem[start:stop + len(end)] + b"\n")
        pos = stop + len(end)


def cert_info(pem: bytes) -> CertInfo:
    """Describe the first certificate of ``pem``; raises ValueError if there is none."""
    from cryptography import x509  # lazy: ~0.7 MB, only once certificates are used
    from cryptography.hazmat.primitives import serialization

    blocks = _pem_blocks(pem)
    if not blocks:
        raise ValueError("no PEM certificate")
    cert = x509.load_pem_x509_certificate(blocks[0])
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return CertInfo(
        names=names, subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        fingerprint=":".join(digest[i:i + 2] for i in range(0, len(digest), 2)),
    )


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_PEM + 1)
    if len(data) > MAX_PEM:
        raise ValueError(f"{path} is larger than {MAX_PEM} bytes")
    return data


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)


def _load_or_create_key(path: Path) -> bytes:
    """The node's key PEM: read it, or create it (EC P-256, 0600) exactly once."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created meanwhile: use that one
        return _read(path)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    log.info("created the node's TLS key %s", path)
    return pem


def _make_csr(key_pem: bytes, fqdn: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the node's TLS key is not an EC key; remove it to make a new one")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(fqdn)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _check_chain(chain_pem: bytes, key_pem: bytes, fqdn: str) -> tuple[bytes, CertInfo]:
    """Check that ``chain_pem`` is leaf + CA, the leaf for our key and ``fqdn``, signed by
    that CA and valid now; return the CA PEM and the leaf's info. Raises ValueError."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    blocks = _pem_blocks(chain_pem)
    if len(blocks) < 2:
        raise ValueError("the certificate chain must hold the node's certificate and the CA")
    leaf = x509.load_pem_x509_certificate(blocks[0])
    ca = x509.load_pem_x509_certificate(blocks[-1])
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ValueError("the certificate is not for the node's key")
    info = cert_info(blocks[0])
    if fqdn not in info.names:
        raise ValueError(f"the certificate names {', '.join(info.names) or 'nothing'}, "
                         f"not {fqdn}")
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the certificate is not signed by the CA in its chain: {exc}") \
            from None
    except Exception as exc:  # cryptography's InvalidSignature
        raise ValueError(f"the certificate's signature does not verify: {exc!r}") from None
    if info.not_after <= time.time():
        raise ValueError(f"the certificate expired at {_rfc3339(info.not_after)}")
    return blocks[-1], info


class NodeCerts:
    """The node's certificate (for its FQDN and ``cert_domains``) and the tailnet CA."""

    def __init__(self, tls_dir: Path | None = None, *, bundle_dir: Path | None = None,
                 metrics: CertMetrics | None = None) -> None:
        """``tls_dir``: where key, certificate and CA live (``<state dir>/tls``); None: the
        node never gets a certificate. ``bundle_dir``: where :data:`CA_BUNDLE_NAME` is
        written (the socket's directory). ``metrics``: told of every request."""
        self.tls_dir = tls_dir
        self.bundle_dir = bundle_dir
        self.metrics = metrics
        self.last_error = ""
        """Why the last certificate request failed ("" after a success)."""
        self.unsupported: str | None = None
        """Set when the control server issues no certificates: why."""
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None
        self._client_ca: bytes | None = None
        self._ca_pem: bytes | None = None
        self._chain_pem: bytes | None = None
        self._info: CertInfo | None = None
        self._task: asyncio.Task[None] | None = None
        self.changes = 0
        """Counts certificate events (see :meth:`wait_changed`)."""
        self._changed = asyncio.Event()

    def configure(self, *, bundle_dir: Path | None = None,
                  metrics: CertMetrics | None = None) -> None:
        """Set the CA bundle's directory and the metrics (the daemon, once it has them)."""
        if bundle_dir is not None:
            self.bundle_dir = bundle_dir
        if metrics is not None:
            self.metrics = metrics

    # ---- what the TLS code uses ------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """An SSLContext for terminating TLS with the node's certificate (TLS 1.2+). It is
        the same object across renewals (the renewed chain is loaded into it), so a
        listener may keep it. Raises :class:`CertUnavailable`."""
        if self._info is None:
            raise CertUnavailable(self._why_none())
        if self._server_ctx is None:  # made on first use: an idle daemon does not pay for it
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            tls_dir = self._dir()
            try:
                ctx.load_cert_chain(tls_dir / CERT_FILE, tls_dir / KEY_FILE)
            except (OSError, ssl.SSLError) as exc:
                raise CertUnavailable(f"daemon: cannot load the node's certificate from "
                                      f"{tls_dir}: {exc}") from None
            self._server_ctx = ctx
        if self._info.not_after <= time.time():
            raise CertUnavailable(
                f"daemon: the node's certificate expired at {_rfc3339(self._info.not_after)} "
                f"and renewing it failed ({self.last_error or 'no answer yet'}); see the "
                "tsnet2d log")
        return self._server_ctx

    def client_context(self) -> ssl.SSLContext:
        """An SSLContext for originating TLS to a peer: trusts only the tailnet CA,
        ``check_hostname`` on, ``CERT_REQUIRED``, TLS 1.2+. Raises :class:`CertUnavailable`
        when the CA is not known yet."""
        ca = self._ca_pem
        if ca is None:
            raise CertUnavailable(
                "daemon: the tailnet CA is not known yet" + (
                    f": {self.unsupported}" if self.unsupported else
                    " (the node gets it with its first certificate)"))
        if self._client_ctx is None or self._client_ca != ca:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.decode())
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = True
            ctx.verify_mode = ssl.CERT_REQUIRED
            self._client_ctx, self._client_ca = ctx, ca
        return self._client_ctx

    def ca_pem(self) -> bytes | None:
        """The tailnet CA bundle (PEM), or None while unknown."""
        return self._ca_pem

    def chain_pem(self) -> bytes | None:
        """The node's certificate chain (leaf PEM, then the CA PEM), or None while none."""
        return self._chain_pem

    def info(self) -> CertInfo | None:
        """What the current certificate says, or None while the node has none."""
        return self._info

    def server_context_error(self) -> str:
        """Why :meth:`server_context` raises now ("" when it would not)."""
        try:
            self.server_context()
        except CertUnavailable as exc:
            return str(exc)
        return ""

    def _why_none(self) -> str:
        if self.unsupported:
            return f"daemon: the node has no TLS certificate: {self.unsupported}"
        if self.tls_dir is None:
            return "daemon: TLS certificates are not configured in this tsnet2d"
        if self._task is None:
            return "daemon: the node has no TLS certificate: the node is not running"
        if self.last_error:
            return (f"daemon: the node has no TLS certificate yet: the last request failed "
                    f"({self.last_error}); tsnet2d retries")
        return "daemon: the node has no TLS certificate yet: it is being requested; retry"

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, control: ControlClient, credential: str, fqdn: Callable[[], str]) -> None:
        """Begin keeping a certificate for ``fqdn()`` (read at every request) over the
        node's control session. Idempotent while running."""
        if self.tls_dir is None or self._task is not None:
            return
        self.unsupported = None
        self.last_error = ""
        self._task = asyncio.get_running_loop().create_task(
            self._run(control, credential, fqdn), name="tsnet2d-tls-certs")

    async def stop(self) -> None:
        """Cancel and await the renewal task (the certificate stays loaded)."""
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_changed(self, since: int | None = None) -> int:
        """Wait until :attr:`changes` exceeds ``since`` (default: its value now): a
        certificate was issued, renewed or loaded, a request failed, or the node gave up on
        certificates. Returns the new count."""
        target = self.changes if since is None else since
        while self.changes <= target:
            await self._changed.wait()
        return self.changes

    def _notify(self) -> None:
        self.changes += 1
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- the renewal task --------------------------------------------------------------

    def _dir(self) -> Path:
        if self.tls_dir is None:  # start() runs nothing without one
            raise RuntimeError("NodeCerts has no tls_dir")
        return self.tls_dir

    async def _run(self, control: ControlClient, credential: str,
                   fqdn: Callable[[], str]) -> None:
        if self._info is not None and fqdn() not in self._info.names:
            # Renamed since the last run: the old name's certificate is not served.
            self._info = self._chain_pem = None
            if self.metrics is not None:
                self.metrics.set_tls_cert_expiry(0)
        if self._info is None:
            await self._load_saved(fqdn())
        delay = RETRY_MIN
        while True:
            info = self._info
            if info is not None and fqdn() in info.names:
                wait = self._renew_at(info) - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            try:
                await self._request(control, credential, fqdn())
            except CertToolError as exc:
                if exc.key_problem:
                    self.unsupported = f"cannot use the node's TLS key: {exc}"
                    log.error("%s; the node runs without a TLS certificate", self.unsupported)
                    self._notify()
                    return
                delay = await self._failed(str(exc), delay)
            except ControlError as exc:
                if exc.status == 404:
                    self.unsupported = (f"the control server {control.url} issues no "
                                        "certificates (no /v1/cert: an older tsnet2 control?)")
                    log.warning("%s; the node runs without a TLS certificate", self.unsupported)
                    self._notify()
                    return
                delay = await self._failed(str(exc), delay)
            except (OSError, ValueError) as exc:
                delay = await self._failed(str(exc), delay)
            else:
                delay = RETRY_MIN

    @staticmethod
    def _renew_at(info: CertInfo) -> float:
        start = min(info.not_before + SERVER_BACKDATE, info.not_after)
        if start >= info.not_after:
            start = info.not_before
        return info.not_after - (info.not_after - start) * RENEW_LEFT

    async def _failed(self, why: str, delay: float) -> float:
        self.last_error = why
        if self.metrics is not None:
            self.metrics.tls_cert_renewal("error")
        pause = delay
        if self._info is not None:  # a short-lived certificate: retry well before it ends
            pause = min(pause, max(RETRY_MIN, (self._info.not_after - time.time()) / 4))
        log.warning("TLS certificate request failed: %s; next attempt in %.0fs", why, pause)
        self._notify()
        await asyncio.sleep(pause)
        return min(delay * 2, RETRY_MAX)

    async def _load_saved(self, fqdn: str) -> None:
        """Use the certificate of a previous run if it is still good for ``fqdn``."""
        tls_dir = self._dir()
        try:
            chain = await asyncio.to_thread(_read, tls_dir / CERT_FILE)
            if not (tls_dir / KEY_FILE).exists():
                raise ValueError("the node's key is gone")
            ca, info = await self._check(chain, fqdn)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.info("not using the saved TLS certificate: %s", exc)
            return
        self._install(chain, ca, info)
        log.info("TLS certificate loaded for %s: serial %s, not_after %s", fqdn, info.serial,
                 _rfc3339(info.not_after))
        self._notify()

    async def _check(self, chain: bytes, fqdn: str) -> tuple[bytes, CertInfo]:
        """``_check_chain`` in the certtool child: the CA PEM and the leaf's info."""
        out = await run_certtool("check", self._dir() / KEY_FILE, fqdn, chain)
        return out["ca"].encode(), _info_from_json(out["info"])

    async def _request(self, control: ControlClient, credential: str, fqdn: str) -> None:
        if not fqdn:
            raise ValueError("the node has no FQDN yet")
        key = self._dir() / KEY_FILE
        made = await run_certtool("csr", key, fqdn)
        if made["created_key"]:
            log.info("created the node's TLS key %s", key)
        result = await control.issue_cert(credential, made["csr"])
        chain = result.cert_chain.encode()
        if len(chain) > MAX_PEM:
            raise ValueError(f"the certificate chain is larger than {MAX_PEM} bytes")
        ca, info = await self._check(chain, fqdn)
        await asyncio.to_thread(_write_atomic, self._dir() / CERT_FILE, chain, 0o600)
        renewed = self._info is not None
        self._install(chain, ca, info)
        self.last_error = ""
        if self.metrics is not None:
            self.metrics.tls_cert_renewal("ok", info.not_after)
        log.info("TLS certificate %s for %s: serial %s, not_after %s",
                 "renewed" if renewed else "issued", fqdn, info.serial, _rfc3339(info.not_after))
        self._notify()

    def _install(self, chain: bytes, ca: bytes, info: CertInfo) -> None:
        """Make ``chain`` (already in tls/node.crt) the certificate in use; write the CA."""
        tls_dir = self._dir()
        if self._server_ctx is not None:
            # The same context object: listeners keep it, new handshakes use the new chain.
            self._server_ctx.load_cert_chain(tls_dir / CERT_FILE, tls_dir / KEY_FILE)
        self._chain_pem, self._info = chain, info
        if ca != self._ca_pem:
            self._ca_pem = ca
            self._write_ca(ca)
        if self.metrics is not None:
            self.metrics.set_tls_cert_expiry(info.not_after)

    def _write_ca(self, ca: bytes) -> None:
        targets = [self._dir() / CA_FILE]
        if self.bundle_dir is not None:
            targets.append(self.bundle_dir / CA_BUNDLE_NAME)
        for path in targets:
            try:
                _write_atomic(path, ca, 0o644)
            except OSError as exc:
                log.warning("cannot write the tailnet CA bundle %s: %s", path,
                            exc.strerror or exc)
