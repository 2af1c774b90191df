"""HTTP identity headers for ``http``-mode serve flows, sans-IO: bytes in, bytes out.

The daemon runs a :class:`RequestRewriter` on the caller→target direction of every flow of
an ``http`` serve (``tsnet2d --serve PORT=http:TARGET``, or a library ``listen_socket(...,
identity="http")``). It parses each HTTP/1.x request head (keep-alive and pipelined requests,
``Content-Length`` and chunked bodies, trailers), removes every header named in
:data:`STRIPPED` or starting with ``Tsnet2-`` (case-insensitive; whatever the caller sent)
and appends the daemon's own (:func:`identity_headers`). Bodies pass through byte for byte.
After a ``CONNECT`` request, or one asking for an ``Upgrade`` (WebSocket), the
caller's next bytes are held until the target answers it (:meth:`RequestRewriter.response`
follows the target's responses): relayed raw once it switched protocols, rewritten as
requests if it did not. ``Expect: 100-continue`` needs nothing: the target answers it and
the body follows as framed.

A head longer than :data:`MAX_HEAD` gets a ``431`` answer to the caller and the connection
closes; a malformed request (bad request line, obsolete line folding, whitespace before a
colon, conflicting ``Content-Length``/``Transfer-Encoding``, a bad chunk) gets ``400``.

So a handler behind the daemon may trust these headers: whatever arrives under these names
was written by the daemon from the WireGuard peer's identity (the netmap's WhoIs).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import re
from collections.abc import Iterable

__all__ = [
    "HEADER_FORWARDED",
    "HEADER_NODE_ID",
    "HEADER_NODE_NAME",
    "HEADER_NODE_TAGS",
    "HEADER_USER_LOGIN",
    "HEADER_USER_NAME",
    "MAX_HEAD",
    "STRIPPED",
    "RequestRewriter",
    "Rewrite",
    "decode_header_value",
    "encode_header_value",
    "identity_headers",
]

MAX_HEAD = 64 * 1024
"""The largest request head (request line and headers) and trailer section accepted."""

HEADER_USER_LOGIN = "Tailscale-User-Login"
"""The caller's user login name (``alice@example.com``), as Tailscale's serve names it."""
HEADER_USER_NAME = "Tailscale-User-Name"
"""The caller's user display name, as Tailscale's serve names it."""
HEADER_NODE_NAME = "Tsnet2-Node-Name"
"""The caller's node FQDN (``laptop.tail-scale.ts.net``)."""
HEADER_NODE_ID = "Tsnet2-Node-Id"
"""The caller's stable node id."""
HEADER_NODE_TAGS = "Tsnet2-Node-Tags"
"""The caller's node tags, comma-separated (tagged nodes have no user)."""
HEADER_FORWARDED = "Forwarded"

STRIPPED: frozenset[str] = frozenset({
    "tailscale-user-login", "tailscale-user-name", "tailscale-user-profile-pic",
    "tailscale-headers-info", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    "x-forwarded-port", "x-real-ip", "forwarded",
})
"""Header names (lower case) removed from every request; so is every ``tsnet2-*`` name."""

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")
_MAX_CHUNK_LINE = 4096


def encode_header_value(text: str) -> str:
    """A header value: printable ASCII as is, anything else as an RFC 2047 encoded word
    (``=?utf-8?q?...?=``, as Tailscale's serve does for non-ASCII names)."""
    if all(" " <= ch <= "~" for ch in text):
        return text
    out = []
    for b in text.encode():
        ch = chr(b)
        if ch.isascii() and (ch.isalnum() or ch in "!*+-/"):
            out.append(ch)
        elif ch == " ":
            out.append("_")
        else:
            out.append(f"={b:02X}")
    return "=?utf-8?q?" + "".join(out) + "?="


def decode_header_value(value: str) -> str:
    """The inverse of :func:`encode_header_value` (other values come back unchanged)."""
    m = re.fullmatch(r"=\?utf-8\?q\?(.*)\?=", value, re.IGNORECASE)
    if m is None:
        return value
    raw = bytearray()
    text = m.group(1)
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "=" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 1:i + 3]):
            raw.append(int(text[i + 1:i + 3], 16))
            i += 3
            continue
        raw += b" " if ch == "_" else ch.encode()
        i += 1
    return raw.decode("utf-8", "replace")


def identity_headers(*, peer_ip: str, user_login: str = "", user_name: str = "",
                     node_name: str = "", node_id: str = "",
                     tags: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The headers the daemon adds to each request: identity ones (left out when unknown),
    ``X-Forwarded-For: <peer tailnet ip>``, ``X-Forwarded-Proto: http`` and ``Forwarded:
    for=...;proto=http``."""
    out: list[tuple[str, str]] = []
    for name, value in ((HEADER_USER_LOGIN, user_login), (HEADER_USER_NAME, user_name),
                        (HEADER_NODE_NAME, node_name), (HEADER_NODE_ID, node_id),
                        (HEADER_NODE_TAGS, ",".join(tags))):
        if value:
            out.append((name, encode_header_value(value)))
    fwd = f'"[{peer_ip}]"' if ":" in peer_ip else peer_ip
    out += [("X-Forwarded-For", peer_ip), ("X-Forwarded-Proto", "http"),
            (HEADER_FORWARDED, f"for={fwd};proto=http")]
    return out


@dataclasses.dataclass
class Rewrite:
    """What one :meth:`RequestRewriter.feed` produced: bytes for the target, bytes for the
    caller (an error answer), and whether the connection is to be closed after them."""

    to_target: bytes = b""
    to_peer: bytes = b""
    close: bool = False
    error: str = ""


class _State(enum.Enum):
    HEAD = 1
    BODY = 2  # Content-Length bytes left in `_left`
    CHUNK_SIZE = 3
    CHUNK_DATA = 4
    CHUNK_END = 5  # the CRLF after a chunk's data
    TRAILERS = 6
    RAW = 7
    FAILED = 8
    AWAIT = 9  # an Upgrade/CONNECT request went on: the caller's bytes wait for its answer


class _Bad(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large",
            502: "Bad Gateway", 505: "HTTP Version Not Supported"}


def _reply(status: int, message: str) -> bytes:
    body = f"tsnet2: {message}\n".encode()
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain; "
            f"charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode() + body


def _stripped(name: bytes) -> bool:
    low = name.decode("latin-1").lower()
    return low in STRIPPED or low.startswith("tsnet2-")


class RequestRewriter:
    """Rewrites the requests of one connection (see the module docstring)."""

    def __init__(self, headers: Iterable[tuple[str, str]], max_head: int = MAX_HEAD) -> None:
        """``headers``: what to add to every request (:func:`identity_headers`)."""
        self._added = b"".join(f"{n}: {v}\r\n".encode("latin-1", "replace")
                               for n, v in headers)
        self.max_head = max_head
        self.state = _State.HEAD
        self._buf = bytearray()
        self._left = 0
        self._raw_after = False
        self.requests = 0  # request heads rewritten so far
        self._responses = _ResponseTracker(max_head)

    def feed(self, data: bytes) -> Rewrite:
        """Take bytes from the caller; return what goes on."""
        out = bytearray()
        if self.state == _State.FAILED:
            return Rewrite()
        if self.state == _State.RAW:
            return Rewrite(to_target=data)
        self._buf += data
        return self._run(out)

    def response(self, data: bytes) -> Rewrite:
        """Take bytes the target sent (they go on to the caller unchanged; this only
        watches them). When they answer an ``Upgrade``/``CONNECT`` request, the caller's
        bytes held since then go on: raw if the target switched protocols (``101``, or
        ``2xx`` to ``CONNECT``), else rewritten as requests. Returns what goes on."""
        if self.state in (_State.FAILED, _State.RAW):
            return Rewrite()
        switched = self._responses.feed(data)
        if switched is None or self.state != _State.AWAIT:
            return Rewrite()
        if switched:
            self.state = _State.RAW
            held = bytes(self._buf)
            self._buf.clear()
            return Rewrite(to_target=held)
        self.state = _State.HEAD
        return self._run(bytearray())

    def _run(self, out: bytearray) -> Rewrite:
        try:
            while self._step(out):
                pass
        except _Bad as exc:
            self.state = _State.FAILED
            self._buf.clear()
            return Rewrite(to_target=bytes(out), to_peer=_reply(exc.status, str(exc)),
                           close=True, error=f"http {exc.status}: {exc}")
        return Rewrite(to_target=bytes(out))

    def _step(self, out: bytearray) -> bool:
        """Consume what it can of the buffer; True to be called again."""
        buf = self._buf
        st = self.state
        if not buf:
            return False
        if st == _State.RAW:
            out += buf
            buf.clear()
            return False
        if st == _State.AWAIT:
            if len(buf) > self.max_head:
                raise _Bad(400, f"more than {self.max_head} bytes sent before the upgrade "
                           "was answered")
            return False
        if st == _State.HEAD:
            while buf.startswith(b"\r\n"):  # RFC 9112 §2.2: ignore CRLFs before a request
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            bare = buf.find(b"\n\n")
            if bare >= 0 and (end < 0 or bare < end):
                raise _Bad(400, "bare LF line endings in the request head")
            if end < 0:
                if len(buf) > self.max_head:
                    raise _Bad(431, f"request head larger than {self.max_head} bytes")
                return False
            if end + 4 > self.max_head:
                raise _Bad(431, f"request head larger than {self.max_head} bytes")
            head = bytes(buf[:end])
            del buf[:end + 4]
            out += self._rewrite_head(head)
            self.requests += 1
            return True
        if st == _State.BODY:
            n = min(self._left, len(buf))
            out += buf[:n]
            del buf[:n]
            self._left -= n
            if self._left == 0:
                self._message_done()
            return True
        if st in (_State.CHUNK_SIZE, _State.TRAILERS):
            end = buf.find(b"\r\n")
            limit = _MAX_CHUNK_LINE if st == _State.CHUNK_SIZE else self.max_head
            if end < 0:
                if len(buf) > limit:
                    raise _Bad(431 if st == _State.TRAILERS else 400,
                               "chunk-size line or trailer too long")
                return False
            line = bytes(buf[:end])
            del buf[:end + 2]
            if st == _State.CHUNK_SIZE:
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not size_text or not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
                    raise _Bad(400, "bad chunk size")
                out += line + b"\r\n"
                size = int(size_text, 16)
                if size == 0:
                    self.state = _State.TRAILERS
                    self._left = self.max_head  # the trailer section's budget
                else:
                    self._left = size
                    self.state = _State.CHUNK_DATA
                return True
            # a trailer line
            self._left -= len(line) + 2
            if self._left < 0:
                raise _Bad(431, f"trailer section larger than {self.max_head} bytes")
            if not line:
                out += b"\r\n"
                self._message_done()
                return True
            name = self._check_field(line)
            if not _stripped(name):
                out += line + b"\r\n"
            return True
        if st == _State.CHUNK_DATA:
            n = min(self._left, len(buf))
            out += buf[:n]
            del buf[:n]
            self._left -= n
            if self._left == 0:
                self.state = _State.CHUNK_END
            return True
        if st == _State.CHUNK_END:
            if len(buf) < 2:
                if buf[:1] != b"\r"[:len(buf)]:
                    raise _Bad(400, "chunk data not followed by CRLF")
                return False
            if buf[:2] != b"\r\n":
                raise _Bad(400, "chunk data not followed by CRLF")
            out += b"\r\n"
            del buf[:2]
            self.state = _State.CHUNK_SIZE
            return True
        return False

    def _message_done(self) -> None:
        self.state = _State.AWAIT if self._raw_after else _State.HEAD

    @staticmethod
    def _check_field(line: bytes) -> bytes:
        if line[:1] in (b" ", b"\t"):
            raise _Bad(400, "obsolete line folding in a header")
        name, colon, _value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise _Bad(400, f"bad header line {line[:60]!r}")
        if b"\r" in line or b"\n" in line or b"\0" in line:
            raise _Bad(400, "bare CR, LF or NUL in a header")
        return name

    def _rewrite_head(self, head: bytes) -> bytes:
        lines = head.split(b"\r\n")
        request_line = lines[0]
        parts = request_line.split(b" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
            raise _Bad(400, f"bad request line {request_line[:80]!r}")
        if b"\n" in request_line or b"\r" in request_line:
            raise _Bad(400, "bare CR or LF in the request line")
        if not _VERSION.match(parts[2]):
            if parts[2].startswith(b"HTTP/"):
                raise _Bad(505, f"{parts[2].decode('latin-1')} is not served (HTTP/1.x only)")
            raise _Bad(400, f"bad request line {request_line[:80]!r}")
        method = parts[0]
        kept = [request_line]
        te: list[bytes] = []
        cl: list[bytes] = []
        upgrade = False
        conn_tokens: set[bytes] = set()
        for line in lines[1:]:
            name = self._check_field(line)
            low = name.lower()
            value = line.partition(b":")[2].strip(b" \t")
            if low == b"transfer-encoding":
                te += [v.strip(b" \t").lower() for v in value.split(b",") if v.strip(b" \t")]
            elif low == b"content-length":
                cl += [v.strip(b" \t") for v in value.split(b",")]
            elif low == b"upgrade":
                upgrade = True
            elif low == b"connection":
                conn_tokens |= {v.strip(b" \t").lower() for v in value.split(b",")}
            if not _stripped(name):
                kept.append(line)
        if te:
            if cl:
                raise _Bad(400, "both Transfer-Encoding and Content-Length")
            if parts[2] == b"HTTP/1.0" or te[-1] != b"chunked":
                raise _Bad(400, "a request's Transfer-Encoding must end in chunked")
            self.state = _State.CHUNK_SIZE
        elif cl:
            if len(set(cl)) != 1 or not re.fullmatch(rb"[0-9]{1,18}", cl[0]):
                raise _Bad(400, "bad Content-Length")
            self._left = int(cl[0])
            self.state = _State.BODY if self._left else _State.HEAD
        else:
            self.state = _State.HEAD
        self._raw_after = method == b"CONNECT" or (upgrade and b"upgrade" in conn_tokens)
        self._responses.expect(method, self._raw_after)
        if self.state == _State.HEAD and self._raw_after:
            self.state = _State.AWAIT
        return b"\r\n".join(kept) + b"\r\n" + self._added + b"\r\n"


_WAIT = object()  # the tracker needs more bytes
_MORE = object()  # the tracker consumed something and can go on


class _ResponseTracker:
    """Follows the target's responses (status lines, framing) far enough to tell which one
    answers an ``Upgrade``/``CONNECT`` request and whether it switched protocols. Anything
    it cannot follow (a malformed or close-delimited response, an oversized head) ends the
    tracking, and an upgrade then counts as refused: the caller's bytes stay HTTP."""

    def __init__(self, max_head: int) -> None:
        self.max_head = max_head
        self.pending: collections.deque[tuple[bytes, bool]] = collections.deque()
        self.buf = bytearray()
        self.state = "head"  # head, body, chunk_size, chunk_data, chunk_end, trailers, done
        self.left = 0
        self.lost = False  # tracking ended: every later upgrade counts as refused

    def expect(self, method: bytes, upgrade: bool) -> None:
        """A request went to the target: its response comes next in turn."""
        self.pending.append((method, upgrade))

    def feed(self, data: bytes) -> bool | None:
        """Watch target bytes; True/False once the awaited upgrade is answered (switched
        or not), else None."""
        if self.lost:
            return self._lost()
        self.buf += data
        try:
            while self.buf:
                got = self._step()
                if got is _WAIT:
                    break
                if isinstance(got, bool):
                    return got
        except _Bad:
            self.lost = True
            self.buf.clear()
            return self._lost()
        return None

    def _lost(self) -> bool | None:
        return False if self.pending and self.pending[-1][1] else None

    def _step(self) -> bool | object:
        """One piece of the buffer: _WAIT (more bytes needed), _MORE, or the decision."""
        buf = self.buf
        if self.state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.max_head:
                    raise _Bad(502, "response head too large")
                return _WAIT
            head = bytes(buf[:end])
            del buf[:end + 4]
            decided = self._head(head)
            return _MORE if decided is None else decided
        if self.state == "body":
            n = min(self.left, len(buf))
            del buf[:n]
            self.left -= n
            if not self.left:
                self.state = "head"
            return _MORE
        if self.state in ("chunk_size", "trailers"):
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > self.max_head:
                    raise _Bad(502, "chunk line too long")
                return _WAIT
            line = bytes(buf[:end])
            del buf[:end + 2]
            if self.state == "trailers":
                if not line:
                    self.state = "head"
                return _MORE
            size = line.split(b";", 1)[0].strip(b" \t")
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size):
                raise _Bad(502, "bad chunk size")
            self.left = int(size, 16)
            self.state = "chunk_data" if self.left else "trailers"
            return _MORE
        if self.state == "chunk_data":
            n = min(self.left, len(buf))
            del buf[:n]
            self.left -= n
            if not self.left:
                self.state = "chunk_end"
            return _MORE
        if self.state == "chunk_end":
            if len(buf) < 2:
                return _WAIT
            if buf[:2] != b"\r\n":
                raise _Bad(502, "chunk not followed by CRLF")
            del buf[:2]
            self.state = "chunk_size"
            return _MORE
        buf.clear()  # done: nothing more to follow
        return _WAIT

    def _head(self, head: bytes) -> bool | None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not re.fullmatch(rb"HTTP/1\.[01]", parts[0]) \
                or not re.fullmatch(rb"[1-5][0-9][0-9]", parts[1]):
            raise _Bad(502, "bad status line")
        status = int(parts[1])
        if not self.pending:
            raise _Bad(502, "a response without a request")
        method, upgrade = self.pending[0]
        if status == 101 or (method == b"CONNECT" and 200 <= status < 300):
            self.pending.popleft()
            self.state = "done"
            self.lost = True  # no HTTP after a switch
            return upgrade
        if status < 200:
            return None  # interim (100 Continue, 103 Early Hints): the final one follows
        self.pending.popleft()
        te: list[bytes] = []
        cl: bytes | None = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            low = name.strip().lower()
            if low == b"transfer-encoding":
                te += [v.strip().lower() for v in value.split(b",") if v.strip()]
            elif low == b"content-length":
                cl = value.strip()
        if method == b"HEAD" or status in (204, 304):
            self.state = "head"
        elif te:
            if te[-1] != b"chunked":
                raise _Bad(502, "close-delimited response")
            self.state = "chunk_size"
        elif cl is not None:
            if not re.fullmatch(rb"[0-9]{1,18}", cl):
                raise _Bad(502, "bad Content-Length")
            self.left = int(cl)
            self.state = "body" if self.left else "head"
        else:
            raise _Bad(502, "close-delimited response")  # the connection ends with it
        return False if upgrade else None
