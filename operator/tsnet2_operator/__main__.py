"""`tsnet2-operator`: entry point (filled in by the operator work)."""

import sys


def main() -> int:
    """Run the operator."""
    print("tsnet2-operator: not built yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
