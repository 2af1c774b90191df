"""``tsnet2 control serve`` and ``tsnet2 control authkey create``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import resource
import signal
import sys
from typing import Any

from tsnet2.control import ca, limits
from tsnet2.control.authkeys import DEFAULT_DOMAIN, create_auth_key, default_user
from tsnet2.control.names import parse_tags, validate_domain
from tsnet2.control.server import ControlServer
from tsnet2.control.sqlite_store import SQLiteStore
from tsnet2.control.store import StoreError


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT`` (port 0 = any free port)."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        with contextlib.suppress(ValueError):
            ipaddress.IPv6Address(host)
            sep = sep or ":"
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:8080), got {value!r}")
    return host, int(port)


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return number


def _cert_lifetime(value: str) -> float:
    number = _positive(value)
    if number < ca.MIN_CERT_LIFETIME:
        raise argparse.ArgumentTypeError(
            f"expected at least {ca.MIN_CERT_LIFETIME:g} seconds, got {value!r}")
    return number


def _count(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return int(value)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one, as tsnet2d does; return both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _domain(value: str) -> str:
    try:
        return validate_domain(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tags(value: str) -> tuple[str, ...]:
    try:
        return parse_tags(t.strip() for t in value.split(",") if t.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


async def _serve(args: argparse.Namespace) -> int:
    host, port = args.listen
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with SQLiteStore(args.db) as store:
            server = ControlServer(
                store,
                args.domain,
                args.ephemeral_timeout,
                limits=limits.ServerLimits(
                    max_connections=args.max_connections,
                    header_timeout=args.header_timeout,
                    idle_timeout=args.idle_timeout,
                    body_timeout=args.body_timeout,
                ),
                cert_lifetime=args.cert_lifetime,
            )
            try:
                url = await server.start(host, port, tls_cert=args.tls_cert, tls_key=args.tls_key)
                print(f"tsnet2 control: listening on {url}", file=sys.stderr, flush=True)
                await stop.wait()
            finally:
                await server.close()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the control server until SIGINT/SIGTERM; exit code."""
    if (args.tls_cert is None) != (args.tls_key is None):
        print("tsnet2 control: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    soft, hard = raise_fd_limit()
    logging.getLogger("tsnet2.control").info(
        "control: open files limit: soft %d, hard %d", soft, hard
    )
    try:
        return asyncio.run(_serve(args))
    except (OSError, StoreError, ValueError) as e:
        print(f"tsnet2 control: {e}", file=sys.stderr)
        return 1


async def _create_key(args: argparse.Namespace) -> str:
    async with SQLiteStore(args.db) as store:
        key, _ = await create_auth_key(
            store,
            reusable=args.reusable,
            ephemeral=args.ephemeral,
            tags=args.tags,
            expiry=args.expiry,
            user=args.user,
            domain=args.domain,
        )
    return key


def cmd_authkey_create(args: argparse.Namespace) -> int:
    """Create an auth key and print only it on stdout; exit code."""
    try:
        key = asyncio.run(_create_key(args))
    except (OSError, StoreError, ValueError) as e:
        print(f"tsnet2 control authkey create: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"key": key, "reusable": args.reusable, "ephemeral": args.ephemeral,
                          "tags": list(args.tags), "expiry_seconds": args.expiry,
                          "user": args.user or default_user(args.domain)}), flush=True)
    else:
        print(key, flush=True)
    return 0


def add_control_commands(parser: argparse.ArgumentParser) -> None:
    """Add ``serve`` and ``authkey create`` under ``parser``."""
    sub = parser.add_subparsers(dest="control_command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the coordination server")
    serve.add_argument("--listen", type=parse_listen, required=True, metavar="HOST:PORT")
    serve.add_argument("--db", required=True, metavar="PATH", help="SQLite database file")
    serve.add_argument("--domain", type=_domain, default=DEFAULT_DOMAIN)
    serve.add_argument("--tls-cert", metavar="FILE")
    serve.add_argument("--tls-key", metavar="FILE")
    serve.add_argument(
        "--ephemeral-timeout",
        type=_positive,
        default=30.0,
        metavar="S",
        help="remove ephemeral nodes offline for this long (default 30)",
    )
    serve.add_argument(
        "--max-connections",
        type=_count,
        default=limits.DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"at most N open connections (default {limits.DEFAULT_MAX_CONNECTIONS}); at "
        "the cap the longest-idle one is closed for a new one, and if all are busy the new "
        "one gets 503. Lowered (with a warning) if the open-files limit is too small",
    )
    serve.add_argument(
        "--header-timeout",
        type=_positive,
        default=limits.DEFAULT_HEADER_TIMEOUT,
        metavar="S",
        help="a client must send a whole request head (TLS handshake included) within S "
        f"seconds of connecting or of starting it (default {limits.DEFAULT_HEADER_TIMEOUT:g})",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_positive,
        default=limits.DEFAULT_IDLE_TIMEOUT,
        metavar="S",
        help="close a keep-alive connection idle for S seconds between requests "
        f"(default {limits.DEFAULT_IDLE_TIMEOUT:g})",
    )
    serve.add_argument(
        "--body-timeout",
        type=_positive,
        default=limits.DEFAULT_BODY_TIMEOUT,
        metavar="S",
        help="a request body (at most 64 KiB) must arrive within S seconds of its head, "
        f"else 408 (default {limits.DEFAULT_BODY_TIMEOUT:g})",
    )
    serve.add_argument(
        "--cert-lifetime",
        type=_cert_lifetime,
        default=ca.DEFAULT_CERT_LIFETIME,
        metavar="S",
        help="seconds a node certificate (POST /v1/cert, from the tailnet CA) is valid; "
        f"nodes renew when a third is left (default {ca.DEFAULT_CERT_LIFETIME:.0f} = 90 days)",
    )
    serve.set_defaults(func=cmd_serve)

    authkey = sub.add_parser("authkey", help="manage auth keys")
    authkey_sub = authkey.add_subparsers(dest="authkey_command", metavar="COMMAND", required=True)
    create = authkey_sub.add_parser("create", help="create an auth key; prints it on stdout")
    create.add_argument("--db", required=True, metavar="PATH", help="SQLite database file")
    create.add_argument("--reusable", action="store_true", help="usable for many nodes")
    create.add_argument("--ephemeral", action="store_true", help="nodes are ephemeral")
    create.add_argument("--tags", type=_tags, default=(), metavar="tag:a,tag:b")
    create.add_argument("--expiry", type=_positive, metavar="SECONDS", help="lifetime")
    create.add_argument("--user", metavar="LOGIN", help="owner (default admin@DOMAIN)")
    create.add_argument("--domain", type=_domain, default=DEFAULT_DOMAIN)
    create.add_argument("--json", action="store_true",
                        help="print a JSON object (key and its settings) instead of the bare key")
    create.set_defaults(func=cmd_authkey_create)


def add_subcommands(subparsers: Any) -> None:
    """Register ``control`` on the ``tsnet2`` command's subparsers object."""
    control = subparsers.add_parser("control", help="coordination server and auth keys")
    add_control_commands(control)


def main(argv: list[str] | None = None) -> int:
    """``python -m tsnet2.control serve|authkey create ...``."""
    parser = argparse.ArgumentParser(prog="tsnet2 control")
    add_control_commands(parser)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code
