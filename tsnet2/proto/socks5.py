"""SOCKS5 server side (RFC 1928), sans-IO: the egress proxy's greeting and request.

Only what the egress proxy serves: the "no authentication" method and the CONNECT command,
to an IPv4 address, an IPv6 address or a domain name. Feed the bytes a client sends to
:meth:`Socks5ServerCore.receive`; send what :meth:`Socks5ServerCore.data_to_send` returns
after each call. Once the CONNECT request is complete ``receive`` returns it (with any bytes
the client sent after it); the caller then answers with :func:`encode_reply`.

Every failure is a :class:`Socks5Error` carrying the reply code to send (its bytes are in
``data_to_send`` already when there is a reply to give: for a greeting without the
no-auth method that is ``05 FF``, for a bad request ``05 <rep> 00 01 0.0.0.0:0``). The error
is sticky: later calls raise it again. Memory is bounded: at most one incomplete message
(:data:`MAX_MESSAGE` bytes) plus the chunk being fed is ever held.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import ipaddress
from typing import Literal

from tsnet2.proto.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_MESSAGE",
    "SOCKS_VERSION",
    "ConnectRequest",
    "Reply",
    "Socks5Error",
    "Socks5ServerCore",
    "encode_reply",
]

SOCKS_VERSION = 5
METHOD_NO_AUTH = 0x00
METHOD_NONE_ACCEPTABLE = 0xFF
CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE = 1, 2, 3
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4
MAX_MESSAGE = 4 + 1 + 255 + 2
"""The longest message a client sends: a request with a 255-byte domain (a greeting is at
most 2 + 255)."""


class Reply(enum.IntEnum):
    """SOCKS5 reply codes (RFC 1928 §6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks5Error(RemoteProtocolError):
    """The client broke SOCKS5 or asked for what is not served; ``reply`` is the code
    answered (None when the answer was ``05 FF`` to the greeting, or nothing at all)."""

    def __init__(self, message: str, reply: Reply | None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A complete CONNECT request. ``host`` is the domain name as sent (ASCII) or the
    address in its canonical text form; ``rest`` the bytes the client sent after it."""

    host: str
    port: int
    atyp: Literal["domain", "ipv4", "ipv6"]
    rest: bytes = b""


def encode_reply(reply: Reply, host: str | None = None, port: int = 0) -> bytes:
    """A reply to a request: ``reply`` and the bound address (an IP literal; None or a
    name: 0.0.0.0)."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(0)
    if host is not None:
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host.strip("[]"))
    if not 0 <= port <= 65535:
        raise LocalProtocolError(f"port out of range: {port}")
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((SOCKS_VERSION, int(reply), 0, atyp)) + ip.packed + port.to_bytes(2, "big")


def _valid_domain(raw: bytes) -> bool:
    # A host name or address literal as text: printable ASCII without spaces or the
    # characters that would change how it reads in a host:port or a log line.
    return all(0x21 <= b <= 0x7E for b in raw) and not any(c in raw for c in b"/\\@[]%\"'")


class Socks5ServerCore:
    """One client connection's greeting and request, as a state machine."""

    __slots__ = ("_buf", "_error", "_out", "_state")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._out = bytearray()
        self._state: Literal["greeting", "request", "done"] = "greeting"
        self._error: Socks5Error | None = None

    @property
    def state(self) -> str:
        """``greeting``, ``request`` (the method was chosen), ``done`` or ``error``."""
        return "error" if self._error is not None else self._state

    @property
    def buffered(self) -> int:
        """Bytes held (an incomplete message)."""
        return len(self._buf)

    def data_to_send(self) -> bytes:
        """Bytes to write to the client now (and forget them)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _fail(self, message: str, reply: Reply | None, *, answer: bytes | None = None) -> None:
        self._error = Socks5Error(message, reply)
        self._buf.clear()
        if answer is not None:
            self._out += answer
        elif reply is not None:
            self._out += encode_reply(reply)
        raise self._error

    def receive(self, data: bytes) -> ConnectRequest | None:
        """Feed bytes from the client (``b""``: it closed). Returns the CONNECT request once
        it is complete, else None. Raises :class:`Socks5Error` (sticky)."""
        if self._error is not None:
            raise self._error
        if self._state == "done":
            raise LocalProtocolError("the request was already returned")
        if not data:
            self._fail(f"client closed the connection during the SOCKS5 {self._state}", None)
        self._buf += data
        if self._state == "greeting" and not self._greeting():
            return None
        if self._state == "request":
            return self._request()
        return None  # pragma: no cover

    def _greeting(self) -> bool:
        buf = self._buf
        if buf[0] != SOCKS_VERSION:
            self._fail(f"not SOCKS5: version byte {buf[0]:#04x}", None)
        if len(buf) < 2:
            return False
        n = buf[1]
        if n == 0:
            self._fail("SOCKS5 greeting offers no authentication method", None,
                       answer=bytes((SOCKS_VERSION, METHOD_NONE_ACCEPTABLE)))
        if len(buf) < 2 + n:
            return False
        methods = bytes(buf[2:2 + n])
        del buf[:2 + n]
        if METHOD_NO_AUTH not in methods:
            self._fail("the client offers no method this proxy accepts (only 'no "
                       "authentication', 0x00)", None,
                       answer=bytes((SOCKS_VERSION, METHOD_NONE_ACCEPTABLE)))
        self._out += bytes((SOCKS_VERSION, METHOD_NO_AUTH))
        self._state = "request"
        return True

    def _request(self) -> ConnectRequest | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] != SOCKS_VERSION:
            self._fail(f"SOCKS5 request with version byte {buf[0]:#04x}",
                       Reply.GENERAL_FAILURE)
        if len(buf) < 4:
            return None
        cmd, rsv, atyp = buf[1], buf[2], buf[3]
        if rsv != 0:
            self._fail(f"SOCKS5 request with reserved byte {rsv:#04x}", Reply.GENERAL_FAILURE)
        if atyp == ATYP_IPV4:
            need, alen, start = 4 + 4 + 2, 4, 4
        elif atyp == ATYP_IPV6:
            need, alen, start = 4 + 16 + 2, 16, 4
        elif atyp == ATYP_DOMAIN:
            if len(buf) < 5:
                return None
            alen, start = buf[4], 5
            need = 5 + alen + 2
            if alen == 0:
                self._fail("SOCKS5 request with an empty domain name", Reply.GENERAL_FAILURE)
        else:
            self._fail(f"SOCKS5 address type {atyp:#04x} is not supported",
                       Reply.ADDRESS_TYPE_NOT_SUPPORTED)
        if len(buf) < need:
            return None
        raw = bytes(buf[start:start + alen])
        port = int.from_bytes(buf[start + alen:need], "big")
        rest = bytes(buf[need:])
        buf.clear()
        if cmd in (CMD_BIND, CMD_UDP_ASSOCIATE):
            name = "BIND" if cmd == CMD_BIND else "UDP ASSOCIATE"
            self._fail(f"SOCKS5 {name} is not supported: this proxy serves CONNECT only",
                       Reply.COMMAND_NOT_SUPPORTED)
        if cmd != CMD_CONNECT:
            self._fail(f"SOCKS5 command {cmd:#04x} is not supported",
                       Reply.COMMAND_NOT_SUPPORTED)
        kind: Literal["domain", "ipv4", "ipv6"]
        if atyp == ATYP_DOMAIN:
            if not _valid_domain(raw):
                self._fail(f"SOCKS5 domain name {raw[:64]!r} is not a host name",
                           Reply.GENERAL_FAILURE)
            host, kind = raw.decode("ascii"), "domain"
        elif atyp == ATYP_IPV4:
            host, kind = str(ipaddress.IPv4Address(raw)), "ipv4"
        else:
            host, kind = str(ipaddress.IPv6Address(raw)), "ipv6"
        if port == 0:
            self._fail("SOCKS5 request for port 0", Reply.GENERAL_FAILURE)
        self._state = "done"
        return ConnectRequest(host=host, port=port, atyp=kind, rest=rest)
