"""Control channel (0x01): frames and the client/server state machines (sans-IO).

Wire format (seed-spec §2.2): one JSON object per line, keys in Go struct order
``id, method, params, result, error``, all omitted when empty. ``params`` and ``result``
are **base64 (standard, padded) strings of a JSON document**, because the prototype's
Go frame declares them as ``[]byte``. On decode we also accept a nested JSON value.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from tsnet2.proto._decode import get_str, get_uint64, parse_json, parse_json_object, type_name
from tsnet2.proto.channels import MAX_CONTROL_LINE
from tsnet2.proto.codes import ErrorCode, parse_code
from tsnet2.proto.errors import (
    ChannelRefused,
    FrameError,
    LocalProtocolError,
    RemoteProtocolError,
    WireError,
)
from tsnet2.proto.gojson import go_json
from tsnet2.proto.lines import LineReader

__all__ = [
    "ControlClientCore",
    "ControlRequest",
    "ControlServerCore",
    "Response",
    "decode_frame",
    "encode_request",
    "encode_response",
]

_MAX_ID = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """A control request: ``method`` with optional ``params`` (a JSON object)."""

    id: int
    method: str
    params: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Response:
    """A control reply: ``result`` on success, or ``error`` (a message) on failure.

    When a peer sends both, ``error`` wins (that is what the Go client does). ``code`` is
    our additive ``"code"`` key on error replies (:class:`ErrorCode`); None when absent.
    """

    id: int
    result: dict[str, Any] | None = None
    error: str | None = None
    code: ErrorCode | None = None

    @property
    def ok(self) -> bool:
        """True for a success reply."""
        return self.error is None


def _b64_json(doc: dict[str, Any]) -> str:
    return base64.b64encode(go_json(doc)).decode("ascii")


def _check_id(id_: int) -> None:
    if isinstance(id_, bool) or not isinstance(id_, int) or not 0 <= id_ <= _MAX_ID:
        raise LocalProtocolError(f"frame id must be an integer 0..2^64-1, got {id_!r}")


def _check_doc(doc: object, what: str) -> None:
    if doc is not None and not isinstance(doc, dict):
        raise LocalProtocolError(f"{what} must be a dict or None, got {type(doc).__name__}")


def _line(frame: dict[str, Any]) -> bytes:
    data = go_json(frame) + b"\n"
    if len(data) - 1 > MAX_CONTROL_LINE:
        raise LocalProtocolError(
            f"control frame of {len(data) - 1} bytes exceeds {MAX_CONTROL_LINE}; "
            "the peer would reject it"
        )
    return data


def encode_request(req: ControlRequest) -> bytes:
    """Encode a request as one line: ``{"id":1,"method":"up"}\\n`` (params as base64 JSON)."""
    _check_id(req.id)
    if not isinstance(req.method, str) or not req.method:
        raise LocalProtocolError("request method must be a non-empty string")
    _check_doc(req.params, "request params")
    frame: dict[str, Any] = {}
    if req.id:
        frame["id"] = req.id
    frame["method"] = req.method
    if req.params is not None:
        frame["params"] = _b64_json(req.params)
    return _line(frame)


def encode_response(resp: Response) -> bytes:
    """Encode a reply as one line.

    Success: ``{"id":1,"result":"e30="}\\n`` (``result=None`` is sent as ``{}`` so a Go
    client always finds a document to unmarshal). Failure: ``{"id":1,"error":"..."}\\n``.
    """
    _check_id(resp.id)
    _check_doc(resp.result, "response result")
    frame: dict[str, Any] = {}
    if resp.id:
        frame["id"] = resp.id
    if resp.error is not None:
        if not isinstance(resp.error, str) or not resp.error:
            raise LocalProtocolError("an error reply needs a non-empty error message")
        if resp.result is not None:
            raise LocalProtocolError("a reply carries either a result or an error, not both")
        frame["error"] = resp.error
        if resp.code is not None:
            frame["code"] = str(resp.code)
    else:
        frame["result"] = _b64_json(resp.result if resp.result is not None else {})
    return _line(frame)


def _decode_doc(value: Any, key: str) -> dict[str, Any] | None:
    what = f'control frame "{key}"'
    if value is None:
        return None
    if isinstance(value, str):
        if value == "":  # Go omits an empty []byte; treat "" as absent
            return None
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RemoteProtocolError(f"{what}: invalid base64: {e}") from None
        value = parse_json(raw, f"{what} (base64-decoded)")
        if value is None:
            return None
    if not isinstance(value, dict):
        raise RemoteProtocolError(
            f"{what} must be a JSON object (nested or base64), got {type_name(value)}"
        )
    return value


def decode_frame(line: bytes) -> ControlRequest | Response:
    """Decode one control line (with or without ``\\n``) into a ControlRequest or Response.

    A frame with a ``method`` key is a :class:`ControlRequest`; anything else a :class:`Response`.
    Raises :class:`RemoteProtocolError` on bad JSON, a non-object, wrong field types, bad
    base64, or params/result that are not JSON objects.
    """
    what = "control frame"
    frame = parse_json_object(line, what, MAX_CONTROL_LINE)
    id_ = get_uint64(frame, "id", what)
    if "method" in frame and frame["method"] is not None:
        method = get_str(frame, "method", what)
        if not method:
            raise RemoteProtocolError('control frame: "method" must not be empty')
        return ControlRequest(id_, method, _decode_doc(frame.get("params"), "params"))
    error = get_str(frame, "error", what)
    if error:
        return Response(id_, None, error, parse_code(frame.get("code")))
    result = _decode_doc(frame.get("result"), "result")
    return Response(id_, result, None)


_ID_PREFIX = re.compile(rb'\A\s*\{\s*"id"\s*:\s*([0-9]{1,20})\s*[,}]')


def _salvage_id(line: bytes) -> int:
    """The id of a frame that failed to decode, when it can still be read; else 0."""
    try:
        frame = parse_json_object(line, "control frame", MAX_CONTROL_LINE)
        id_ = get_uint64(frame, "id", "control frame")
    except RemoteProtocolError:
        m = _ID_PREFIX.match(line)
        id_ = int(m.group(1)) if m else 0
    return id_ if 0 <= id_ <= _MAX_ID else 0


def _is_blank(line: bytes) -> bool:
    return not line.strip()


class ControlClientCore:
    """The app side of the control channel: allocates ids and matches replies.

    Ids start at 1 and increase. Replies may arrive in any order. Replies to ids that are
    not pending (never sent, or :meth:`cancel`-ed) are dropped, as are frames with id 0
    (reserved for notifications) and requests from the daemon, except an id-0 *error*
    frame: the daemon says why it is closing the channel (for example a uid it refuses),
    and :meth:`receive_data` raises :class:`ChannelRefused` with that reason.
    """

    def __init__(self) -> None:
        """Create a core with no pending requests."""
        self._reader = LineReader(MAX_CONTROL_LINE)
        self._next_id = 1
        self._pending: set[int] = set()

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed (never more than a line plus one chunk)."""
        return self._reader.buffered

    @property
    def pending(self) -> frozenset[int]:
        """Ids of requests sent and not yet answered or cancelled."""
        return frozenset(self._pending)

    def request(self, method: str, params: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """Allocate an id for a new request; return it with the bytes to send."""
        id_ = self._next_id
        data = encode_request(ControlRequest(id_, method, params))
        self._next_id += 1
        self._pending.add(id_)
        return id_, data

    def cancel(self, id_: int) -> None:
        """Forget a pending id (the caller gave up); a late reply to it is dropped."""
        self._pending.discard(id_)

    def receive_data(self, data: bytes) -> list[Response]:
        """Feed bytes from the daemon; return the replies to pending requests, in order.

        ``b""`` means EOF: raises :class:`RemoteProtocolError` ("control channel closed by
        the daemon"); the caller then fails every id in :attr:`pending`. A malformed frame
        also raises :class:`RemoteProtocolError`: the daemon is not speaking the protocol.
        """
        out: list[Response] = []
        try:
            self._reader.feed(data)
            while (line := self._reader.next_line()) is not None:
                if _is_blank(line):
                    continue
                frame = decode_frame(line)
                if isinstance(frame, ControlRequest):
                    continue
                if frame.id == 0:
                    if frame.error:
                        raise ChannelRefused(frame.error, str(frame.code or ""))
                    continue
                if frame.id in self._pending:
                    self._pending.discard(frame.id)
                    out.append(frame)
            if not data:
                raise RemoteProtocolError("control channel closed by the daemon")
        except WireError:
            # The channel is unusable; keep matched ids pending so the caller fails them
            # all instead of leaving a waiter whose reply was decoded but never returned.
            self._pending.update(r.id for r in out)
            raise
        return out


class ControlServerCore:
    """The daemon side of the control channel: parses requests and encodes replies.

    A malformed line yields a :class:`FrameError` item (with the frame's id when it could
    be read, so the daemon answers it) and parsing continues with the next line. A line over
    :data:`MAX_CONTROL_LINE` is fatal: :meth:`receive_data` raises :class:`LineTooLong`.
    """

    def __init__(self) -> None:
        """Create a core with an empty line buffer."""
        self._reader = LineReader(MAX_CONTROL_LINE)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed (never more than a line plus one chunk)."""
        return self._reader.buffered

    @property
    def eof(self) -> bool:
        """True once the client closed and every complete line was returned."""
        return self._reader.eof

    def receive_data(self, data: bytes) -> list[ControlRequest | WireError]:
        """Feed bytes from the client (``b""`` at EOF); return requests and per-line errors.

        Raises :class:`LineTooLong` for an over-long line and :class:`RemoteProtocolError`
        when EOF arrives in the middle of a line.
        """
        self._reader.feed(data)
        out: list[ControlRequest | WireError] = []
        while (line := self._reader.next_line()) is not None:
            if _is_blank(line):
                continue
            try:
                frame = decode_frame(line)
            except RemoteProtocolError as e:
                out.append(FrameError(str(e), _salvage_id(line)))
                continue
            if isinstance(frame, Response):
                out.append(
                    FrameError(
                        f'control frame id {frame.id}: expected a request (with "method"), '
                        "got a reply", frame.id,
                    )
                )
                continue
            out.append(frame)
        return out

    def reply(self, id_: int, result: dict[str, Any] | None = None) -> bytes:
        """Encode a success reply (``None`` is sent as ``{}``)."""
        return encode_response(Response(id_, result if result is not None else {}))

    def reply_error(self, id_: int, message: str, code: ErrorCode | None = None) -> bytes:
        """Encode an error reply with a message the app can act on (and its code)."""
        return encode_response(Response(id_, None, message, code))

    def refuse(self, message: str, code: ErrorCode) -> bytes:
        """Encode the id-0 error frame sent just before the daemon closes the channel."""
        return encode_response(Response(0, None, message, code))
