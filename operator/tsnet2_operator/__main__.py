"""`tsnet2-operator`: run the injector webhook (kopf) with settings from the environment.

Configuration: see :mod:`tsnet2_operator.config` and ``docs/operator.md``. Exit status 2 on a
configuration error (the message names the setting).
"""

from __future__ import annotations

import argparse
import sys

import kopf

from tsnet2_operator.config import ConfigError, load_config
from tsnet2_operator.handlers import build_registry


def main(argv: list[str] | None = None) -> int:
    """Parse flags, load the configuration and run the operator until signalled."""
    parser = argparse.ArgumentParser(
        prog="tsnet2-operator",
        description="tsnet2 operator: injects the tsnet2d sidecar into opted-in pods "
                    "(mutating admission webhook served by kopf).",
        epilog="Settings come from $TSNET2_OPERATOR_CONFIG (a JSON file) and TSNET2_* "
               "environment variables; see docs/operator.md.",
    )
    parser.add_argument("--liveness", metavar="URL",
                        help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    args = parser.parse_args(argv)
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"tsnet2-operator: {exc}", file=sys.stderr)
        return 2
    kopf.configure(verbose=args.verbose)
    kopf.run(
        registry=build_registry(config),
        clusterwide=True,
        standalone=True,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
