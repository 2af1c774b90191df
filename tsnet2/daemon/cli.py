"""`tsnet2d`: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import sys
from pathlib import Path

from tsnet2.daemon.backend import DeviceConfig
from tsnet2.daemon.server import Daemon, DaemonConfig, DaemonError

USAGE_EXIT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(USAGE_EXIT, f"tsnet2d: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The tsnet2d argument parser (also used to render --help in the docs)."""
    p = _Parser(
        prog="tsnet2d",
        description="tsnet2 daemon: owns one tailnet node (keys, coordination, WireGuard "
        "device) and serves apps over one Unix socket, logging every byte they exchange.",
        epilog="Environment: TS_CONTROL_URL (control server URL when the app gives none), "
        "TS_AUTHKEY or TS_AUTH_KEY (auth key when the app gives none), TSNET2_HOSTNAME, "
        "TSNET2_SA_TOKEN_FILE (a Kubernetes ServiceAccount token, audience tsnet2, sent as "
        "the registration credential when there is no auth key).",
    )
    p.add_argument("--socket", metavar="PATH", help="Unix socket to serve apps on (required)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="node state: private key, node credential (required; created 0700)")
    p.add_argument("--traffic-log", metavar="PATH",
                   help="JSONL traffic log, '-' for stdout (default <state-dir>/traffic.jsonl)")
    p.add_argument("--traffic-log-mode", choices=["payload", "metadata", "off"],
                   default="payload", help="what data records carry (default payload)")
    p.add_argument("--traffic-log-max-bytes", metavar="N", type=int,
                   help="rotate the traffic log when it would grow past N bytes")
    p.add_argument("--traffic-log-keep", metavar="N", type=int, default=5,
                   help="rotated traffic logs to keep (default 5)")
    p.add_argument("--traffic-log-payload-cap", metavar="N", type=int,
                   help="log at most N payload bytes per flow and direction; later data "
                   "records keep their length but no payload")
    p.add_argument("--traffic-log-on-error", choices=["fail-closed", "continue"],
                   default="fail-closed",
                   help="when the traffic log cannot be written: refuse new flows "
                   "(default) or count the lost records and carry on")
    p.add_argument("--tun", metavar="NAME", default="tsnet2",
                   help="WireGuard device name (default tsnet2)")
    p.add_argument("--port", metavar="N", type=int, default=41641,
                   help="WireGuard UDP port (default 41641)")
    p.add_argument("--advertise-endpoint", metavar="HOST:PORT",
                   help="endpoint peers should use (default: detected from routes)")
    p.add_argument("--backend", choices=["auto", "kernel", "userspace"], default="auto",
                   help="WireGuard implementation (default auto: kernel if available)")
    p.add_argument("--no-guard", action="store_true",
                   help="do not install the nftables guard that keeps every other process in "
                   "this network namespace off the tailnet (the traffic log is then not "
                   "the only way out)")
    p.add_argument("--allow-uid", metavar="UID", type=int, action="append", default=[],
                   help="also accept socket connections from this uid (repeatable); "
                   "by default only the daemon's own uid may connect")
    p.add_argument("--allow-any-uid", action="store_true",
                   help="accept socket connections from any uid (the socket is then created "
                   "0666 instead of 0660)")
    p.add_argument("--hostname", default=os.environ.get("TSNET2_HOSTNAME", ""),
                   help="hostname when the app gives none (default: the machine's)")
    p.add_argument("--up", action="store_true",
                   help="start the node at once from flags and environment, without "
                   "waiting for an app's start call")
    p.add_argument("--ephemeral", action="store_true",
                   help="with --up: register as an ephemeral node")
    p.add_argument("--advertise-tags", default="", metavar="TAGS",
                   help="with --up: comma-separated tags to request")
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve /metrics, /healthz and /readyz on this address (off by default)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    return p


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one (each flow holds two descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main(argv: list[str] | None = None) -> int:
    """Run tsnet2d; returns the exit code (2 usage, 1 error, 0 clean stop)."""
    args = build_parser().parse_args(argv)
    for flag in ("socket", "state_dir"):
        if not getattr(args, flag):
            print(f"tsnet2d: --{flag.replace('_', '-')} is required", file=sys.stderr)
            return USAGE_EXIT
    # Our own records: warnings (bad input, refused connections) always, details with -v.
    # Third-party libraries (pyroute2, aiohttp) only ever say warnings.
    logging.basicConfig(
        level=logging.WARNING,
        format="tsnet2d: %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("tsnet2d").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    # aiohttp logs a malformed request to the health port with a traceback at ERROR.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    metrics_addr = None
    if args.metrics_addr:
        host, sep, port = args.metrics_addr.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            print(f"tsnet2d: --metrics-addr {args.metrics_addr!r}: want HOST:PORT",
                  file=sys.stderr)
            return USAGE_EXIT
        metrics_addr = (host.strip("[]") or "0.0.0.0", int(port))
    soft, hard = raise_fd_limit()
    logging.getLogger("tsnet2d").info("open files limit: soft %d, hard %d", soft, hard)
    state_dir = Path(args.state_dir)
    allow: frozenset[int] | None = None
    if not args.allow_any_uid:
        allow = frozenset({os.geteuid(), *args.allow_uid})
    config = DaemonConfig(
        socket_path=Path(args.socket),
        state_dir=state_dir,
        traffic_log=args.traffic_log or str(state_dir / "traffic.jsonl"),
        traffic_log_mode=args.traffic_log_mode,
        traffic_log_max_bytes=args.traffic_log_max_bytes,
        traffic_log_keep=args.traffic_log_keep,
        traffic_log_payload_cap=args.traffic_log_payload_cap,
        traffic_log_on_error=args.traffic_log_on_error,
        device=DeviceConfig(ifname=args.tun, listen_port=args.port, backend=args.backend,
                            advertise_endpoint=args.advertise_endpoint,
                            guard=not args.no_guard),
        allow_uids=allow,
        hostname=args.hostname,
        control_url=os.environ.get("TS_CONTROL_URL", ""),
        auth_key=os.environ.get("TS_AUTHKEY") or os.environ.get("TS_AUTH_KEY", ""),
        token_file=os.environ.get("TSNET2_SA_TOKEN_FILE", ""),
        ephemeral=args.ephemeral,
        advertise_tags=tuple(t for t in args.advertise_tags.split(",") if t),
        auto_start=args.up,
        metrics_addr=metrics_addr,
    )

    def ready() -> None:
        print(f"tsnet2d: pid={os.getpid()} listening on {args.socket}", file=sys.stderr,
              flush=True)

    async def run() -> None:
        await Daemon(config).run(ready)

    try:
        asyncio.run(run())
    except DaemonError as exc:
        print(f"tsnet2d: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
