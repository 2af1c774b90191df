"""The kind driver of the end-to-end suite (docs/e2e.md).

Opt-in (``TSNET2_E2E_KIND=1``, set by ``scripts/e2e-kind``); without it the suite runs on the
local cluster (tests/e2e/cluster).
"""
