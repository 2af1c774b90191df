#!/usr/bin/env bash
# Regenerate go.mod + go.sum here: pin golang.zx2c4.com/wireguard (the wireguard-go
# command is its module root) at the exact version that tailscale.com TAILSCALE_VERSION
# requires, read from that release's go.mod as the Go module proxy serves it.
#
# Usage: image/wireguard-go/update.sh TAILSCALE_VERSION     (e.g. 1.102.5)
# Needs the Go module proxy and checksum DB. Commit the result; build.sh builds it.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 TAILSCALE_VERSION   (e.g. 1.102.5)" >&2
    exit 2
fi
TS=${1#v}
[[ $TS =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "bad TAILSCALE_VERSION '$1' (want X.Y.Z)" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

ts_gomod=$(go mod download -json "tailscale.com@v$TS" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
[[ -f $ts_gomod ]] || { echo "could not download go.mod of tailscale.com@v$TS" >&2; exit 1; }
wg=$(awk '($1 == "golang.zx2c4.com/wireguard") {print $2; exit}' "$ts_gomod")
[[ -n $wg ]] || { echo "tailscale.com@v$TS does not require golang.zx2c4.com/wireguard" >&2; exit 1; }

cd "$HERE"
rm -f go.mod go.sum
go mod init tsnet2.invalid/wireguard-go >/dev/null 2>&1
# A low `go` floor: `go get` raises it to what wireguard-go itself declares.
go mod edit -go=1.22
go get -tool "golang.zx2c4.com/wireguard@$wg"
go mod tidy
# The comment build.sh and readers see: where the pin comes from.
{ echo "// wireguard-go as tailscale.com v$TS requires it (regenerate: update.sh TAILSCALE_VERSION)."
  cat go.mod; } >go.mod.new && mv go.mod.new go.mod
echo "pinned golang.zx2c4.com/wireguard $wg (tailscale.com v$TS)"
