"""End-to-end suite on a real Kubernetes cluster, local or kind (docs/e2e.md)."""
