#!/usr/bin/env bash
# Everything the local cluster needs before up.sh can run it:
# * Debian packages containerd, runc, containernetworking-plugins, iptables, nftables,
#   conntrack, curl, openssl (installed when missing; needs root);
# * kubelet, kube-controller-manager, kube-scheduler, kube-proxy, kubectl (and coredns) built
#   from the published Go module k8s.io/kubernetes (wrapper module ./tools/kube: the
#   project's tests/k8s/tools/kube plus `tool` lines for these binaries), cached by version
#   in $TSNET2_TOOLS_CACHE/cluster-k8s-<version> (default /var/cache/tsnet2-tools);
# * kube-apiserver, etcd and helm from the project's tests/k8s/build-tools.sh cache.
# Idempotent: a binary is rebuilt only if missing or its --version does not match.
# A cold build takes about 10-15 minutes on 2 cores (kubelet alone ~6.5 min, 1.9 GB RSS).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/lib.sh"
MOD=$HERE/tools/kube
K8S_MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
BIN_DIR=$BIN
PROJECT=$(cd "$HERE/../../.." && pwd)
need=()
for spec in containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
            iptables:iptables nft:nftables conntrack:conntrack curl:curl openssl:openssl; do
    c=${spec%%:*}
    if [[ $c == /* ]]; then [[ -x $c ]] || need+=("${spec#*:}")
    else command -v "$c" >/dev/null || need+=("${spec#*:}"); fi
done
if ((${#need[@]})); then
    echo "build: apt-get install ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "build: 'go' not found in PATH (need Go >= 1.26)" >&2; exit 1; }
mkdir -p "$BIN_DIR"
exec 9>"$BIN_DIR/.lock"; flock 9
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"

ldflags="-s -w"
K8S_TIME=2026-10-27T12:01:04Z
INFO=$(cd "$MOD" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/^[[:space:]]*"Info": "\(.*\)",\{0,1\}$/\1/p')
t=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$INFO" 2>/dev/null || true); K8S_TIME=${t:-$K8S_TIME}
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$K8S_MINOR"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$K8S_TIME"
done
for name in kubelet kube-controller-manager kube-scheduler kube-proxy kubectl; do
    if [[ $name == kubectl ]]; then vargs=(version --client); want="Client Version: v$K8S_VERSION"
    else vargs=(--version); want="Kubernetes v$K8S_VERSION"; fi
    if [[ -x $BIN_DIR/$name ]] && "$BIN_DIR/$name" "${vargs[@]}" 2>/dev/null | grep -qxF "$want"; then continue; fi
    start=$SECONDS
    echo "build: $name ..." >&2
    tmp=$BIN_DIR/.$name.tmp.$$
    (cd "$MOD" && nice -n 10 go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ldflags" -o "$tmp" "k8s.io/kubernetes/cmd/$name") || { rm -f "$tmp"; exit 1; }
    mv -f "$tmp" "$BIN_DIR/$name"
    echo "build: $name done in $((SECONDS - start)) s" >&2
done
# CoreDNS (cluster DNS; the chart's TS_CONTROL_URL is a *.svc name): a minimal main with only
# the bind/errors/log/cache/kubernetes plugins, its own wrapper module ./tools/coredns.
if [[ ! -x $BIN_DIR/coredns ]] || ! "$BIN_DIR/coredns" -version 2>/dev/null | grep -q '^CoreDNS-'; then
    start=$SECONDS; echo "build: coredns ..." >&2
    tmp=$BIN_DIR/.coredns.tmp.$$
    (cd "$HERE/tools/coredns" && nice -n 10 go build -trimpath -ldflags "-s -w" -o "$tmp" .) || { rm -f "$tmp"; exit 1; }
    mv -f "$tmp" "$BIN_DIR/coredns"; echo "build: coredns done in $((SECONDS - start)) s" >&2
fi

# kube-apiserver, etcd, helm: the project's own build (shared cache, its own lock).
TOOLS_DIR=$("$PROJECT/tests/k8s/build-tools.sh" --print-dir)
if [[ ! -x $TOOLS_DIR/kube-apiserver || ! -x $TOOLS_DIR/etcd || ! -x $TOOLS_DIR/helm ]]; then
    "$PROJECT/tests/k8s/build-tools.sh"
fi
for b in kube-apiserver etcd helm; do ln -sf "$TOOLS_DIR/$b" "$BIN_DIR/$b"; done

echo "$BIN_DIR"
