"""The daemon's client of the coordination HTTP API (``tsnet2 control``).

HTTP/1.1 on asyncio streams and h11: importing this package loads h11 and the standard
library, nothing of the coordination server (aiohttp, SQLite). It imports nothing else of
ours, so the daemon can use it and stay lean (tests/layers.toml, docs/control.md "Client").

Modules: :mod:`~tsnet2.controlclient.client` (the client and its errors),
:mod:`~tsnet2.controlclient.boundedjson` (the JSON limits both ends of the API apply).
"""

from tsnet2.controlclient.client import (
    AuthError,
    CertResult,
    ControlClient,
    ControlError,
    ControlUnavailable,
    RegisterResult,
)

__all__ = [
    "AuthError",
    "CertResult",
    "ControlClient",
    "ControlError",
    "ControlUnavailable",
    "RegisterResult",
]
