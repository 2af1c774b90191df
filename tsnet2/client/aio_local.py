"""asyncio LocalAPI client: HTTP/1.1 over the daemon socket's LocalAPI channel (0x02)."""

from __future__ import annotations

import asyncio
import collections
from types import TracebackType
from typing import Any

from tsnet2 import proto
from tsnet2.client._aio_io import close_writer, map_io_errors, open_channel
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
    """asyncio version of LocalClient: the daemon's LocalAPI (``/localapi/v0/...``).

    Each request opens a fresh connection to the daemon socket.

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
        return f"<AsyncLocalClient socket_path={self.socket_path!r}>"

    async def _open(
        self, op: str, target: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, HTTPExchange]:
        exchange = HTTPExchange(op, "GET", target)
        loop = asyncio.get_running_loop()
        reader, writer = await open_channel(
            self.socket_path,
            int(proto.ChannelKind.LOCALAPI),
            op,
            loop.time() + min(self.timeout, self.connect_timeout),
            payload=exchange.request_bytes(),
        )
        return reader, writer, exchange

    async def _request(self, op: str, target: str) -> bytes:
        async with map_io_errors(op), asyncio.timeout(self.timeout):
            reader, writer, exchange = await self._open(op, target)
            try:
                body = BodyBuffer(op)
                while not exchange.complete:
                    body.add(exchange.receive(await reader.read(65536)))
            finally:
                await close_writer(writer)
        if not exchange.ok:
            raise exchange.error_for(body.value())
        return body.value()

    async def get(self, path: str) -> bytes:
        """GET a LocalAPI path (``"status"`` or ``"/localapi/v0/status"``); return the body."""
        return await self._request("tsnet2.AsyncLocalClient.get", localapi_target(path))

    async def status(self) -> dict[str, Any]:
        """The node's status (``/localapi/v0/status``), with Tailscale's field names."""
        op = "tsnet2.AsyncLocalClient.status"
        return decode_json_object(op, await self._request(op, "/localapi/v0/status"))

    async def whois(self, addr: str) -> dict[str, Any]:
        """Who is behind tailnet address ``addr``; LocalAPIError (404) if nobody."""
        op = "tsnet2.AsyncLocalClient.whois"
        return decode_json_object(op, await self._request(op, whois_target(addr)))

    async def watch_ipn_bus(self, mask: int = 0) -> AsyncIPNBusWatcher:
        """Stream IPN bus notifications; returns an async iterator of dicts.

        Use ``async with`` (or ``await w.aclose()``) to end the watch.
        """
        op = "tsnet2.AsyncLocalClient.watch_ipn_bus"
        target = f"/localapi/v0/watch-ipn-bus?mask={int(mask)}"
        async with map_io_errors(op), asyncio.timeout(self.timeout):
            reader, writer, exchange = await self._open(op, target)
            try:
                pending: list[bytes] = []
                while exchange.status is None and not exchange.complete:
                    pending.extend(exchange.receive(await reader.read(65536)))
                if not exchange.ok:
                    body = BodyBuffer(op)
                    body.add(pending)
                    while not exchange.complete:
                        body.add(exchange.receive(await reader.read(65536)))
                    raise exchange.error_for(body.value())
            except BaseException:
                await close_writer(writer)
                raise
        return AsyncIPNBusWatcher(reader, writer, exchange, op, pending)


class AsyncIPNBusWatcher:
    """An async iterator of IPN bus notifications from ``AsyncLocalClient.watch_ipn_bus``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        exchange: HTTPExchange,
        op: str,
        first: list[bytes],
    ) -> None:
        self._reader = reader
        self._writer: asyncio.StreamWriter | None = writer
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
            if self._writer is None or self._exchange.complete:
                await self.aclose()
                raise StopAsyncIteration
            try:
                async with map_io_errors(self._op):
                    chunks = self._exchange.receive(await self._reader.read(65536))
            except Error:
                if self._writer is None:  # aclose() from another task ended the read
                    raise StopAsyncIteration from None
                raise
            self._queue.extend(self._lines.feed(chunks, eof=self._exchange.complete))
        return self._queue.popleft()

    async def aclose(self) -> None:
        """End the watch and close the connection (idempotent).

        A task waiting in ``__anext__`` meanwhile sees the iteration end
        (StopAsyncIteration), not an error.
        """
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await close_writer(writer)

    async def __aenter__(self) -> AsyncIPNBusWatcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
