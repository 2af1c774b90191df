"""tsnet2_operator: the Kubernetes operator for tsnet2 (sidecar injection, state volumes,
coordination with a Kubernetes store). It lives in the folder `operator/` but is never a
package named `operator`, which would shadow the standard library."""
