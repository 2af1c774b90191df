#!/usr/bin/env bash
# Regenerate the wrapper Go modules (go.mod + go.sum) that pin the versions of
# kube-apiserver, etcd and helm built by ../build-tools.sh.
#
# Usage: tests/k8s/tools/update-wrappers.sh K8S_VERSION HELM_VERSION
#   e.g. tests/k8s/tools/update-wrappers.sh 1.37.2 3.22.0
#
# * kube/: requires k8s.io/kubernetes vK8S and replaces every staging module that
#   the upstream go.mod lists at v0.0.0 with its published v0.<minor>.<patch>.
#   The list is derived from that exact version's go.mod (served by the Go module
#   proxy), never maintained by hand. Upstream's `godebug` line is copied.
# * etcd/: requires go.etcd.io/etcd/server/v3 at the version k8s.io/kubernetes
#   itself requires (this is also the envtest pairing: 1.36.x->3.6.8, 1.37.x->3.7.0).
#   A separate module so MVS does not mix etcd's and k8s' dependency graphs.
# * helm/: requires helm.sh/helm/v3 vHELM.
# Needs network access to the Go module proxy and checksum DB. Commit the result.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 K8S_VERSION HELM_VERSION   (e.g. 1.37.2 3.22.0)" >&2
    exit 2
fi
K8S=${1#v}
HELM=${2#v}
[[ $K8S =~ ^1\.([0-9]+)\.([0-9]+)$ ]] || { echo "bad K8S_VERSION '$1' (want 1.MINOR.PATCH)" >&2; exit 2; }
STAGING_VERSION="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
[[ $HELM =~ ^3\.[0-9]+\.[0-9]+$ ]] || { echo "bad HELM_VERSION '$2' (want 3.MINOR.PATCH)" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

# fresh_module DIR MODULE_PATH: start DIR over with an empty go.mod.
fresh_module() {
    mkdir -p "$1"
    rm -f "$1/go.mod" "$1/go.sum"
    (cd "$1" && go mod init "$2" >/dev/null 2>&1 && go mod edit -go=1.24.0)
    # A low `go` floor: `go get` raises it to what the dependencies declare, so
    # the wrappers do not demand the exact local patch release of Go.
}

# --- kube-apiserver -----------------------------------------------------------
upstream_gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
[[ -f $upstream_gomod ]] || { echo "could not download go.mod of k8s.io/kubernetes@v$K8S" >&2; exit 1; }
# Staging modules: require lines `k8s.io/<name> v0.0.0` (not pseudo-versions like v0.0.0-2026...).
mapfile -t staging < <(grep -E '^[[:space:]]+k8s\.io/[A-Za-z0-9._-]+ v0\.0\.0([[:space:]]|$)' "$upstream_gomod" | awk '{print $1}' | sort -u)
(( ${#staging[@]} > 0 )) || { echo "no k8s.io/* v0.0.0 staging requires found in $upstream_gomod" >&2; exit 1; }
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' "$upstream_gomod")
[[ -n $etcd_version ]] || { echo "k8s.io/kubernetes@v$K8S go.mod does not require go.etcd.io/etcd/server/v3" >&2; exit 1; }
go_directive=$(awk '$1 == "go" {print $2; exit}' "$upstream_gomod")
godebug=$(awk '$1 == "godebug" && $2 != "(" {print $2; exit}' "$upstream_gomod")

fresh_module "$HERE/kube" tsnet2.invalid/k8s-tools/kube
cd "$HERE/kube"
go mod edit -go="$go_directive" -require="k8s.io/kubernetes@v$K8S"
replace_args=()
for m in "${staging[@]}"; do replace_args+=("-replace=$m=$m@$STAGING_VERSION"); done
go mod edit "${replace_args[@]}"
if [[ -n $godebug ]]; then go mod edit -godebug="$godebug"; fi
go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S"
go mod tidy
echo "kube: k8s.io/kubernetes v$K8S, ${#staging[@]} staging replaces -> $STAGING_VERSION, godebug ${godebug:-none}"

# --- etcd ---------------------------------------------------------------------
fresh_module "$HERE/etcd" tsnet2.invalid/k8s-tools/etcd
cd "$HERE/etcd"
go get -tool "go.etcd.io/etcd/server/v3@$etcd_version"
go mod tidy
echo "etcd: go.etcd.io/etcd/server/v3 $etcd_version"

# --- helm ---------------------------------------------------------------------
fresh_module "$HERE/helm" tsnet2.invalid/k8s-tools/helm
cd "$HERE/helm"
go get -tool "helm.sh/helm/v3/cmd/helm@v$HELM"
go mod tidy
echo "helm: helm.sh/helm/v3 v$HELM"
