"""Coordination: HTTP server, Store interface + SQLite store, async client, CLI.

Importing this package loads aiohttp; ``import tsnet2`` does not import it.
"""

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
