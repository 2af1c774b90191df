"""tsnet2d's flags for apps that do not import tsnet2: the egress proxy and DNS responder.

Kept apart from :mod:`tsnet2.daemon.cli` so that the flags, their checks and their help
live next to each other; the cli adds them to its parser and passes what
:func:`egress_config` returns to :class:`~tsnet2.daemon.server.DaemonConfig`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_egress_flags(p: argparse.ArgumentParser) -> None:
    """Add --egress-listen, --egress-socket, --dns-listen, --dns-upstream."""
    p.add_argument("--egress-listen", metavar="HOST:PORT",
                   help="serve an egress proxy to tailnet peers on this loopback address "
                   "(127.0.0.1:1055 or [::1]:1055; other addresses are refused): SOCKS5 "
                   "(no auth, CONNECT) and HTTP (CONNECT and absolute http:// URIs) on one "
                   "port, for apps that do not use tsnet2; names resolve against the "
                   "tailnet only, and every flow is in the traffic log (see docs/egress.md)")
    p.add_argument("--egress-socket", metavar="PATH",
                   help="the same egress proxy on a Unix socket (mode, group and uid check "
                   "as for --socket)")
    p.add_argument("--dns-listen", metavar="HOST:PORT",
                   help="answer DNS on this loopback address (UDP and TCP; e.g. "
                   "127.0.0.1:53): A/AAAA for tailnet names (NAME, NAME.<tailnet domain>) "
                   "from the netmap, NXDOMAIN for other names under the tailnet domain; "
                   "every other query is forwarded to the upstreams")
    p.add_argument("--dns-upstream", metavar="IP[:PORT]", action="append", default=[],
                   help="nameserver the DNS responder forwards other names to (repeatable; "
                   "default: the nameservers of /etc/resolv.conf at startup, without the "
                   "responder's own address)")


def egress_config(args: argparse.Namespace) -> dict[str, Any]:
    """DaemonConfig keyword arguments from the parsed flags. Raises ValueError with the
    message tsnet2d prints (exit 2)."""
    out: dict[str, Any] = {}
    if not (args.egress_listen or args.egress_socket or args.dns_listen or args.dns_upstream):
        return out  # neither is on: their modules are not loaded
    from tsnet2.daemon.dns import DnsConfig, default_upstreams, parse_upstream
    from tsnet2.daemon.egress import EgressConfig, parse_loopback_listen

    listen = None
    if args.egress_listen:
        listen = parse_loopback_listen("--egress-listen", args.egress_listen)
    path = Path(args.egress_socket) if args.egress_socket else None
    if path is not None and args.socket and path == Path(args.socket):
        raise ValueError("--egress-socket must be another path than --socket")
    if listen is not None or path is not None:
        out["egress"] = EgressConfig(listen=listen, socket_path=path)
    ups = tuple(parse_upstream(u) for u in args.dns_upstream)
    if args.dns_listen:
        dl = parse_loopback_listen("--dns-listen", args.dns_listen)
        out["dns"] = DnsConfig(listen=dl, upstreams=ups or default_upstreams(dl))
    elif ups:
        raise ValueError("--dns-upstream needs --dns-listen")
    return out
