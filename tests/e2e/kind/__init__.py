"""The kind end-to-end suite: a real cluster, the image, the chart and two sample apps.

Opt-in (``TSNET2_E2E_KIND=1``, set by ``scripts/e2e-kind``); see docs/kind-e2e.md.
"""
