"""Strict, typed helpers for decoding peer-supplied JSON (internal).

Every failure is a :class:`RemoteProtocolError` whose message names the document and
the field, so an operator reading a log can tell which peer sent what.
"""

from __future__ import annotations

import json
from typing import Any

from tsnet2.proto.errors import LineTooLong, RemoteProtocolError


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(data: bytes | str, what: str) -> Any:
    """Parse one JSON document (Go-strict: no NaN/Infinity)."""
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, ...
        raise RemoteProtocolError(f"{what}: invalid JSON: {e}") from None


def parse_json_object(line: bytes, what: str, max_len: int) -> dict[str, Any]:
    """Parse ``line`` (with or without a trailing newline) as a JSON object."""
    if len(line.rstrip(b"\r\n")) > max_len:
        raise LineTooLong(f"{what}: line longer than {max_len} bytes")
    obj = parse_json(line, what)
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what}: expected a JSON object, got {type_name(obj)}")
    return obj


def type_name(value: Any) -> str:
    """The JSON type name of a decoded value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def get_str(obj: dict[str, Any], key: str, what: str) -> str:
    """``obj[key]`` as a string; missing or null gives ``""`` (Go's zero value)."""
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RemoteProtocolError(f'{what}: "{key}" must be a string, got {type_name(value)}')
    return value


def get_bool(obj: dict[str, Any], key: str, what: str) -> bool:
    """``obj[key]`` as a boolean; missing or null gives ``False``."""
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RemoteProtocolError(f'{what}: "{key}" must be a boolean, got {type_name(value)}')
    return value


def get_uint64(obj: dict[str, Any], key: str, what: str) -> int:
    """``obj[key]`` as an unsigned 64-bit integer; missing or null gives 0."""
    value = obj.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise RemoteProtocolError(
            f'{what}: "{key}" must be an integer 0..2^64-1, got {value!r:.40}'
        )
    return value


def get_str_list(obj: dict[str, Any], key: str, what: str) -> tuple[str, ...] | None:
    """``obj[key]`` as a tuple of strings; missing or null gives ``None`` (Go's nil slice)."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RemoteProtocolError(f'{what}: "{key}" must be an array of strings or null')
    return tuple(value)
