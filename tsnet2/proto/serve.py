"""Serve rules: which tailnet port the daemon forwards to which target inside the pod.

``tsnet2d --serve RULE`` (repeatable) takes ``PORT=TARGET`` or ``PORT=MODE:TARGET``:

- ``PORT``: the tailnet port, 1-65535, bound on the node's tailnet addresses;
- ``MODE``: ``tcp`` (the default: the bytes as they are), ``http`` (the daemon adds the
  caller's identity as request headers, :mod:`tsnet2.proto.httpident`), ``proxy`` (a PROXY
  protocol v2 header first, :mod:`tsnet2.proto.proxyv2`) or ``http+proxy`` (both: the
  PROXY header, then the rewritten requests; for servers such as gunicorn that take the
  client address only from PROXY protocol);
- ``TARGET``: ``HOST:PORT`` with HOST a loopback literal (``127.0.0.1`` or any address of
  127.0.0.0/8, ``[::1]``) or ``localhost`` (taken as 127.0.0.1, never looked up), or
  ``unix:/ABSOLUTE/PATH``.

Examples: ``80=127.0.0.1:8080``, ``80=http:127.0.0.1:8080``, ``2222=proxy:unix:/tsnet2/ssh.sock``.
Pure functions; a bad rule is a ValueError whose message tsnet2d prints as is.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Literal, get_args

__all__ = [
    "MAX_UNIX_PATH",
    "SERVE_MODES",
    "ServeMode",
    "ServeRule",
    "ServeTarget",
    "parse_serve_rule",
    "parse_serve_target",
]

ServeMode = Literal["tcp", "http", "proxy", "http+proxy"]
SERVE_MODES: tuple[ServeMode, ...] = get_args(ServeMode)
MAX_UNIX_PATH = 107  # bytes of sun_path without the terminating NUL


@dataclasses.dataclass(frozen=True)
class ServeTarget:
    """Where serve flows go: a loopback TCP address (``host``, ``port``) or a Unix socket
    (``path``)."""

    host: str = ""  # an IP literal ("127.0.0.1", "::1"); empty for a Unix socket
    port: int = 0
    path: str = ""  # an absolute path; empty for TCP

    @property
    def is_unix(self) -> bool:
        """True for a Unix socket target."""
        return bool(self.path)

    def __str__(self) -> str:
        """The target as the traffic log's ``target`` shows it: ``127.0.0.1:8080``,
        ``[::1]:8080`` or ``unix:/path``."""
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class ServeRule:
    """One ``--serve`` rule."""

    port: int
    mode: ServeMode
    target: ServeTarget

    def __str__(self) -> str:
        return f"{self.port}={self.mode}:{self.target}"


def _port(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise ValueError(f"{what} {text!r} is not a port (1-65535)")
    return int(text)


def parse_serve_target(text: str) -> ServeTarget:
    """``HOST:PORT`` (loopback only) or ``unix:/ABS/PATH``; ValueError otherwise."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError(f"target {text!r}: a Unix socket path must be absolute "
                             "(unix:/path/to.sock)")
        if "\0" in path:
            raise ValueError(f"target {text!r}: NUL in the path")
        if len(path.encode()) > MAX_UNIX_PATH:
            raise ValueError(f"target {text!r}: the path is longer than {MAX_UNIX_PATH} "
                             "bytes (the limit of a Unix socket address)")
        return ServeTarget(path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"target {text!r}: want HOST:PORT (a loopback address) or "
                         "unix:/PATH")
    port = _port(port_text, f"target {text!r}: port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"target {text!r}: put an IPv6 address in brackets ([::1]:8080)")
    if host.lower() == "localhost":
        return ServeTarget(host="127.0.0.1", port=port)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"target {text!r}: the host must be a loopback address "
                         "(127.0.0.1, [::1] or localhost), not a name") from None
    if not ip.is_loopback:
        raise ValueError(f"target {text!r}: {ip} is not a loopback address; serve "
                         "forwards only to the pod itself (127.0.0.0/8, ::1, or unix:)")
    return ServeTarget(host=str(ip), port=port)


def parse_serve_rule(text: str) -> ServeRule:
    """``PORT=TARGET`` or ``PORT=MODE:TARGET`` (see the module docstring); ValueError with
    a one-line message otherwise."""
    port_text, sep, rest = text.partition("=")
    if not sep:
        raise ValueError(f"--serve {text!r}: want PORT=TARGET or PORT=MODE:TARGET "
                         "(e.g. 80=http:127.0.0.1:8080)")
    try:
        port = _port(port_text.strip(), "tailnet port")
        mode: ServeMode = "tcp"
        head, colon, tail = rest.partition(":")
        if colon and head in SERVE_MODES:  # "http+proxy" too
            mode, rest = head, tail
        elif colon and head.isalpha() and head.lower() not in ("unix", "localhost"):
            raise ValueError(f"unknown mode {head!r} (modes: {', '.join(SERVE_MODES)})")
        target = parse_serve_target(rest)
    except ValueError as exc:
        raise ValueError(f"--serve {text!r}: {exc}") from None
    return ServeRule(port=port, mode=mode, target=target)
