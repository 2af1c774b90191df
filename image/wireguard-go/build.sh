#!/usr/bin/env bash
# Build the pinned wireguard-go (golang.zx2c4.com/wireguard, the version go.mod here
# requires: the one tailscale.com requires, see update.sh) from the Go module proxy.
# The lab, the tests, `make demo`, `make bench` and the image use it instead of Debian's
# much older wireguard-go 0.0.20220316 (docs/dataplane.md).
#
# The binary goes to
#   ${TSNET2_TOOLS_CACHE:-/var/cache/tsnet2-tools}/wireguard-go-<module version>/wireguard-go
# and its path is printed on stdout (progress goes to stderr). Idempotent: once that file
# exists (it is only ever renamed into place after a build that reports the right
# version) nothing is built and neither Go nor the network is needed. Cold: under 20 s.
# Static (CGO_ENABLED=0), no toolchain download, go.sum enforced, never `@latest`.
#
# Usage: image/wireguard-go/build.sh [--print-path]
#   --print-path   only print where the binary is or would be (no build, no Go needed)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODULE=golang.zx2c4.com/wireguard
VERSION=$(awk -v m="$MODULE" '($1 == m || ($1 == "require" && $2 == m)) {print ($1 == "require" ? $3 : $2); exit}' "$HERE/go.mod")
[[ -n $VERSION ]] || { echo "wireguard-go: $HERE/go.mod does not require $MODULE (run update.sh)" >&2; exit 1; }
BIN_DIR="${TSNET2_TOOLS_CACHE:-/var/cache/tsnet2-tools}/wireguard-go-$VERSION"
BIN="$BIN_DIR/wireguard-go"

# built: the binary is in place and runs (it was verified before it was renamed there).
built() { [[ -x $BIN ]] && "$BIN" --version 2>/dev/null | grep -q '^wireguard-go v'; }

case ${1:-} in
    --print-path) echo "$BIN"; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--print-path]" >&2; exit 2 ;;
esac

if built; then
    echo "$BIN"
    exit 0
fi

command -v go >/dev/null || { echo "wireguard-go: 'go' not found in PATH (need Go >= 1.23)" >&2; exit 1; }
mkdir -p "$BIN_DIR"
exec 9>"$BIN_DIR/.lock"   # one build at a time per version
flock 9
if built; then            # another build finished while we waited
    echo "$BIN"
    exit 0
fi

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"
start=$SECONDS
echo "wireguard-go: building $MODULE@$VERSION ..." >&2
# The version the binary reports is a constant of the module (version.go), not the
# pseudo-version: read it from the source that is built, to check the result.
src=$(cd "$HERE" && go mod download -json "$MODULE@$VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
want=$(sed -n 's/^const Version = "\(.*\)"$/\1/p' "$src/version.go" 2>/dev/null || true)
[[ -n $want ]] || { echo "wireguard-go: no version constant in $src/version.go" >&2; exit 1; }
tmp="$BIN_DIR/.wireguard-go.tmp.$$"
trap 'rm -f "$tmp"' EXIT
(cd "$HERE" && nice -n 10 go build -trimpath -ldflags "-s -w" -o "$tmp" "$MODULE") || {
    echo "wireguard-go: building $MODULE@$VERSION failed" >&2; exit 1; }
got=$("$tmp" --version | head -1)
[[ $got == "wireguard-go v$want" ]] || {
    echo "wireguard-go: built binary reports '$got', expected 'wireguard-go v$want'" >&2; exit 1; }
mv -f "$tmp" "$BIN"
trap - EXIT
echo "wireguard-go: built v$want ($MODULE@$VERSION) in $((SECONDS - start)) s" >&2
echo "$BIN"
