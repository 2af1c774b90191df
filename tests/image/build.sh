#!/usr/bin/env bash
# Builds the two tsnet2 container images for the image tests (docs/image.md): the full image
# localhost/tsnet2:test (the Containerfile's default target) and the sidecar image
# localhost/tsnet2-sidecar:test (--target sidecar).
#
# * installs podman, buildah, runc and debootstrap from Debian when missing (needs root);
# * builds a Debian bookworm base image with debootstrap (no registry is reachable on the
#   CI machine), localhost/tsnet2-base:bookworm, unless it exists;
# * stages the current wireguard-go (image/wireguard-go/build.sh) in the build context when
#   Go or its cached build is here, else the image takes Debian's package;
# * builds each image from the Containerfile at the repository root on that base, unless an
#   image with the same source hash (label io.tsnet2.source-hash) exists already.
#
# Safe to run again; it only does what is missing. Environment:
#   TSNET2_IMAGE       the full image (default localhost/tsnet2:test)
#   TSNET2_SIDECAR_IMAGE  the sidecar image (default localhost/tsnet2-sidecar:test)
#   TSNET2_BASE_IMAGE  base image; set it to e.g. docker.io/library/python:3.11-slim-bookworm
#                      where a registry is reachable (default: the debootstrap base)
#   DEBIAN_MIRROR      mirror for debootstrap (default http://deb.debian.org/debian)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF="$PWD/tests/image/containers.conf"

IMAGE=${TSNET2_IMAGE:-localhost/tsnet2:test}
SIDECAR_IMAGE=${TSNET2_SIDECAR_IMAGE:-localhost/tsnet2-sidecar:test}
DEBOOTSTRAP_BASE=localhost/tsnet2-base:bookworm
BASE=${TSNET2_BASE_IMAGE:-$DEBOOTSTRAP_BASE}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
say() { echo "image: $*" >&2; }

need=()
for spec in podman:podman buildah:buildah runc:runc debootstrap:debootstrap iptables:iptables catatonit:catatonit; do
    command -v "${spec%%:*}" >/dev/null 2>&1 || need+=("${spec#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        say "missing ${need[*]}; run as root or: apt-get install ${need[*]}"
        exit 1
    fi
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ "$BASE" = "$DEBOOTSTRAP_BASE" ] && ! podman image exists "$DEBOOTSTRAP_BASE"; then
    say "building $DEBOOTSTRAP_BASE with debootstrap from $MIRROR"
    start=$SECONDS
    rootfs=$(mktemp -d /var/tmp/tsnet2-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
        tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
    rm -f "$rootfs.log"
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
    # Slim: no .debs, apt lists or binary caches, docs, man pages or locales.
    tar -C "$rootfs" \
        --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' \
        --exclude='./var/cache/apt/*.bin' --exclude='./usr/share/doc/*' \
        --exclude='./usr/share/man/*' --exclude='./usr/share/locale/*' \
        --exclude='./usr/share/info/*' -c . \
      | podman import \
          --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
          --change 'CMD ["/bin/bash"]' - "$DEBOOTSTRAP_BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    say "base image ready in $((SECONDS - start)) s"
fi

# wireguard-go: stage the current build (image/wireguard-go/build.sh: built once with Go, or
# found in its cache) in the build context, where the Containerfile takes it; with neither,
# remove a stale one, and the image takes Debian's package.
staged=image/wireguard-go/wireguard-go
if command -v go >/dev/null 2>&1 || [ -x "$(image/wireguard-go/build.sh --print-path)" ]; then
    wg=$(image/wireguard-go/build.sh)
    cmp -s "$wg" "$staged" || install -m 0755 "$wg" "$staged"
    say "wireguard-go: $("$staged" --version | head -1) (built by image/wireguard-go/build.sh)"
else
    rm -f "$staged"
    say "wireguard-go: no Go toolchain and no cached build: the image takes Debian's package"
fi

# The content hash of everything the Containerfile copies, plus the base image's id.
hash=$( {
    podman image inspect --format '{{.Id}}' "$BASE" 2>/dev/null || echo "$BASE"
    find Containerfile .containerignore pyproject.toml README.md image tsnet2 operator \
        -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum
} | sha256sum | cut -c1-32)

# --format docker keeps HEALTHCHECK (the OCI image config has no such field);
# --isolation chroot because crun cannot run containers on this host's hybrid cgroups.
ca_args=()
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
if [ -f "$ca" ]; then
    # pip in the build trusts what the host trusts (e.g. a TLS-intercepting proxy's CA).
    ca_args=(-v "$(readlink -f "$ca"):/run/tsnet2-build-ca.crt:ro"
             --build-arg PIP_CA=/run/tsnet2-build-ca.crt)
fi
# The image's version label comes from the one place the version lives.
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' tsnet2/_version.py)

# build IMAGE [TARGET]: build the Containerfile's TARGET stage (none: its default, the full
# image, as a plain `buildah bud .` does) as IMAGE, unless IMAGE has this source hash.
build() {
    local image=$1 target=${2:-}
    local current
    current=$(podman image inspect --format '{{index .Labels "io.tsnet2.source-hash"}}' \
        "$image" 2>/dev/null || true)
    if [ "$current" = "$hash" ]; then
        say "$image is up to date ($hash)"
        return 0
    fi
    say "building $image${target:+ (--target $target)} on $BASE"
    local start=$SECONDS
    buildah bud --isolation chroot --format docker --layers=false "${ca_args[@]}" \
        ${target:+--target "$target"} \
        --build-arg "BASE=$BASE" \
        --build-arg "VERSION=$VERSION" \
        --build-arg "SOURCE_HASH=$hash" \
        --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        -t "$image" -f Containerfile . >&2
    # Drop the dangling image the previous build of this tag left behind.
    podman image prune -f --filter "label=io.tsnet2.source-hash" >/dev/null 2>&1 || true
    say "built $image in $((SECONDS - start)) s: $(podman image inspect --format '{{.Size}}' "$image") bytes"
}

build "$IMAGE"
build "$SIDECAR_IMAGE" sidecar
