"""Dial (0x03) and accept (0x04) channel header lines (seed-spec §2.4, §2.5).

Every header is one compact JSON object followed by ``\\n``; after the last header the
connection carries raw bytes. Encoders refuse to build a line the peer would reject
(longer than :data:`MAX_HEADER_LINE`); decoders accept lines with or without the ``\\n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tsnet2.proto._decode import get_bool, get_str, get_uint64, parse_json_object
from tsnet2.proto.channels import MAX_HEADER_LINE
from tsnet2.proto.codes import ErrorCode, parse_code
from tsnet2.proto.errors import ChannelRefused, LocalProtocolError, RemoteProtocolError
from tsnet2.proto.gojson import go_json
from tsnet2.proto.tls import TLSDialOptions, TLSInfo

__all__ = [
    "DIAL_OP",
    "AcceptHeader",
    "DialReply",
    "DialRequest",
    "decode_accept_header",
    "decode_accept_request",
    "decode_dial_reply",
    "decode_dial_request",
    "encode_accept_header",
    "encode_accept_refusal",
    "encode_accept_request",
    "encode_dial_reply",
    "encode_dial_request",
]

DIAL_OP = "dial"
"""The only dial-channel op."""


@dataclass(frozen=True, slots=True)
class DialRequest:
    """The first line on a dial channel: ``{"op":"dial","network":"tcp","addr":"h:p"}``.

    ``tls`` (tsnet2 extension, never sent by the prototype's shim): the daemon originates
    TLS to the peer and the channel then carries plaintext (:class:`TLSDialOptions`).
    ``network`` ``"udp"``/``"udp4"``/``"udp6"`` (extension): the channel carries datagrams
    framed by :mod:`tsnet2.proto.udp`.
    """

    op: str
    network: str
    addr: str
    tls: TLSDialOptions | None = None


@dataclass(frozen=True, slots=True)
class DialReply:
    """The daemon's answer on a dial channel.

    ``local``/``remote`` are our additive extension (the flow's tailnet addresses); the
    prototype sends neither, so both are ``""`` when talking to it. Also additive: ``tls``
    (the session the daemon negotiated for a TLS dial) and ``max_datagram`` (for a UDP dial,
    the largest datagram payload the tunnel carries unfragmented; 0 otherwise).
    """

    ok: bool
    err: str = ""
    local: str = ""
    remote: str = ""
    code: ErrorCode | None = None
    tls: TLSInfo | None = None
    max_datagram: int = 0


@dataclass(frozen=True, slots=True)
class AcceptHeader:
    """The line the daemon writes on a parked accept slot when it hands over a flow.

    Additive: ``tls`` for a flow of a ``listen_tls`` listener (the daemon terminated TLS);
    ``max_datagram`` on the packet channel of a UDP listener (``remote`` is then empty and
    every datagram carries its peer's address, :mod:`tsnet2.proto.udp`).
    """

    listener_id: str
    local: str
    remote: str
    tls: TLSInfo | None = None
    max_datagram: int = 0


def _line(doc: dict[str, Any], what: str) -> bytes:
    data = go_json(doc)
    if len(data) > MAX_HEADER_LINE:
        raise LocalProtocolError(
            f"{what} of {len(data)} bytes exceeds {MAX_HEADER_LINE}; the peer would reject it"
        )
    return data + b"\n"


def encode_dial_request(network: str, addr: str, tls: TLSDialOptions | None = None) -> bytes:
    """``{"op":"dial","network":..,"addr":..}\\n``; network/addr omitted when empty, ``tls``
    only for a TLS dial."""
    doc: dict[str, Any] = {"op": DIAL_OP}
    if network:
        doc["network"] = network
    if addr:
        doc["addr"] = addr
    if tls is not None:
        doc["tls"] = tls.to_json()
    return _line(doc, "dial request")


def decode_dial_request(line: bytes) -> DialRequest:
    """Decode a dial request; an op other than ``"dial"`` is a :class:`RemoteProtocolError`."""
    w = "dial request"
    doc = parse_json_object(line, w, MAX_HEADER_LINE)
    op = get_str(doc, "op", w)
    if op != DIAL_OP:
        raise RemoteProtocolError(f'{w}: unknown op {op!r:.60}; expected "dial"')
    tls = doc.get("tls")
    return DialRequest(op, get_str(doc, "network", w), get_str(doc, "addr", w),
                       None if tls is None else TLSDialOptions.from_json(tls, f"{w} tls"))


def encode_dial_reply(ok: bool, err: str = "", local: str = "", remote: str = "",
                      code: ErrorCode | None = None, tls: TLSInfo | None = None,
                      max_datagram: int = 0) -> bytes:
    """``{"ok":true}\\n`` or ``{"ok":false,"err":"...","code":"..."}\\n``.

    ``local``/``remote`` are appended when non-empty, ``code`` on failures, ``tls`` and
    ``max_datagram`` (when non-zero) on successes (additive; old clients ignore them).
    """
    if not ok and not err:
        raise LocalProtocolError("a failed dial reply needs an error message")
    doc: dict[str, Any] = {"ok": bool(ok)}
    if err:
        doc["err"] = err
    if code is not None and not ok:
        doc["code"] = str(code)
    if local:
        doc["local"] = local
    if remote:
        doc["remote"] = remote
    if ok and tls is not None:
        doc["tls"] = tls.to_json()
    if ok and max_datagram:
        doc["max_datagram"] = max_datagram
    return _line(doc, "dial reply")


def decode_dial_reply(line: bytes) -> DialReply:
    """Decode a dial reply (missing ``ok`` is ``false``, as in Go)."""
    w = "dial reply"
    doc = parse_json_object(line, w, MAX_HEADER_LINE)
    tls = doc.get("tls")
    return DialReply(
        ok=get_bool(doc, "ok", w),
        err=get_str(doc, "err", w),
        local=get_str(doc, "local", w),
        remote=get_str(doc, "remote", w),
        code=parse_code(doc.get("code")),
        tls=None if tls is None else TLSInfo.from_json(tls, f"{w} tls"),
        max_datagram=get_uint64(doc, "max_datagram", w),
    )


def encode_accept_request(listener_id: str) -> bytes:
    """``{"listener_id":"..."}\\n``: park this connection as a slot for a listener."""
    if not listener_id:
        raise LocalProtocolError("accept request needs a listener id")
    return _line({"listener_id": listener_id}, "accept request")


def decode_accept_request(line: bytes) -> str:
    """Return the listener id of an accept request; missing or empty is an error."""
    w = "accept request"
    listener_id = get_str(parse_json_object(line, w, MAX_HEADER_LINE), "listener_id", w)
    if not listener_id:
        raise RemoteProtocolError(f'{w}: missing or empty "listener_id"')
    return listener_id


def encode_accept_header(listener_id: str, local: str, remote: str,
                         tls: TLSInfo | None = None, max_datagram: int = 0) -> bytes:
    """``{"listener_id":..,"local":..,"remote":..}\\n`` (these keys always present; ``tls``
    and ``max_datagram`` added when set)."""
    doc: dict[str, Any] = {"listener_id": listener_id, "local": local, "remote": remote}
    if tls is not None:
        doc["tls"] = tls.to_json()
    if max_datagram:
        doc["max_datagram"] = max_datagram
    return _line(doc, "accept header")


def encode_accept_refusal(err: str, code: ErrorCode) -> bytes:
    """``{"err":"...","code":"..."}\\n``: instead of a header, why a slot is closed.

    The daemon writes it on a parked slot it closes for a reason the app should hear (the
    node went away, the uid is refused). The prototype's shim cannot decode it and re-parks,
    exactly as after a plain close.
    """
    if not err:
        raise LocalProtocolError("an accept refusal needs an error message")
    return _line({"err": err, "code": str(code)}, "accept refusal")


def decode_accept_header(line: bytes) -> AcceptHeader:
    """Decode the header the daemon writes when it hands a flow to a parked slot.

    A refusal line (``encode_accept_refusal``) raises :class:`ChannelRefused`.
    """
    w = "accept header"
    doc = parse_json_object(line, w, MAX_HEADER_LINE)
    err = get_str(doc, "err", w)
    if err and "listener_id" not in doc:
        code = parse_code(doc.get("code"))
        raise ChannelRefused(err, str(code or ""))
    tls = doc.get("tls")
    return AcceptHeader(
        listener_id=get_str(doc, "listener_id", w),
        local=get_str(doc, "local", w),
        remote=get_str(doc, "remote", w),
        tls=None if tls is None else TLSInfo.from_json(tls, f"{w} tls"),
        max_datagram=get_uint64(doc, "max_datagram", w),
    )
