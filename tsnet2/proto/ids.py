"""Random identifiers for listeners and connections."""

from __future__ import annotations

import re
import secrets

__all__ = ["ID_RE", "new_id"]

ID_RE = re.compile(r"[0-9a-f]{16}")
"""Matches (with ``fullmatch``) an id made by :func:`new_id`."""


def new_id() -> str:
    """Return 16 lowercase hex characters (8 bytes from :mod:`secrets`), like the prototype."""
    return secrets.token_hex(8)
