"""JSON encoding and time formatting that match Go's ``encoding/json`` byte for byte.

Go's encoder (the one the prototype daemon, its shim and Tailscale's LocalAPI use):

- writes compact JSON (no spaces) and keeps non-ASCII characters as UTF-8;
- escapes ``<``, ``>`` and ``&`` as ``\\u003c``, ``\\u003e``, ``\\u0026`` (HTML-safe);
- escapes U+2028 and U+2029 (JavaScript line terminators);
- writes control characters as ``\\n``, ``\\r``, ``\\t``, ``\\b``, ``\\f`` or ``\\u00XX``
  (lowercase hex), exactly as Python's :mod:`json` does;
- replaces invalid UTF-8 (in Python: lone surrogates) with U+FFFD;
- orders struct fields by declaration and map keys alphabetically. Python dicts keep
  insertion order, so callers build dicts in Go struct order, or sort them for Go maps.

``time.Time`` marshals as RFC 3339 with nanoseconds and trailing zeros trimmed
(``time.RFC3339Nano``); the zero time is ``0001-01-01T00:00:00Z``.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from typing import Any

__all__ = ["GO_ZERO_TIME", "go_json", "go_time", "go_time_ns"]

GO_ZERO_TIME = "0001-01-01T00:00:00Z"
"""How Go marshals the zero ``time.Time``."""

_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def go_json(obj: Any) -> bytes:
    """Encode ``obj`` as Go's ``json.Marshal`` would, as UTF-8 bytes (no trailing newline).

    Raises :class:`ValueError` for NaN/Infinity and :class:`TypeError` for values JSON
    cannot hold. These characters can only occur inside JSON strings, so escaping them
    in the whole output is exact.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    if _ESCAPE_RE.search(text):
        text = _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group()], text)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE_RE.sub("\ufffd", text).encode("utf-8")


_EPOCH = _dt.datetime(1970, 1, 1)


def _seconds_text(dt: _dt.datetime) -> str:
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    )


_last_second: tuple[int, str] = (-1, "")  # the last whole second formatted (a tuple: atomic)


def go_time_ns(ns: int) -> str:
    """Format nanoseconds since the Unix epoch as UTC RFC 3339, Go ``RFC3339Nano`` style.

    The fraction has up to nine digits with trailing zeros trimmed, and is left out when
    zero: ``2026-05-19T16:06:10.12345Z``, ``2026-05-19T16:06:10Z``.
    """
    global _last_second
    seconds, frac = divmod(ns, 1_000_000_000)
    last = _last_second
    if last[0] == seconds:  # one record after another: mostly the same second
        text = last[1]
    else:
        text = _seconds_text(_EPOCH + _dt.timedelta(seconds=seconds))
        _last_second = (seconds, text)
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def go_time(dt: _dt.datetime | None) -> str:
    """Format a :class:`datetime.datetime` as Go marshals a UTC ``time.Time``.

    ``None`` gives the zero time ``0001-01-01T00:00:00Z``. A naive datetime is taken to
    be UTC; an aware one is converted to UTC. Python datetimes hold microseconds, so at
    most six fraction digits appear.
    """
    if dt is None:
        return GO_ZERO_TIME
    if dt.tzinfo is not None:
        dt = dt.astimezone(_dt.UTC).replace(tzinfo=None)
    text = _seconds_text(dt)
    if dt.microsecond:
        text += "." + f"{dt.microsecond:06d}".rstrip("0")
    return text + "Z"
