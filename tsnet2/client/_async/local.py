"""LocalAPI client: HTTP/1.1 over the daemon socket's LocalAPI channel (0x02)."""

from __future__ import annotations

import collections
import socket
import time
from types import TracebackType
from typing import Any
from urllib.parse import quote

from tsnet2 import proto
from tsnet2.client import _backend_async as backend
from tsnet2.client._async.channel import close_quietly, close_when_idle, connect_channel, recv
from tsnet2.client._base import LOCALAPI_TIMEOUT
from tsnet2.client._http import (
    BodyBuffer,
    HTTPExchange,
    JSONLines,
    decode_json_object,
    localapi_target,
    whois_target,
)
from tsnet2.client.errors import Error

__all__ = ["AsyncIPNBusWatcher", "AsyncLocalClient"]

class AsyncLocalClient:
    """Talk to the daemon's LocalAPI (Tailscale's ``/localapi/v0/...`` endpoints).

    Each request opens a fresh connection to the daemon socket. Get one from
    ``Server.local_client()``, or build it directly from a socket path.

    Args:
        socket_path: the tsnet2d socket.
        timeout: seconds a whole request may take (connect + response), default 30.
        connect_timeout: seconds to keep retrying the connect, default 10.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float = LOCALAPI_TIMEOUT,
        connect_timeout: float = 10.0,
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def __repr__(self) -> str:
        return f"<{type(self).__name__} socket_path={self.socket_path!r}>"

    async def _open(
        self, op: str, target: str, deadline: float
    ) -> tuple[socket.socket, HTTPExchange]:
        exchange = HTTPExchange(op, "GET", target)
        sock = await connect_channel(
            self.socket_path,
            int(proto.ChannelKind.LOCALAPI),
            op,
            min(deadline, time.monotonic() + self.connect_timeout),
            payload=exchange.request_bytes(),
        )
        return sock, exchange

    async def _request(self, op: str, target: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        sock, exchange = await self._open(op, target, deadline)
        try:
            body = BodyBuffer(op)
            while not exchange.complete:
                body.add(exchange.receive(await recv(sock, 65536, op, deadline)))
        finally:
            close_quietly(sock)
        if not exchange.ok:
            raise exchange.error_for(body.value())
        return body.value()

    async def get(self, path: str) -> bytes:
        """GET a LocalAPI path (``"status"`` or ``"/localapi/v0/status"``); return the body.

        Raises LocalAPIError on a non-2xx status.
        """
        return await self._request("tsnet2.LocalClient.get", localapi_target(path))

    async def status(self) -> dict[str, Any]:
        """The node's status (``/localapi/v0/status``), with Tailscale's field names."""
        op = "tsnet2.LocalClient.status"
        return decode_json_object(op, await self._request(op, "/localapi/v0/status"))

    async def whois(self, addr: str) -> dict[str, Any]:
        """Who is behind tailnet address ``addr`` (``"ip"`` or ``"ip:port"``).

        Returns the WhoIs document (``Node``, ``UserProfile``, ...). Raises
        LocalAPIError (status 404) when nobody has that address.
        """
        op = "tsnet2.LocalClient.whois"
        return decode_json_object(op, await self._request(op, whois_target(addr)))

    async def cert_pem(self, domain: str) -> bytes:
        """The node's certificate chain for ``domain`` (one of ``cert_domains()``), PEM:
        the leaf, then the tailnet CA. Only the certificate: the key stays in tsnet2d
        (``listen_tls``). Raises LocalAPIError: 404 for a domain not the node's, 503 while
        it has no certificate."""
        op = "tsnet2.LocalClient.cert_pem"
        target = "/localapi/v0/cert/" + quote(domain, safe="") + "?type=cert"
        return await self._request(op, target)

    async def tailnet_ca_pem(self) -> bytes:
        """The tailnet CA certificate (PEM) that peers' certificates chain to (also written
        as ``tailnet-ca.pem`` next to the daemon socket). Raises LocalAPIError (503 while
        the daemon does not know it yet)."""
        return await self._request("tsnet2.LocalClient.tailnet_ca_pem", "/localapi/v0/tailnet-ca")

    async def watch_ipn_bus(self, mask: int = 0) -> AsyncIPNBusWatcher:
        """Stream IPN bus notifications (``/localapi/v0/watch-ipn-bus?mask=N``).

        Returns an iterator of dicts, one per notification, read as they arrive.
        Close it (or use it as a context manager) to end the watch; the iteration
        ends when the daemon ends the stream. Raises LocalAPIError on a non-2xx status.
        """
        op = "tsnet2.LocalClient.watch_ipn_bus"
        deadline = time.monotonic() + self.timeout
        target = f"/localapi/v0/watch-ipn-bus?mask={int(mask)}"
        sock, exchange = await self._open(op, target, deadline)
        try:
            pending: list[bytes] = []
            while exchange.status is None and not exchange.complete:
                pending.extend(exchange.receive(await recv(sock, 65536, op, deadline)))
            if not exchange.ok:
                body = BodyBuffer(op)
                body.add(pending)
                while not exchange.complete:
                    body.add(exchange.receive(await recv(sock, 65536, op, deadline)))
                raise exchange.error_for(body.value())
        except BaseException:
            close_quietly(sock)
            raise
        return AsyncIPNBusWatcher(sock, exchange, op, pending)


class AsyncIPNBusWatcher:
    """An iterator of IPN bus notifications (dicts) from ``LocalClient.watch_ipn_bus``.

    Each step waits for the next notification. Closing it (or leaving its context
    manager) ends the watch: an iteration waiting meanwhile, in another thread or
    task, ends (StopIteration) instead of raising.
    """

    def __init__(
        self, sock: socket.socket, exchange: HTTPExchange, op: str, first: list[bytes]
    ) -> None:
        self._sock = sock
        self._closed = False
        self._reading = False
        self._cond = backend.Condition()
        self._exchange = exchange
        self._op = op
        self._lines = JSONLines(op)
        self._queue: collections.deque[dict[str, Any]] = collections.deque(
            self._lines.feed(first, eof=exchange.complete)
        )

    def __aiter__(self) -> AsyncIPNBusWatcher:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._queue:
            if self._closed or self._exchange.complete:
                await self.aclose()
                raise StopAsyncIteration
            async with self._cond:
                self._reading = True
            try:
                chunk = await recv(self._sock, 65536, self._op, None)
            except Error:
                if self._closed:  # closed by another thread or task: the watch ended
                    raise StopAsyncIteration from None
                raise
            finally:
                async with self._cond:
                    self._reading = False
                    self._cond.notify_all()
            if self._closed:
                raise StopAsyncIteration
            self._queue.extend(
                self._lines.feed(self._exchange.receive(chunk), eof=self._exchange.complete)
            )
        return self._queue.popleft()

    async def aclose(self) -> None:
        """End the watch and close the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await close_when_idle(self._sock, self._cond, lambda: self._reading)

    async def __aenter__(self) -> AsyncIPNBusWatcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
