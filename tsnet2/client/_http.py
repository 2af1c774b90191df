"""Sans-IO LocalAPI HTTP/1.1 client core (h11), shared by the sync and asyncio faces.

One :class:`HTTPExchange` is one request/response on a fresh LocalAPI channel
(kind byte 0x02 is written by the caller). The faces feed received bytes in and
get body chunks out; bounded reads are enforced here.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import h11

from tsnet2 import proto
from tsnet2.client.errors import LocalAPIError, ProtocolError

LOCALAPI_HOST = "local-tailscaled.sock"
MAX_BODY = 16 << 20
"""Largest buffered LocalAPI response body (16 MiB)."""
MAX_STREAM_LINE = 16 << 20
"""Largest single line of a streamed LocalAPI response (16 MiB)."""
MAX_HEAD = 64 << 10
"""Largest response head (status line + headers)."""


def whois_target(addr: str) -> str:
    """The request target of a WhoIs lookup for ``addr`` (``ip`` or ``ip:port``)."""
    return "/localapi/v0/whois?addr=" + quote(addr, safe="")


def localapi_target(path: str) -> str:
    """Normalise ``status`` / ``/localapi/v0/status`` / ``/localapi/v0/...`` to a request target."""
    if not path.startswith("/"):
        path = "/localapi/v0/" + path
    if any(c in path for c in "\r\n ") or not path.isascii():
        raise ValueError(f"invalid LocalAPI path {path!r}")
    return path


class HTTPExchange:
    """One HTTP/1.1 request and its response, without I/O."""

    def __init__(self, op: str, method: str, target: str) -> None:
        self.op = op
        self.status: int | None = None
        self.complete = False
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self._request = h11.Request(
            method=method,
            target=target,
            headers=[
                ("Host", LOCALAPI_HOST),
                ("User-Agent", "tsnet2-python"),
                ("Connection", "close"),
            ],
        )

    def request_bytes(self) -> bytes:
        """The bytes to write after the channel byte (request head, no body)."""
        head = self._conn.send(self._request) or b""
        end = self._conn.send(h11.EndOfMessage()) or b""
        return head + end

    def receive(self, data: bytes) -> list[bytes]:
        """Feed received bytes (b"" at EOF); return body chunks now available.

        Sets :attr:`status` when the response head arrives and :attr:`complete` at the
        end of the body. Raises ProtocolError on malformed HTTP or a premature EOF.
        """
        try:
            self._conn.receive_data(data)
            chunks: list[bytes] = []
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    if data == b"" and not self.complete:
                        raise ProtocolError(
                            f"{self.op}: daemon closed the LocalAPI connection early"
                        )
                    return chunks
                if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    return chunks
                if isinstance(event, h11.Response):
                    self.status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    self.complete = True
                    return chunks
                # InformationalResponse (1xx) is skipped.
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(f"{self.op}: bad HTTP from the daemon: {exc}") from None

    def error_for(self, body: bytes) -> LocalAPIError:
        """The LocalAPIError for a non-2xx response with ``body``."""
        text = body[:4096].decode("utf-8", "replace").strip()
        return LocalAPIError(
            f"{self.op}: HTTP {self.status}: {text}", status=self.status or 0, body=text
        )

    @property
    def ok(self) -> bool:
        """True when the status is 2xx."""
        return self.status is not None and 200 <= self.status < 300


class BodyBuffer:
    """Accumulate a response body up to :data:`MAX_BODY` bytes."""

    def __init__(self, op: str, limit: int = MAX_BODY) -> None:
        self._op = op
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, chunks: list[bytes]) -> None:
        """Append chunks; ProtocolError past the limit."""
        for c in chunks:
            self._size += len(c)
            if self._size > self._limit:
                raise ProtocolError(
                    f"{self._op}: LocalAPI response larger than {self._limit} bytes"
                )
            self._parts.append(c)

    def value(self) -> bytes:
        """The body so far."""
        return b"".join(self._parts)


def decode_json_object(op: str, body: bytes) -> dict[str, Any]:
    """Decode a LocalAPI JSON object body."""
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"{op}: LocalAPI sent invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{op}: LocalAPI sent a {type(value).__name__}, want an object")
    return value


class JSONLines:
    """Split a streamed body into JSON objects, one per line (bounded lines)."""

    def __init__(self, op: str) -> None:
        self._op = op
        self._reader = proto.LineReader(MAX_STREAM_LINE)

    def feed(self, chunks: list[bytes], *, eof: bool = False) -> list[dict[str, Any]]:
        """Feed body chunks (and EOF); return the complete objects."""
        out: list[dict[str, Any]] = []
        try:
            for c in chunks:
                if c:
                    self._reader.feed(c)
                    out.extend(self._drain())
            if eof:
                self._reader.feed(b"")
                out.extend(self._drain())
                rest = self._reader.take_rest()
                if rest.strip():
                    out.append(decode_json_object(self._op, rest))
        except proto.WireError as exc:
            raise ProtocolError(f"{self._op}: {exc}") from None
        return out

    def _drain(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while (line := self._reader.next_line()) is not None:
            if line.strip():
                out.append(decode_json_object(self._op, line))
        return out
