#!/usr/bin/env bash
# Build the Go tsnet row of `make bench` (tests/bench/gotsnet: two tailscale.com/tsnet nodes,
# testcontrol and DERP in one process; test tooling only, never product) from the Go module
# proxy, pinned by go.mod/go.sum here (tailscale.com v1.102.5).
#
# The binary goes to
#   ${TSNET2_TOOLS_CACHE:-/var/cache/tsnet2-tools}/gotsnet-<tailscale.com version>-<source hash>/gotsnet
# and its path is printed on stdout (progress goes to stderr). Idempotent: once that file
# exists (it is only renamed into place after a successful build) nothing is built and
# neither Go nor the network is needed. Cold: about 3 minutes on 2 CPUs (tailscale.com is
# large); cached: instant. Static (CGO_ENABLED=0), no toolchain download, go.sum enforced.
#
# Usage: tests/bench/gotsnet/build.sh [--print-path]
#   --print-path   only print where the binary is or would be (no build, no Go needed)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODULE=tailscale.com
VERSION=$(awk -v m="$MODULE" '($1 == m || ($1 == "require" && $2 == m)) {print ($1 == "require" ? $3 : $2); exit}' "$HERE/go.mod")
[[ -n $VERSION ]] || { echo "gotsnet: $HERE/go.mod does not require $MODULE" >&2; exit 1; }
# The program's own source is part of the key, so an edit is never served a stale binary.
SRC_HASH=$(cat "$HERE"/go.mod "$HERE"/go.sum "$HERE"/*.go | sha256sum | cut -c1-12)
BIN_DIR="${TSNET2_TOOLS_CACHE:-/var/cache/tsnet2-tools}/gotsnet-$VERSION-$SRC_HASH"
BIN="$BIN_DIR/gotsnet"

case ${1:-} in
    --print-path) echo "$BIN"; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--print-path]" >&2; exit 2 ;;
esac

if [[ -x $BIN ]]; then
    echo "$BIN"
    exit 0
fi

command -v go >/dev/null || { echo "gotsnet: 'go' not found in PATH (need Go >= 1.26)" >&2; exit 1; }
mkdir -p "$BIN_DIR"
exec 9>"$BIN_DIR/.lock"   # one build at a time per version
flock 9
if [[ -x $BIN ]]; then    # another build finished while we waited
    echo "$BIN"
    exit 0
fi

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"
start=$SECONDS
echo "gotsnet: building with $MODULE@$VERSION ..." >&2
tmp="$BIN_DIR/.gotsnet.tmp.$$"
trap 'rm -f "$tmp"' EXIT
(cd "$HERE" && nice -n 10 go build -trimpath -ldflags "-s -w" -o "$tmp" .) || {
    echo "gotsnet: build failed" >&2; exit 1; }
mv -f "$tmp" "$BIN"
trap - EXIT
echo "gotsnet: built ($MODULE@$VERSION) in $((SECONDS - start)) s" >&2
echo "$BIN"
