#!/usr/bin/env bash
# The images `make e2e-k8s` runs, built from images/ with buildah and imported into the e2e cluster's
# containerd (no registry is reachable here, so nothing is pulled):
#
#   1. a base: Debian bookworm from debootstrap (minbase, Python 3.11 and venv), cached under
#      $ESSP_K8S_CACHE/../images; it stands in for python:3.11-slim-bookworm (BASE_IMAGE build arg);
#   2. essp-worker-cpu:e2e from images/worker-cpu/Dockerfile FROM that base (buildah's layer cache keeps
#      the dependency layer until pyproject.toml or constraints.txt changes), torch from this machine's
#      wheel folder ($ESSP_WHEELS, default /opt/wheels) mounted into the build;
#   3. imported into containerd when its image ID differs from the one imported last.
#
# Run by `k8s/e2e/cluster.sh up` callers after the cluster is up: images.sh [worker-cpu]
set -euo pipefail
# umask 022: the base's root file system and the layers must be readable by the image's non-root user
# whatever the caller's umask.
umask 022

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
STATE=${ESSP_K8S_STATE:-$HOME/.local/state/essp/k8s}
CACHE_ROOT=${ESSP_K8S_CACHE:-$HOME/.cache/essp/k8s}
IMAGES=$CACHE_ROOT/images
WHEELS=${ESSP_WHEELS:-/opt/wheels}
BASE_TAG=localhost/essp-base:bookworm
TAG=${ESSP_E2E_IMAGE:-essp-worker-cpu:e2e}
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates

log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }
BUILDAH() { buildah --root "$IMAGES/storage" --runroot "$STATE/buildah-run" --storage-driver overlay "$@"; }
CTR() { ctr --address "$STATE/containerd/containerd.sock" -n k8s.io "$@"; }

[ "$(id -u)" = 0 ] || die "this needs root (buildah's storage and containerd)"

# buildah mounts its overlay store (and a build's layers) on the host: nothing stays mounted after us.
release_mounts() {
    BUILDAH rm --all >/dev/null 2>&1 || true
    local m
    for m in $(awk '{print $5}' /proc/self/mountinfo | grep "^$IMAGES/storage" | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
}
trap release_mounts EXIT
command -v buildah >/dev/null || die "buildah is missing: run k8s/e2e/cluster.sh build first"
mkdir -p "$IMAGES" "$STATE/buildah-run"

base_image() {
    BUILDAH inspect --type image "$BASE_TAG" >/dev/null 2>&1 && return 0
    local mirror t0=$SECONDS
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1 || true)
    local rootfs=$IMAGES/base-rootfs
    rm -rf "$rootfs"
    log "debootstrap bookworm (minbase + $BASE_PACKAGES)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" \
        > "$IMAGES/debootstrap.log" 2>&1 || die "debootstrap failed: see $IMAGES/debootstrap.log"
    # The image's apt sources: the same archive, with its security updates.
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/" 2>/dev/null && rm -f "$rootfs/etc/apt/sources.list"
    # This machine reaches PyPI through a proxy whose CA is in the host's bundle only: the base carries the
    # host's bundle, and pip and Python's ssl are pointed at it (PIP_CERT, SSL_CERT_FILE below).
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
    tar -C "$rootfs" --numeric-owner -cf "$IMAGES/base-rootfs.tar" .
    rm -rf "$rootfs"
    local c
    c=$(BUILDAH from --pull=false scratch)
    BUILDAH add "$c" "$IMAGES/base-rootfs.tar" / >/dev/null
    BUILDAH config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
        --cmd /bin/bash --label org.opencontainers.image.description="Debian bookworm minbase + Python 3.11, from debootstrap" "$c"
    BUILDAH commit --quiet --rm "$c" "$BASE_TAG" >/dev/null
    rm -f "$IMAGES/base-rootfs.tar"
    log "base image $BASE_TAG in $((SECONDS - t0)) s"
}

worker_cpu() {
    local t0=$SECONDS extra=()
    [ -d "$WHEELS" ] && extra=(--volume "$WHEELS:/wheels:ro" --build-arg "PIP_EXTRA_ARGS=--find-links=/wheels")
    log "building $TAG from images/worker-cpu/Dockerfile (BASE_IMAGE=$BASE_TAG)"
    (cd "$ROOT" && BUILDAH bud --layers --pull=false --isolation chroot --network host \
        --build-arg "BASE_IMAGE=$BASE_TAG" --build-arg TORCH_INDEX_URL= "${extra[@]}" \
        -f images/worker-cpu/Dockerfile -t "$TAG" . > "$IMAGES/worker-cpu.build.log" 2>&1) \
        || { tail -30 "$IMAGES/worker-cpu.build.log" >&2; die "the build of $TAG failed: see $IMAGES/worker-cpu.build.log"; }
    log "built $TAG in $((SECONDS - t0)) s"
    import "$TAG"
}

import() {  # tag: into containerd, unless that image ID is already there
    local tag=$1 id marker t0=$SECONDS
    CTR version >/dev/null 2>&1 || die "the e2e cluster's containerd does not answer: run k8s/e2e/cluster.sh up first"
    id=$(BUILDAH inspect --type image --format '{{.FromImageID}}' "$tag")
    marker=$STATE/containerd/imported-$(echo "$tag" | tr '/:' '__').id
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$id" ] && CTR images ls -q | grep -qx "docker.io/library/$tag\|$tag"; then
        check "$tag"; log "$tag ($id) is already in containerd"; return 0
    fi
    local tar=$IMAGES/import.tar
    rm -f "$tar"
    BUILDAH push --quiet "$tag" "docker-archive:$tar:$tag" >/dev/null
    CTR images import "$tar" >/dev/null
    rm -f "$tar"
    check "$tag"
    echo "$id" > "$marker"
    log "imported $tag into containerd in $((SECONDS - t0)) s"
}

check() {  # tag: its entrypoint runs in containerd as the image's own user, as a pod's would
    local tag=$1 ref name=essp-image-check-$$
    ref=$(CTR images ls -q | grep -E "(^|/)$tag\$" | head -1)
    [ -n "$ref" ] || die "$tag is not in containerd after the import"
    CTR run --rm --net-host --cgroup "/essp-e2e/$name" "$ref" "$name" essp --help > "$IMAGES/check.log" 2>&1 \
        || { cat "$IMAGES/check.log" >&2; CTR containers rm "$name" >/dev/null 2>&1 || true
             die "$ref does not run 'essp --help' in containerd (see above; layers unpacked under a private umask by
    an earlier version of cluster.sh stay so: k8s/e2e/cluster.sh down && rm -rf $STATE/containerd/root)"; }
}

base_image
case "${1:-worker-cpu}" in
    worker-cpu) worker_cpu ;;
    base) ;;
    *) die "usage: $0 [worker-cpu|base]" ;;
esac
