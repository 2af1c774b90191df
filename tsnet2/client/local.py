"""Blocking LocalAPI client: HTTP/1.1 over the daemon socket's LocalAPI channel (0x02)."""

from __future__ import annotations

import collections
import contextlib
import socket
import time
from types import TracebackType
from typing import Any

from tsnet2 import proto
from tsnet2.client._base import LOCALAPI_TIMEOUT
from tsnet2.client._http import (
    BodyBuffer,
    HTTPExchange,
    JSONLines,
    decode_json_object,
    localapi_target,
    whois_target,
)
from tsnet2.client._sockets import close_quietly, connect_channel, map_io_errors
from tsnet2.client.errors import Error

__all__ = ["IPNBusWatcher", "LocalClient"]


class LocalClient:
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
        return f"<LocalClient socket_path={self.socket_path!r}>"

    def _open(self, op: str, target: str, deadline: float) -> tuple[socket.socket, HTTPExchange]:
        exchange = HTTPExchange(op, "GET", target)
        sock = connect_channel(
            self.socket_path,
            int(proto.ChannelKind.LOCALAPI),
            op,
            min(deadline, time.monotonic() + self.connect_timeout),
            payload=exchange.request_bytes(),
        )
        return sock, exchange

    def _request(self, op: str, target: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        sock, exchange = self._open(op, target, deadline)
        try:
            with map_io_errors(op):
                body = BodyBuffer(op)
                while not exchange.complete:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    body.add(exchange.receive(sock.recv(65536)))
            if not exchange.ok:
                raise exchange.error_for(body.value())
            return body.value()
        finally:
            close_quietly(sock)

    def get(self, path: str) -> bytes:
        """GET a LocalAPI path (``"status"`` or ``"/localapi/v0/status"``); return the body.

        Raises LocalAPIError on a non-2xx status.
        """
        return self._request("tsnet2.LocalClient.get", localapi_target(path))

    def status(self) -> dict[str, Any]:
        """The node's status (``/localapi/v0/status``), with Tailscale's field names."""
        op = "tsnet2.LocalClient.status"
        return decode_json_object(op, self._request(op, "/localapi/v0/status"))

    def whois(self, addr: str) -> dict[str, Any]:
        """Who is behind tailnet address ``addr`` (``"ip"`` or ``"ip:port"``).

        Returns the WhoIs document (``Node``, ``UserProfile``, ...). Raises
        LocalAPIError (status 404) when nobody has that address.
        """
        op = "tsnet2.LocalClient.whois"
        return decode_json_object(op, self._request(op, whois_target(addr)))

    def watch_ipn_bus(self, mask: int = 0) -> IPNBusWatcher:
        """Stream IPN bus notifications (``/localapi/v0/watch-ipn-bus?mask=N``).

        Returns an iterator of dicts, one per notification, read as they arrive.
        Close it (or use ``with``) to end the watch; the iteration ends when the
        daemon ends the stream. Raises LocalAPIError on a non-2xx status.
        """
        op = "tsnet2.LocalClient.watch_ipn_bus"
        deadline = time.monotonic() + self.timeout
        sock, exchange = self._open(op, f"/localapi/v0/watch-ipn-bus?mask={int(mask)}", deadline)
        try:
            with map_io_errors(op):
                pending: list[bytes] = []
                while exchange.status is None and not exchange.complete:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    pending.extend(exchange.receive(sock.recv(65536)))
                if not exchange.ok:
                    body = BodyBuffer(op)
                    body.add(pending)
                    while not exchange.complete:
                        sock.settimeout(max(0.001, deadline - time.monotonic()))
                        body.add(exchange.receive(sock.recv(65536)))
                    raise exchange.error_for(body.value())
                sock.settimeout(None)
        except BaseException:
            close_quietly(sock)
            raise
        return IPNBusWatcher(sock, exchange, op, pending)


class IPNBusWatcher:
    """An iterator of IPN bus notifications (dicts) from ``LocalClient.watch_ipn_bus``.

    Reads block until the next notification. ``close()`` (or leaving a ``with``
    block) closes the connection.
    """

    def __init__(
        self, sock: socket.socket, exchange: HTTPExchange, op: str, first: list[bytes]
    ) -> None:
        self._sock: socket.socket | None = sock
        self._exchange = exchange
        self._op = op
        self._lines = JSONLines(op)
        self._queue: collections.deque[dict[str, Any]] = collections.deque(
            self._lines.feed(first, eof=exchange.complete)
        )

    def __iter__(self) -> IPNBusWatcher:
        return self

    def __next__(self) -> dict[str, Any]:
        while not self._queue:
            sock = self._sock
            if sock is None or self._exchange.complete:
                self.close()
                raise StopIteration
            try:
                with map_io_errors(self._op):
                    chunks = self._exchange.receive(sock.recv(65536))
            except Error:
                if self._sock is None:  # close() from another thread ended the read
                    raise StopIteration from None
                raise
            self._queue.extend(self._lines.feed(chunks, eof=self._exchange.complete))
        return self._queue.popleft()

    def close(self) -> None:
        """End the watch and close the connection (idempotent).

        Safe to call from another thread while one is blocked iterating: the
        connection is shut down first, which wakes that read, and the iteration
        then ends (StopIteration) instead of raising.
        """
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            close_quietly(sock)

    def __enter__(self) -> IPNBusWatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
