"""Async client of the coordination HTTP API (used by the daemon).

HTTP/1.1 on asyncio streams and h11 (no aiohttp: it would cost the daemon about 11 MB of
RSS). Each call opens one connection (``Connection: close``) and closes it before it
returns; calls are rare (a netmap long-poll at most every ~30 s). Replies are bounded:
:data:`MAX_RESPONSE_HEAD` for the status line and headers, :data:`MAX_RESPONSE_BODY` for
the body (a netmap of a large tailnet).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11

from tsnet2.controlclient.boundedjson import BadRequest, loads_bounded

MAX_RESPONSE_HEAD = 64 * 1024
"""Largest response status line + headers accepted from the control server."""
MAX_RESPONSE_BODY = 16 * 1024 * 1024
"""Largest response body accepted from the control server (16 MiB)."""
_READ_SIZE = 64 * 1024
_CLOSE_TIMEOUT = 1.0  # seconds a graceful close (TLS close_notify) may take before abort


class ControlError(Exception):
    """The control server refused a call; ``message`` is its explanation."""

    def __init__(self, message: str, status: int | None = None) -> None:
        """Remember the message and the HTTP status (None if there was no reply)."""
        super().__init__(message)
        self.message = message
        self.status = status


class AuthError(ControlError):
    """401/403: bad, used or expired auth key, bad credential, or a tag not permitted."""


class ControlUnavailable(ControlError):
    """The server could not be reached, timed out, or answered 502/503/504."""


@dataclass(frozen=True)
class RegisterResult:
    """The reply of a registration."""

    node: dict[str, Any]
    node_credential: str
    domain: str


@dataclass(frozen=True)
class CertResult:
    """The reply of ``POST /v1/cert``: the chain (leaf PEM then CA PEM) and its end."""

    cert_chain: str
    not_after: str
    """RFC 3339 UTC, e.g. ``2026-03-01T12:00:00Z``."""


MAX_CA_PEM = 64 * 1024
"""Largest tailnet CA bundle accepted from ``GET /v1/ca``."""


class _Unreachable(Exception):
    """Transport-level failure of one exchange (mapped to ControlUnavailable)."""


class ControlClient:
    """Client of one control server; ``async with`` or ``aclose()``.

    Holds no connection between calls; ``aclose()`` aborts the connections of calls still
    in flight (they raise ControlUnavailable) and refuses new calls.
    """

    def __init__(
        self, url: str, *, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """``url`` is the base URL (``http(s)://host:port``); ``timeout`` bounds each call
        (a netmap long-poll gets its poll timeout on top)."""
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"control URL must start with http:// or https://, got {url!r}")
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"control URL {url!r}: {exc}") from None
        if not parts.hostname:
            raise ValueError(f"control URL {url!r} has no host")
        self.url = url
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = port if port is not None else (443 if self._https else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = 443 if self._https else 80
        self._host_header = host if self._port == default_port else f"{host}:{self._port}"
        self._prefix = parts.path
        self._ssl_context = ssl_context
        self._inflight: set[asyncio.WriteTransport] = set()
        self._closed = False

    async def __aenter__(self) -> ControlClient:
        """Return self."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the client."""
        await self.aclose()

    async def aclose(self) -> None:
        """Refuse new calls and abort the connections of calls in flight. Idempotent."""
        self._closed = True
        for transport in list(self._inflight):
            transport.abort()
        self._inflight.clear()

    def _tls(self) -> ssl.SSLContext | None:
        if not self._https:
            return None
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def _exchange(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> tuple[int, bytes]:
        """One request on a fresh connection; (status, body). Raises _Unreachable,
        ControlError (reply too large) or TimeoutError/CancelledError from the caller."""
        if self._closed:
            raise RuntimeError("ControlClient is closed")
        tls = self._tls()
        try:
            reader, writer = await asyncio.open_connection(
                self._host, self._port, ssl=tls,
                server_hostname=self._host if tls is not None else None,
                limit=_READ_SIZE,
            )
        except OSError as exc:  # includes ssl.SSLError (certificate, handshake)
            raise _Unreachable(str(exc) or type(exc).__name__) from None
        # A stream transport; uvloop's do not subclass asyncio's classes, so no isinstance.
        transport = writer.transport
        self._inflight.add(transport)
        graceful = False
        try:
            result = await self._talk(reader, writer, method, target, headers, body)
            graceful = True
            return result
        except (OSError, EOFError) as exc:
            raise _Unreachable(str(exc) or type(exc).__name__) from None
        finally:
            self._inflight.discard(transport)
            if graceful:
                writer.close()
                # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation
                # that arrives just as the connection finishes closing.
                try:
                    async with asyncio.timeout(_CLOSE_TIMEOUT):
                        await writer.wait_closed()
                except (OSError, TimeoutError):
                    transport.abort()
            else:
                transport.abort()

    async def _talk(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
    ) -> tuple[int, bytes]:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        all_headers = [
            ("Host", self._host_header),
            ("User-Agent", "tsnet2d"),
            ("Accept", "application/json"),
            ("Connection", "close"),
            *headers,
        ]
        if body is not None:
            all_headers += [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))]
        elif method != "GET":
            all_headers.append(("Content-Length", "0"))
        try:
            out = conn.send(h11.Request(method=method, target=target, headers=all_headers))
            if body:
                out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
            out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError as exc:  # e.g. a credential with a newline
            raise ControlError(f"cannot send request to {target.partition('?')[0]}: {exc}") \
                from None
        writer.write(out)
        await writer.drain()
        status: int | None = None
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Unreachable(f"bad HTTP reply: {exc}") from None
            if event is h11.NEED_DATA:
                # b"" at EOF: h11 then ends an unframed body, or reports the early close.
                conn.receive_data(await reader.read(_READ_SIZE))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BODY:
                    raise ControlError(
                        f"control server {self.url} sent a reply to "
                        f"{target.partition('?')[0]} larger than {MAX_RESPONSE_BODY} bytes",
                        status,
                    )
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                if status is None:  # h11 yields a Response first; a server cannot skip it
                    raise _Unreachable("reply ended before its status line")
                return status, b"".join(parts)
            elif isinstance(event, h11.ConnectionClosed):
                raise _Unreachable("connection closed before a complete reply")
            # InformationalResponse (1xx) and PAUSED are not expected before the end.

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        credential: str | None = None,
        params: dict[str, str] | None = None,
        extra_time: float = 0.0,
    ) -> tuple[int, bytes]:
        headers = [("Authorization", f"Bearer {credential}")] if credential else []
        target = self._prefix + path + ("?" + urlencode(params) if params else "")
        raw_body = json.dumps(body).encode() if body is not None else None
        try:
            async with asyncio.timeout(self.timeout + extra_time):
                return await self._exchange(method, target, headers, raw_body)
        except TimeoutError:
            raise ControlUnavailable(f"control server {self.url} timed out on {path}") from None
        except _Unreachable as e:
            raise ControlUnavailable(f"control server {self.url} unreachable: {e}") from None

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        credential: str | None = None,
        params: dict[str, str] | None = None,
        extra_time: float = 0.0,
    ) -> Any:
        status, raw = await self._request(
            method, path, body=body, credential=credential, params=params,
            extra_time=extra_time,
        )
        try:
            # Bounded like the server's own parsing: a hostile or broken control server
            # cannot make the daemon recurse (deep nesting) or convert huge numbers.
            data = loads_bounded(raw) if raw else None
        except BadRequest:
            data = None
        if status >= 400:
            message = (
                str(data["error"])
                if isinstance(data, dict) and "error" in data
                else raw[:200].decode("utf-8", "replace") or f"HTTP {status}"
            )
            if status in (401, 403):
                raise AuthError(message, status)
            if status in (502, 503, 504):
                raise ControlUnavailable(message, status)
            raise ControlError(message, status)
        if not isinstance(data, dict):
            raise ControlError(f"control server {self.url} sent an invalid reply to {path}", status)
        return data

    async def register(
        self,
        public_key: str,
        hostname: str,
        endpoints: Sequence[str] = (),
        ephemeral: bool = False,
        tags: Sequence[str] = (),
        auth_key: str | None = None,
        node_credential: str | None = None,
        bearer_token: str | None = None,
        traffic_log_key: str | None = None,
    ) -> RegisterResult:
        """Register (auth key, or a bearer token such as a Kubernetes ServiceAccount token
        the server verifies) or re-register (node credential) this node.

        ``traffic_log_key``: the base64 Ed25519 public key that signs this node's traffic
        log, published to peers (WhoIs); a re-registration without it removes the key.
        """
        body: dict[str, Any] = {
            "public_key": public_key,
            "hostname": hostname,
            "endpoints": list(endpoints),
            "ephemeral": ephemeral,
            "tags": list(tags),
        }
        if auth_key is not None:
            body["auth_key"] = auth_key
        if node_credential is not None:
            body["node_credential"] = node_credential
        if traffic_log_key is not None:
            body["traffic_log_key"] = traffic_log_key
        data = await self._call("POST", "/v1/register", body=body, credential=bearer_token)
        try:
            return RegisterResult(
                node=dict(data["node"]),
                node_credential=str(data["node_credential"]),
                domain=str(data["domain"]),
            )
        except (KeyError, TypeError, ValueError):
            raise ControlError("control server sent an invalid register reply") from None

    async def netmap(self, credential: str, since: int = 0, timeout: float = 0.0) -> dict[str, Any]:
        """Long-poll the netmap: returns once its version differs from ``since`` or after
        ``timeout`` seconds (server caps it at 60)."""
        result: dict[str, Any] = await self._call(
            "GET",
            "/v1/netmap",
            credential=credential,
            params={"since": str(since), "timeout": repr(float(timeout))},
            extra_time=max(0.0, timeout),
        )
        return result

    async def update_endpoints(self, credential: str, endpoints: Sequence[str]) -> int:
        """Announce this node's endpoints; return the netmap version after the change."""
        data = await self._call(
            "POST", "/v1/endpoints", credential=credential, body={"endpoints": list(endpoints)}
        )
        try:
            return int(data["version"])
        except (KeyError, TypeError, ValueError):
            raise ControlError("control server sent an invalid endpoints reply") from None

    async def deregister(self, credential: str) -> None:
        """Remove this node from the tailnet (logout)."""
        await self._call("POST", "/v1/deregister", credential=credential)

    async def health(self) -> None:
        """Raise ControlUnavailable unless ``GET /healthz`` answers ``ok``."""
        status, raw = await self._request("GET", "/healthz")
        if status != 200 or raw.decode("utf-8", "replace").strip() != "ok":
            raise ControlUnavailable(f"control server {self.url} is not healthy", status)

    async def issue_cert(self, credential: str, csr_pem: str) -> CertResult:
        """Ask for this node's certificate (``POST /v1/cert``) with a PEM CSR whose DNS names
        are the node's own. The private key stays with the caller. Raises ControlError with
        status 404 when the server issues no certificates (an older control server), 400
        for a CSR it cannot use, 403 for a name the node may not have."""
        data = await self._call("POST", "/v1/cert", credential=credential,
                                body={"csr": csr_pem})
        chain, not_after = data.get("cert_chain"), data.get("not_after")
        if not isinstance(chain, str) or "-----BEGIN CERTIFICATE-----" not in chain \
                or not isinstance(not_after, str):
            raise ControlError("control server sent an invalid cert reply")
        return CertResult(cert_chain=chain, not_after=not_after)

    async def ca(self) -> str:
        """The tailnet CA certificate (PEM) from ``GET /v1/ca`` (public, no credential).
        Raises ControlError (status 404 from a server without certificates)."""
        status, raw = await self._request("GET", "/v1/ca")
        text = raw[:MAX_CA_PEM].decode("utf-8", "replace")
        if status == 200 and len(raw) <= MAX_CA_PEM and "-----BEGIN CERTIFICATE-----" in text:
            return text
        if status in (502, 503, 504):
            raise ControlUnavailable(f"control server {self.url}: /v1/ca answered {status}",
                                     status)
        if status == 200:
            raise ControlError(f"control server {self.url} sent an invalid tailnet CA", status)
        raise ControlError(f"control server {self.url}: /v1/ca answered {status}", status)
