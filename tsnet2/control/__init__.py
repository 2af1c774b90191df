"""Coordination: HTTP server, Store interface + SQLite store, async client, CLI.

Names are loaded on first use, so the daemon (which needs only the client) does not pay for
the server and the SQLite store. ``import tsnet2`` imports none of this.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tsnet2.control.authkeys import create_auth_key
    from tsnet2.control.client import (
        AuthError,
        ControlClient,
        ControlError,
        ControlUnavailable,
        RegisterResult,
    )
    from tsnet2.control.server import ControlServer
    from tsnet2.control.sqlite_store import SQLiteStore
    from tsnet2.control.store import Store

_WHERE = {
    "AuthError": "client",
    "ControlClient": "client",
    "ControlError": "client",
    "ControlServer": "server",
    "ControlUnavailable": "client",
    "RegisterResult": "client",
    "SQLiteStore": "sqlite_store",
    "Store": "store",
    "create_auth_key": "authkeys",
}

__all__ = [
    "AuthError",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "ControlUnavailable",
    "RegisterResult",
    "SQLiteStore",
    "Store",
    "create_auth_key",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'tsnet2.control' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tsnet2.control.{_WHERE[name]}"), name)
