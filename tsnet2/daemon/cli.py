"""`tsnet2d`: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

from tsnet2.daemon.backend import DeviceConfig
from tsnet2.daemon.datapath import UDP_IDLE_TIMEOUT
from tsnet2.daemon.egress_flags import add_egress_flags, egress_config
from tsnet2.daemon.io import TCP_KEEPALIVE_IDLE
from tsnet2.daemon.server import (
    NODE_DOWN_GRACE,
    WATCHDOG_TIMEOUT,
    Daemon,
    DaemonConfig,
    DaemonFatalError,
    no_dumps,
)
from tsnet2.proto.serve import ServeRule, parse_serve_rule

USAGE_EXIT = 2
MAX_GID = 2**32 - 2  # (gid_t)-1 means "unchanged" to chown


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
    p.add_argument("--traffic-log", metavar="PATH", action="append",
                   help="JSONL traffic log: a file, or '-' for stdout; give it twice (once "
                   "each) to write both (default <state-dir>/traffic.jsonl)")
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
                   help="when the traffic log cannot be written, or stdout's reader falls "
                   "behind: refuse new flows and pause established ones (default), or count "
                   "the lost records, report them in a gap record and carry on")
    p.add_argument("--traffic-log-buffer", metavar="BYTES", type=int, default=4 << 20,
                   help="records stdout may hold in memory while its reader is slow (default "
                   "4194304, at least 1048576); fail-closed pauses flows from half of it")
    p.add_argument("--traffic-log-checkpoint", metavar="SECONDS", type=float, default=10.0,
                   help="write a signed checkpoint of the log's hash chain this often when "
                   "records were written (default 10; records after the last one are an "
                   "unsigned tail)")
    p.add_argument("--tun", metavar="NAME", default="tsnet2",
                   help="WireGuard device name (default tsnet2)")
    p.add_argument("--port", metavar="N", type=int, default=41641,
                   help="WireGuard UDP port (default 41641)")
    p.add_argument("--advertise-endpoint", metavar="HOST:PORT",
                   help="endpoint peers should use (default: detected from routes)")
    p.add_argument("--backend", choices=["auto", "kernel", "userspace"], default="auto",
                   help="WireGuard implementation (default auto: kernel if available)")
    p.add_argument("--wireguard-go", metavar="PATH",
                   help="the userspace backend's wireguard-go binary (default "
                   "$TSNET2_WIREGUARD_GO, else wireguard-go on PATH)")
    p.add_argument("--no-guard", action="store_true",
                   help="do not install the nftables guard that keeps every other process in "
                   "this network namespace off the tailnet (the traffic log is then not "
                   "the only way out)")
    p.add_argument("--allow-uid", metavar="UID", type=int, action="append", default=[],
                   help="also accept socket connections from this uid (repeatable); "
                   "by default only the daemon's own uid may connect")
    p.add_argument("--allow-any-uid", action="store_true",
                   help="accept socket connections from any uid (the socket is then created "
                   "0666 instead of 0660 unless --socket-mode says otherwise)")
    p.add_argument("--socket-mode", metavar="MODE",
                   help="octal permissions of the socket, e.g. 0660 (default 0660, or 0666 "
                   "with --allow-any-uid); the uid check above applies on top")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group (GID or name) of the socket, and of its directory if tsnet2d "
                   "creates it (default: the daemon's group, or the directory's if it is "
                   "set-group-ID)")
    p.add_argument("--hostname", default=os.environ.get("TSNET2_HOSTNAME", ""),
                   help="hostname when the app gives none (default: the machine's)")
    p.add_argument("--up", action="store_true",
                   help="keep the node up from flags and environment, without waiting for an "
                   "app's start call: failed starts are retried (backoff 1 s doubling to "
                   "60 s, for as long as it takes) and a node whose device dies is started "
                   "again. Without --up the node runs while an app holds it (called start, "
                   "not yet close)")
    p.add_argument("--ephemeral", action="store_true",
                   help="with --up: register as an ephemeral node")
    p.add_argument("--advertise-tags", default="", metavar="TAGS",
                   help="with --up: comma-separated tags to request")
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve /metrics, /healthz (liveness: fails when the daemon cannot "
                   "serve, or a node that should run has been down --node-down-grace "
                   "seconds) and /readyz (the node is up and serving) on this address "
                   "(off by default)")
    p.add_argument("--node-down-grace", metavar="SECONDS", type=float,
                   default=NODE_DOWN_GRACE,
                   help=f"how long a node that should run may be down before /healthz fails "
                   f"(default {NODE_DOWN_GRACE:g})")
    p.add_argument("--watchdog", metavar="SECONDS", type=float, default=WATCHDOG_TIMEOUT,
                   help=f"exit (status 70, with every thread's stack on stderr) when the "
                   f"event loop is stuck this long; 0 turns it off (default "
                   f"{WATCHDOG_TIMEOUT:g})")
    p.add_argument("--tcp-keepalive", metavar="SECONDS", type=float,
                   default=TCP_KEEPALIVE_IDLE,
                   help="TCP keepalive of tailnet connections: probes start after this many "
                   "idle seconds, three of them a third of that apart (at least 1 s), so a "
                   "flow whose peer vanished (no FIN or RST) ends, with its close record, "
                   "about twice that later; 0 turns it off (default "
                   f"{TCP_KEEPALIVE_IDLE:g}: at most 60 s)")
    p.add_argument("--udp-idle-timeout", metavar="SECONDS", type=float,
                   default=UDP_IDLE_TIMEOUT,
                   help="a UDP flow (a dial, or one peer of a UDP listener) that no datagram "
                   "crossed for this many seconds is closed, with its close record; a "
                   "closed dial's channel ends (docs/udp.md; 0.1 to 86400, default "
                   f"{UDP_IDLE_TIMEOUT:g})")
    p.add_argument("--relay", choices=["auto", "copy"], default="auto",
                   help="how flows are relayed: auto moves the bytes with splice(2) through "
                   "pipes, never into the daemon's memory, when the traffic log records no "
                   "payload (modes metadata and off), and copies them otherwise; copy always "
                   "copies (default auto)")
    p.add_argument("--event-loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="event loop: uvloop (libuv; less CPU per flow and per byte), "
                   "asyncio (the standard library's), or auto: uvloop when it is installed "
                   "(the daemon extra installs it), else asyncio (default auto)")
    add_egress_flags(p)
    p.add_argument("--serve", metavar="RULE", action="append", default=[],
                   help="forward a tailnet port to a target in this pod (repeatable). RULE is "
                   "PORT=TARGET or PORT=MODE:TARGET; MODE is tcp (default: the bytes as they "
                   "are), http (adds the caller's identity as request headers "
                   "Tailscale-User-Login, Tailscale-User-Name, Tsnet2-Node-Name, "
                   "Tsnet2-Node-Id, X-Forwarded-For, Forwarded; removes any the caller sent), "
                   "proxy (a PROXY protocol v2 header with the caller's address and "
                   "identity first) or http+proxy (both); TARGET is HOST:PORT with a "
                   "loopback HOST (127.0.0.1, [::1], localhost) or unix:/ABSOLUTE/PATH. "
                   "E.g. 80=http:127.0.0.1:8080, "
                   "2222=proxy:unix:/tsnet2/ssh.sock. See docs/serve.md")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    return p


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop factory for `--event-loop`: uvloop's or asyncio's.

    Raises ValueError with the message tsnet2d prints when uvloop is asked for but is not
    installed.
    """
    if choice in ("auto", "uvloop"):
        try:
            import uvloop  # lazy: optional, and only the daemon's entry point needs it
        except ImportError:
            if choice == "uvloop":
                raise ValueError("--event-loop uvloop: uvloop is not installed; install "
                                 "tsnet2[daemon] (or `pip install uvloop`), or use "
                                 "--event-loop asyncio") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def parse_socket_mode(text: str) -> int:
    """`--socket-mode`: an octal mode such as 0660 or 660 (0o660 also works).

    Raises ValueError with the message tsnet2d prints: not octal, bits beyond 0777 (setuid,
    setgid, sticky mean nothing on a socket), or no read/write for the daemon's own uid.
    """
    digits = text.removeprefix("0o")
    if not 1 <= len(digits) <= 4 or any(ch not in "01234567" for ch in digits):
        raise ValueError(f"--socket-mode {text}: not an octal mode (e.g. 0660)")
    mode = int(digits, 8)
    if mode > 0o777:
        raise ValueError(f"--socket-mode {text}: only permission bits (at most 0777) apply "
                         "to a socket")
    if mode & 0o600 != 0o600:
        raise ValueError(f"--socket-mode {text}: the owner (the daemon's uid) needs rw, "
                         "e.g. 0660")
    return mode


def parse_socket_group(text: str) -> int:
    """`--socket-group`: a numeric GID or a group name known to this system (/etc/group).

    Raises ValueError with the message tsnet2d prints.
    """
    if text.isascii() and text.isdigit():
        gid = int(text)
        if gid > MAX_GID:
            raise ValueError(f"--socket-group {text}: GID out of range (0..{MAX_GID})")
        return gid
    if not text:
        raise ValueError("--socket-group: empty; give a GID or a group name")
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"--socket-group {text}: no such group (give a GID or a group "
                         "name from /etc/group)") from None


def parse_serve_rules(texts: list[str]) -> tuple[ServeRule, ...]:
    """`--serve` rules (:func:`tsnet2.proto.serve.parse_serve_rule`); ValueError with the
    message tsnet2d prints for a bad rule or a port given twice."""
    rules: dict[int, ServeRule] = {}
    for text in texts:
        rule = parse_serve_rule(text)
        if rule.port in rules:
            raise ValueError(f"--serve {text!r}: port {rule.port} is already served "
                             f"({rules[rule.port]})")
        rules[rule.port] = rule
    return tuple(rules.values())


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
    # Third-party libraries (pyroute2) only ever say warnings.
    logging.basicConfig(
        level=logging.WARNING,
        format="tsnet2d: %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("tsnet2d").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    # The node's certificate lifecycle is rare and worth seeing by default (one line per
    # issue or renewal, docs/certs.md): a sidecar runs without -v.
    logging.getLogger("tsnet2d.certs").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    metrics_addr = None
    if args.metrics_addr:
        host, sep, port = args.metrics_addr.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            print(f"tsnet2d: --metrics-addr {args.metrics_addr!r}: want HOST:PORT",
                  file=sys.stderr)
            return USAGE_EXIT
        metrics_addr = (host.strip("[]") or "0.0.0.0", int(port))
    try:
        socket_mode = None if args.socket_mode is None else parse_socket_mode(args.socket_mode)
        socket_group = (None if args.socket_group is None
                        else parse_socket_group(args.socket_group))
    except ValueError as exc:
        print(f"tsnet2d: {exc}", file=sys.stderr)
        return USAGE_EXIT
    try:
        serve = parse_serve_rules(args.serve)
    except ValueError as exc:
        print(f"tsnet2d: {exc}", file=sys.stderr)
        return USAGE_EXIT
    if args.watchdog < 0 or args.node_down_grace < 0:
        print("tsnet2d: --watchdog and --node-down-grace take seconds >= 0", file=sys.stderr)
        return USAGE_EXIT
    logs = args.traffic_log or []
    if logs.count("-") > 1 or len(logs) - logs.count("-") > 1:
        print("tsnet2d: --traffic-log takes at most one file and one '-' (stdout)",
              file=sys.stderr)
        return USAGE_EXIT
    if args.traffic_log_buffer < 1 << 20:
        print("tsnet2d: --traffic-log-buffer takes at least 1048576 bytes (1 MiB)",
              file=sys.stderr)
        return USAGE_EXIT
    if not 0.5 <= args.traffic_log_checkpoint <= 3600:
        print("tsnet2d: --traffic-log-checkpoint takes 0.5 to 3600 seconds", file=sys.stderr)
        return USAGE_EXIT
    if not (args.tcp_keepalive == 0 or 1 <= args.tcp_keepalive <= 7200):
        print("tsnet2d: --tcp-keepalive takes 0 (off) or 1 to 7200 seconds", file=sys.stderr)
        return USAGE_EXIT
    if not 0.1 <= args.udp_idle_timeout <= 86400:
        print("tsnet2d: --udp-idle-timeout takes 0.1 to 86400 seconds", file=sys.stderr)
        return USAGE_EXIT
    try:
        sidecar = egress_config(args)
    except ValueError as exc:
        print(f"tsnet2d: {exc}", file=sys.stderr)
        return USAGE_EXIT
    no_dumps()
    soft, hard = raise_fd_limit()
    logging.getLogger("tsnet2d").info("open files limit: soft %d, hard %d", soft, hard)
    state_dir = Path(args.state_dir)
    allow: frozenset[int] | None = None
    if not args.allow_any_uid:
        allow = frozenset({os.geteuid(), *args.allow_uid})
    config = DaemonConfig(
        socket_path=Path(args.socket),
        state_dir=state_dir,
        traffic_log=tuple(logs) or (str(state_dir / "traffic.jsonl"),),
        traffic_log_mode=args.traffic_log_mode,
        traffic_log_max_bytes=args.traffic_log_max_bytes,
        traffic_log_keep=args.traffic_log_keep,
        traffic_log_payload_cap=args.traffic_log_payload_cap,
        traffic_log_on_error=args.traffic_log_on_error,
        traffic_log_buffer=args.traffic_log_buffer,
        traffic_log_checkpoint=args.traffic_log_checkpoint,
        device=DeviceConfig(ifname=args.tun, listen_port=args.port, backend=args.backend,
                            advertise_endpoint=args.advertise_endpoint,
                            guard=not args.no_guard, wireguard_go=args.wireguard_go),
        allow_uids=allow,
        socket_mode=socket_mode,
        socket_group=socket_group,
        hostname=args.hostname,
        control_url=os.environ.get("TS_CONTROL_URL", ""),
        auth_key=os.environ.get("TS_AUTHKEY") or os.environ.get("TS_AUTH_KEY", ""),
        token_file=os.environ.get("TSNET2_SA_TOKEN_FILE", ""),
        ephemeral=args.ephemeral,
        advertise_tags=tuple(t for t in args.advertise_tags.split(",") if t),
        auto_start=args.up,
        metrics_addr=metrics_addr,
        watchdog_timeout=args.watchdog,
        node_down_grace=args.node_down_grace,
        tcp_keepalive=args.tcp_keepalive,
        udp_idle_timeout=args.udp_idle_timeout,
        relay=args.relay,
        **sidecar,
        serve=serve,
    )

    def ready() -> None:
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        print(f"tsnet2d: pid={os.getpid()} listening on {args.socket} ({loop} event loop)",
              file=sys.stderr, flush=True)

    async def run() -> None:
        await Daemon(config).run(ready)

    try:
        factory = loop_factory(args.event_loop)
    except ValueError as exc:
        print(f"tsnet2d: {exc}", file=sys.stderr)
        return USAGE_EXIT
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run())
    except DaemonFatalError as exc:
        print(f"tsnet2d: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
