"""Async client of the coordination HTTP API (used by the daemon)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp


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


class ControlClient:
    """Client of one control server. Owns an aiohttp session; ``async with`` or ``aclose()``."""

    def __init__(
        self, url: str, *, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """``url`` is the base URL (``http(s)://host:port``); ``timeout`` bounds each call
        (a netmap long-poll gets its poll timeout on top)."""
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"control URL must start with http:// or https://, got {url!r}")
        self.url = url
        self.timeout = timeout
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None
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
        """Close the session."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session. Idempotent."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("ControlClient is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

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
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        session = self._get_session()
        try:
            async with session.request(
                method,
                self.url + path,
                json=body,
                params=params,
                headers=headers,
                ssl=self._ssl,
                timeout=aiohttp.ClientTimeout(total=self.timeout + extra_time),
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            raise ControlUnavailable(f"control server {self.url} timed out on {path}") from None
        except aiohttp.ClientError as e:
            raise ControlUnavailable(f"control server {self.url} unreachable: {e}") from None
        try:
            data = json.loads(raw) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
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
    ) -> RegisterResult:
        """Register (auth key, or a bearer token such as a Kubernetes ServiceAccount token
        the server verifies) or re-register (node credential) this node."""
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
        session = self._get_session()
        try:
            async with session.get(
                self.url + "/healthz",
                ssl=self._ssl,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                text = await resp.text()
                ok = resp.status == 200 and text.strip() == "ok"
        except (TimeoutError, aiohttp.ClientError) as e:
            raise ControlUnavailable(f"control server {self.url} unreachable: {e}") from None
        if not ok:
            raise ControlUnavailable(f"control server {self.url} is not healthy", resp.status)
