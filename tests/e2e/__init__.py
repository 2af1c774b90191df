"""End-to-end suites that need more than this machine has (opt-in, see docs/kind-e2e.md)."""
