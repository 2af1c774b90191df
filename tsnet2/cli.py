"""`tsnet2`: the command line (control server, demo, and queries against a daemon socket)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from tsnet2._entry import check_extra, extra_for, missing_extra
from tsnet2._version import __version__


def _socket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=os.environ.get("TSNET2_SOCKET"),
                   help="tsnet2d socket (default $TSNET2_SOCKET)")


def _server(args: argparse.Namespace) -> Any:
    import tsnet2

    if not args.socket:
        raise SystemExit("tsnet2: no daemon socket: pass --socket or set TSNET2_SOCKET")
    return tsnet2.Server(socket_path=args.socket)


def _status(args: argparse.Namespace) -> int:
    with _server(args) as srv:
        st = srv.local_client().status()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    self_ = st.get("Self") or {}
    print(f"{', '.join(st.get('TailscaleIPs') or []):<40} {self_.get('DNSName', '')}  "
          f"{st.get('BackendState', '')}")
    for peer in (st.get("Peer") or {}).values():
        state = "online" if peer.get("Online") else "offline"
        print(f"{', '.join(peer.get('TailscaleIPs') or []):<40} {peer.get('DNSName', '')}  "
              f"{state}")
    return 0


def _whois(args: argparse.Namespace) -> int:
    with _server(args) as srv:
        who = srv.local_client().whois(args.addr)
    if args.json:
        print(json.dumps(who, indent=2))
        return 0
    node, user = who.get("Node") or {}, who.get("UserProfile") or {}
    print(f"Machine: {node.get('Name', '')}  ({node.get('StableID', '')})")
    print(f"  Addresses: {', '.join(node.get('Addresses') or [])}")
    if node.get("Tags"):
        print(f"  Tags: {', '.join(node['Tags'])}")
    print(f"User: {user.get('LoginName', '')}  ({user.get('DisplayName', '')})")
    return 0


def _ping(args: argparse.Namespace) -> int:
    failures = 0
    with _server(args) as srv:
        for i in range(args.count):
            t0 = time.perf_counter()
            try:
                conn = srv.dial("tcp", args.target, timeout=args.timeout)
            except Exception as exc:
                failures += 1
                print(f"dial {args.target}: {exc}")
            else:
                conn.close()
                print(f"connected to {args.target} in {(time.perf_counter() - t0) * 1000:.2f} ms")
            if i + 1 < args.count:
                time.sleep(args.interval)
    return 1 if failures else 0


def _demo(args: argparse.Namespace) -> int:
    missing = check_extra("daemon", "tsnet2 demo")  # it runs tsnet2d and the control server
    if missing is not None:
        return missing
    from tsnet2.lab.demo import run_demo

    return run_demo(verbose=args.verbose)


def _add_control(sub: Any) -> None:
    """``tsnet2 control ...``; with the daemon extra missing, a stub that says so."""
    try:
        from tsnet2.control.cli import add_subcommands
    except ModuleNotFoundError as exc:
        if extra_for(exc) is None:
            raise
        error = exc
        c = sub.add_parser("control", help="coordination server (needs tsnet2[daemon])",
                           add_help=False)
        c.add_argument("rest", nargs=argparse.REMAINDER)
        c.set_defaults(func=lambda _args: missing_extra(error, "tsnet2 control"))
    else:
        add_subcommands(sub)


def build_parser() -> argparse.ArgumentParser:
    """The `tsnet2` argument parser."""
    p = argparse.ArgumentParser(prog="tsnet2", description="tsnet2 command line")
    p.add_argument("--version", action="version", version=f"tsnet2 {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_control(sub)

    d = sub.add_parser("demo", help="run a local tailnet in network namespaces (needs root)",
                       description="Start a control server and two tsnet2d daemons in network "
                       "namespaces, echo through the library, print WhoIs, traffic log "
                       "lines and a summary, then remove everything.")
    d.add_argument("-v", "--verbose", action="store_true", help="show the daemons' logs")
    d.set_defaults(func=_demo)

    s = sub.add_parser("status", help="show the node and its peers")
    _socket_arg(s)
    s.add_argument("--json", action="store_true", help="print the LocalAPI status JSON")
    s.set_defaults(func=_status)

    w = sub.add_parser("whois", help="show the node and user behind a tailnet address")
    _socket_arg(w)
    w.add_argument("addr", help="tailnet IP or IP:port")
    w.add_argument("--json", action="store_true", help="print the LocalAPI WhoIs JSON")
    w.set_defaults(func=_whois)

    g = sub.add_parser("ping", help="time TCP connects to a peer through the daemon",
                       description="Dial HOST:PORT through tsnet2d COUNT times and print how "
                       "long each connect took (the flows appear in the traffic log).")
    _socket_arg(g)
    g.add_argument("target", metavar="HOST:PORT", help="peer name, FQDN or tailnet IP, and port")
    g.add_argument("-c", "--count", type=int, default=4)
    g.add_argument("-i", "--interval", type=float, default=0.5)
    g.add_argument("--timeout", type=float, default=5.0)
    g.set_defaults(func=_ping)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tsnet2` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        import tsnet2

        if isinstance(exc, tsnet2.Error):
            print(f"tsnet2: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
