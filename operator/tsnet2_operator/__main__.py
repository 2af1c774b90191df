"""`tsnet2-operator`: the injector webhook, the coordination server and the GC in one kopf process.

Configuration: see :mod:`tsnet2_operator.config` and ``docs/operator.md``. Exit status 2 on a
configuration or usage error (the message names the setting), 1 when the operator cannot
start (no credentials, a start-up handler failed for good), 0 after SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys

import kopf

from tsnet2_operator.app import build_operator_registry
from tsnet2_operator.config import ConfigError, load_config
from tsnet2_operator.webhook import KubeLookupError, load_api_client

PRIORITY_RANGE = 1 << 30
"""Random peering priorities are drawn from ``1..PRIORITY_RANGE``."""


def parser() -> argparse.ArgumentParser:
    """The command-line parser (also used to check ``docs/operator.md``)."""
    p = argparse.ArgumentParser(
        prog="tsnet2-operator",
        description="tsnet2 operator: injects the tsnet2d sidecar into opted-in pods "
        "(mutating admission webhook), serves the coordination (control) API from "
        "tsnet2.io custom resources, creates state claims and removes the nodes of "
        "deleted pods. One kopf process.",
        epilog="Settings come from $TSNET2_OPERATOR_CONFIG (a JSON file) and TSNET2_* "
        "environment variables; see docs/operator.md. Exit status: 0 after SIGTERM, "
        "1 start-up failure, 2 bad setting or flag.",
    )
    p.add_argument(
        "--liveness", metavar="URL",
        help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    p.add_argument(
        "--peering", metavar="NAME",
        help="run several replicas: cluster-wide kopf peering NAME; the watch handlers run "
        "in one replica at a time, the webhook and control server in every replica "
        "(default: standalone, no peering)",
    )
    p.add_argument(
        "--priority", metavar="N", type=int,
        help="peering priority of this replica (highest wins; default: random, so "
        "replicas never tie); needs --peering",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    return p


def own_identity() -> str:
    """This replica's kopf peering identity: ``<host>/<pid>/<random>``.

    kopf's default starts with ``getpass.getuser()``, which raises ``KeyError`` for a uid
    without a passwd entry (an arbitrary ``runAsUser``, as OpenShift assigns): the operator
    must run as any uid. In a pod the host name is the pod name.
    """
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


def main(argv: list[str] | None = None) -> int:
    """Parse flags, load the configuration and run the operator until signalled."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.priority is not None and args.peering is None:
        cli.error("--priority needs --peering")
    if args.peering is not None and not args.peering.strip():
        cli.error("--peering needs a non-empty NAME")
    try:
        config = load_config(require_namespace=True)
    except ConfigError as exc:
        print(f"tsnet2-operator: {exc}", file=sys.stderr)
        return 2
    try:
        api = load_api_client()
    except KubeLookupError as exc:
        print(f"tsnet2-operator: {exc}", file=sys.stderr)
        return 1
    try:
        registry, _ = build_operator_registry(config, api, peering=args.peering)
        kopf.configure(verbose=args.verbose)
        priority = None
        if args.peering is not None:
            priority = args.priority if args.priority is not None else (
                1 + secrets.randbelow(PRIORITY_RANGE))
        kopf.run(
            registry=registry,
            clusterwide=True,
            standalone=args.peering is None,
            peering_name=args.peering,
            priority=priority,
            identity=own_identity(),  # type: ignore[arg-type]  # kopf's NewType of str
            liveness_endpoint=args.liveness,
        )
    except Exception as exc:  # kopf.run raises only when the operator failed (e.g. start-up)
        print(f"tsnet2-operator: stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        api.close()  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main())
