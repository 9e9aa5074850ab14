#!/usr/bin/env bash
# Builds the local Python base image that example and test functions build on.
# No public image registry is reachable here, so the root filesystem comes from
# Debian's own packages via debootstrap and is imported into the local engine.
set -euo pipefail
IMAGE="${IMAGEFN_BASE_IMAGE:-imagefn/python-base:bookworm}"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE already present"
  exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap; }
ROOTFS="$(mktemp -d /tmp/imagefn-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
echo "building $IMAGE with debootstrap (about a minute)..."
debootstrap --variant=minbase --include=python3 bookworm "$ROOTFS" >"$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log"; exit 1; }
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import -c 'ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1' - "$IMAGE" >/dev/null
rm -f "$ROOTFS.log"
echo "built $IMAGE"
