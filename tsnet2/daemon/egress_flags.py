"""tsnet2d's flags for apps that do not import tsnet2: the egress proxy and DNS responder.

Kept apart from :mod:`tsnet2.daemon.cli` so that the flags, their checks and their help
live next to each other; the cli adds them to its parser and passes what
:func:`egress_config` returns to :class:`~tsnet2.daemon.server.DaemonConfig`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tsnet2.daemon.egress import EgressConfig, parse_loopback_listen


def add_egress_flags(p: argparse.ArgumentParser) -> None:
    """Add --egress-listen, --egress-socket."""
    p.add_argument("--egress-listen", metavar="HOST:PORT",
                   help="serve an egress proxy to tailnet peers on this loopback address "
                   "(127.0.0.1:1055 or [::1]:1055; other addresses are refused): SOCKS5 "
                   "(no auth, CONNECT) and HTTP (CONNECT and absolute http:// URIs) on one "
                   "port, for apps that do not use tsnet2; names resolve against the "
                   "tailnet only, and every flow is in the traffic log (see docs/egress.md)")
    p.add_argument("--egress-socket", metavar="PATH",
                   help="the same egress proxy on a Unix socket (mode, group and uid check "
                   "as for --socket)")


def egress_config(args: argparse.Namespace) -> dict[str, Any]:
    """DaemonConfig keyword arguments from the parsed flags. Raises ValueError with the
    message tsnet2d prints (exit 2)."""
    out: dict[str, Any] = {}
    listen = None
    if args.egress_listen:
        listen = parse_loopback_listen("--egress-listen", args.egress_listen)
    path = Path(args.egress_socket) if args.egress_socket else None
    if path is not None and args.socket and path == Path(args.socket):
        raise ValueError("--egress-socket must be another path than --socket")
    if listen is not None or path is not None:
        out["egress"] = EgressConfig(listen=listen, socket_path=path)
    return out
