"""Bounded JSON parsing, shared by both ends of the coordination HTTP API.

The control server parses request bodies with it (:mod:`tsnet2.control.api`), the control
client parses replies with it (:mod:`tsnet2.controlclient.client`): neither a hostile node
nor a hostile or broken server can make the other side recurse (deep nesting) or convert
huge numbers. It lives here, below both, so the daemon's control client imports nothing of
the server (tests/layers.toml).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a JSON document."""
MAX_JSON_NUMBER = 100
"""Longest number (characters, sign and exponent included) accepted in a JSON document."""


class BadRequest(ValueError):
    """The request is malformed; the message says what to fix (the server answers HTTP 400).

    :func:`loads_bounded` raises it for any document it refuses; the control client turns
    it into a :class:`~tsnet2.controlclient.ControlError` about an invalid reply.
    """


# A JSON string, or an unterminated one up to the end. Possessive, so each character is
# looked at once: linear time on any input.
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_JSON_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_too_deep(text: str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """True if arrays/objects in ``text`` nest deeper than ``max_depth`` (strings skipped).

    Linear time, no recursion: run before :func:`json.loads`, whose C scanner recurses
    once per level and raises ``RecursionError`` on deep input.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return False
    depth = 0
    for ch in _JSON_NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        if ch == "[" or ch == "{":
            depth += 1
            if depth > max_depth:
                return True
        elif depth > 0:
            depth -= 1
    return False


def _number(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if len(text) > MAX_JSON_NUMBER:
            raise BadRequest(
                f"request body has a number of {len(text)} characters; "
                f"at most {MAX_JSON_NUMBER} are accepted"
            )
        return convert(text)

    return parse


def _constant(name: str) -> Any:
    raise BadRequest(f"request body is not valid JSON: {name} is not a JSON value")


_parse_int = _number(int)
_parse_float = _number(float)


def loads_bounded(raw: bytes) -> Any:
    """Parse a UTF-8 JSON document with bounded nesting and number length.

    Raises :class:`BadRequest` (never ``RecursionError`` or the ``int`` digit-limit
    ``ValueError``): nesting deeper than :data:`MAX_JSON_DEPTH` is refused before parsing,
    numbers longer than :data:`MAX_JSON_NUMBER` characters while parsing (before they are
    converted), and ``NaN``/``Infinity`` are not JSON.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: not UTF-8 ({e.reason})") from None
    if json_too_deep(text):
        raise BadRequest(f"request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_constant
        )
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    except RecursionError:  # not reachable after json_too_deep; never a 500 all the same
        raise BadRequest(
            f"request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels"
        ) from None


