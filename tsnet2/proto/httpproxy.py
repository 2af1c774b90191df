"""HTTP proxy requests (RFC 9110 §9.3.6 CONNECT, RFC 9112 §3.2.2 absolute-form), sans-IO.

Feed the bytes a client sends to :meth:`HttpProxyCore.receive` until it returns a
:class:`ProxyRequest`: ``CONNECT host:port`` (a tunnel) or a request with an absolute
``http://`` URI (forwarded). :meth:`ProxyRequest.forward_head` gives the head to send to the
origin for the latter: origin-form target, ``Host`` from the URI, hop-by-hop and proxy
headers removed, ``Connection: close``.

Errors are :class:`HttpProxyError` with the status to answer (400, 405, 431) and are sticky.
The head may be at most ``max_head`` bytes (default :data:`MAX_HEAD`, 16 KiB) and
:data:`MAX_HEADERS` fields; nothing more is ever buffered (plus the chunk being fed).
:func:`encode_response` builds a short plain-text answer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from tsnet2.proto.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_HEAD",
    "MAX_HEADERS",
    "HttpProxyCore",
    "HttpProxyError",
    "ProxyRequest",
    "encode_response",
]

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_V6 = re.compile(r"[0-9A-Fa-f:.]+")
# Hop-by-hop fields (RFC 9110 §7.6.1) and the proxy's own: never forwarded. Transfer-Encoding
# stays: the body is relayed as the client framed it.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
    b"proxy-authenticate", b"te", b"trailer", b"upgrade",
})
REASONS = {
    200: "Connection established", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 431: "Request Header Fields Too Large",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}


class HttpProxyError(RemoteProtocolError):
    """The request cannot be served; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyRequest:
    """A complete request head. ``kind``: ``connect`` (tunnel to host:port) or ``forward``
    (absolute-form; ``target`` is the origin-form path and query). ``host`` has no
    brackets. ``rest``: bytes the client sent after the head (a body, or a TLS hello)."""

    kind: Literal["connect", "forward"]
    method: str
    host: str
    port: int
    target: str
    version: str
    headers: tuple[tuple[bytes, bytes], ...]
    authority: str
    rest: bytes = b""

    def forward_head(self) -> bytes:
        """The head to send to the origin (``forward`` requests only)."""
        if self.kind != "forward":
            raise LocalProtocolError("only forwarded requests have a head to forward")
        drop = set(HOP_BY_HOP) | {b"host"}
        for name, value in self.headers:
            if name.lower() in (b"connection", b"proxy-connection"):
                drop.update(t.strip().lower() for t in value.split(b","))
        lines = [f"{self.method} {self.target} {self.version}".encode("ascii"),
                 b"Host: " + self.authority.encode("ascii")]
        lines += [n + b": " + v for n, v in self.headers if n.lower() not in drop]
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"


def encode_response(status: int, text: str = "", *, headers: tuple[str, ...] = ()) -> bytes:
    """A short response with a plain-text body (``text`` and a newline; none for 200)."""
    reason = REASONS.get(status, "Error")
    head = [f"HTTP/1.1 {status} {reason}", *headers]
    if status == 200:
        return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8")
    body = (text + "\n").encode("utf-8") if text else b""
    head += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}",
             "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + body


def _host_port(authority: str, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` of a URI or CONNECT target: a name, IPv4 or bracketed IPv6."""
    if authority.startswith("["):
        end = authority.find("]")
        host, after = authority[1:end], authority[end + 1:]
        if end < 0 or not _V6.fullmatch(host):
            raise HttpProxyError(f"bad host in {authority[:100]!r}")
    else:
        host, sep, port_text = authority.rpartition(":")
        host, after = (host, sep + port_text) if sep else (authority, "")
        if not _NAME.fullmatch(host):
            raise HttpProxyError(f"bad host in {authority[:100]!r}: want a host name or an "
                                 "IP address (IPv6 in brackets)")
    if not after:
        if default_port is None:
            raise HttpProxyError(f"bad CONNECT target {authority[:100]!r}: want host:port")
        return host, default_port
    digits = after[1:]
    if after[0] != ":" or not (1 <= len(digits) <= 5 and digits.isascii()
                               and digits.isdigit()) or not 1 <= int(digits) <= 65535:
        raise HttpProxyError(f"bad port in {authority[:100]!r}: want 1-65535")
    return host, int(digits)


class HttpProxyCore:
    """One proxy request's head, as a state machine."""

    __slots__ = ("_buf", "_done", "_error", "_max", "_scan")

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        if max_head < 16:
            raise LocalProtocolError(f"max_head must be >= 16, got {max_head}")
        self._max = max_head
        self._buf = bytearray()
        self._scan = 0
        self._done = False
        self._error: HttpProxyError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held (an incomplete head)."""
        return len(self._buf)

    def _fail(self, message: str, status: int = 400) -> None:
        self._error = HttpProxyError(message, status)
        self._buf.clear()
        raise self._error

    def receive(self, data: bytes) -> ProxyRequest | None:
        """Feed bytes from the client (``b""``: it closed). Returns the request once its
        head is complete, else None. Raises :class:`HttpProxyError` (sticky)."""
        if self._error is not None:
            raise self._error
        if self._done:
            raise LocalProtocolError("the request was already returned")
        if not data:
            self._fail("the client closed the connection before the end of the request head")
        self._buf += data
        # Leading empty lines before a request line are ignored (RFC 9112 §2.2).
        while self._buf[:2] == b"\r\n" or self._buf[:1] == b"\n":
            del self._buf[:2 if self._buf[:1] == b"\r" else 1]
        end = self._find_end()
        if end is None:
            if len(self._buf) > self._max:
                self._fail(f"request head longer than {self._max} bytes", 431)
            return None
        head_end, body_start = end
        if head_end > self._max:
            self._fail(f"request head longer than {self._max} bytes", 431)
        head = bytes(self._buf[:head_end])
        rest = bytes(self._buf[body_start:])
        self._buf.clear()
        try:
            req = self._parse(head, rest)
        except HttpProxyError as exc:
            self._error = exc
            raise
        self._done = True
        return req

    def _find_end(self) -> tuple[int, int] | None:
        buf = self._buf
        start = max(0, self._scan - 3)
        limit = min(len(buf), self._max + 4)
        i = buf.find(b"\n", start, limit)
        while i >= 0:
            if buf[i + 1:i + 2] == b"\n":
                return i, i + 2
            if buf[i + 1:i + 3] == b"\r\n":
                return i, i + 3
            i = buf.find(b"\n", i + 1, limit)
        self._scan = limit
        return None

    def _parse(self, head: bytes, rest: bytes) -> ProxyRequest:
        lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in head.split(b"\n")]
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise HttpProxyError(f"bad request line {lines[0][:100]!r}")
        method, target, version = parts
        if not _TOKEN.fullmatch(method):
            raise HttpProxyError(f"bad method {method[:32]!r}")
        if not _VERSION.fullmatch(version):
            raise HttpProxyError(f"unsupported HTTP version {version[:16]!r}: want HTTP/1.x")
        if not target or not all(0x21 <= b <= 0x7E for b in target):
            raise HttpProxyError(f"bad request target {target[:100]!r}")
        fields = lines[1:]
        if len(fields) > MAX_HEADERS:
            raise HttpProxyError(f"more than {MAX_HEADERS} header fields", 431)
        headers: list[tuple[bytes, bytes]] = []
        for ln in fields:
            name, colon, value = ln.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise HttpProxyError(f"bad header field {ln[:100]!r}")
            value = value.strip(b" \t")
            if not _FIELD_VALUE.fullmatch(value):
                raise HttpProxyError(f"bad value of header {name[:64]!r}")
            headers.append((name, value))
        names = [n.lower() for n, _ in headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            raise HttpProxyError("both Transfer-Encoding and Content-Length")
        if names.count(b"content-length") > 1:
            raise HttpProxyError("more than one Content-Length")
        m, t, v = method.decode("ascii"), target.decode("ascii"), version.decode("ascii")
        if m == "CONNECT":
            host, port = _host_port(t, None)
            return ProxyRequest("connect", m, host, port, t, v, tuple(headers), t, rest)
        scheme, sep, after = t.partition("://")
        if not sep:
            raise HttpProxyError(
                f"{m} {t[:100]}: this is a proxy; send an absolute http:// URI "
                "(or CONNECT host:port)")
        if scheme.lower() != "http":
            raise HttpProxyError(f"{scheme[:16]}:// cannot be forwarded: use CONNECT "
                                 "for TLS (https_proxy), or http://")
        cut = min((i for i in (after.find("/"), after.find("?")) if i >= 0),
                  default=len(after))
        authority, path = after[:cut], after[cut:]
        if "#" in path:
            path = path.split("#", 1)[0]
        if not path.startswith("/"):
            path = "/" + path
        host, port = _host_port(authority, 80)
        return ProxyRequest("forward", m, host, port, path, v, tuple(headers), authority,
                            rest)
