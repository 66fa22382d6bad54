#!/usr/bin/env bash
# Make a stand-in for the images' Python base (python:3.11-slim-bookworm) where no container
# registry can be reached: Debian bookworm `minbase` with python3 and python3-venv, made by
# debootstrap from the Debian mirror and loaded with `docker import`. Build the images on it with
# `--build-arg PYTHON_IMAGE=<tag>` (scripts/container_check.sh does).
#
#   bash scripts/container_base.sh [TAG]        # default letterrec-standin/python:3.11-bookworm
#   FORCE=1 bash scripts/container_base.sh      # remake it even if the tag exists
#
# Differences from the official image, none of which the Dockerfiles rely on: Debian's
# python3.11 (/usr/bin/python3, `python` a symlink to it) instead of one built under
# /usr/local; bookworm's pip (23.x) inside venvs. The host's CA bundle replaces Debian's, so
# that pip and apt inside builds trust what the host trusts (a TLS-intercepting proxy's CA).
# Needs root (debootstrap, docker). Environment: DEBIAN_MIRROR (default deb.debian.org).
set -euo pipefail

TAG=${1:-${LETTERREC_BASE_IMAGE:-letterrec-standin/python:3.11-bookworm}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

say() { echo "container_base: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "debootstrap needs root (run as root or with sudo)"
command -v docker >/dev/null || die "no docker CLI on PATH (scripts/container_check.sh installs docker.io)"
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer (start dockerd first)"

if [ -z "${FORCE:-}" ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  say "$TAG exists already ($(docker image inspect -f '{{.Created}}' "$TAG")); FORCE=1 remakes it"
  exit 0
fi

if ! command -v debootstrap >/dev/null; then
  say "installing debootstrap from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y --no-install-recommends debootstrap >/dev/null; } \
    || die "cannot install debootstrap (apt-get install debootstrap)"
fi

ROOTFS=$(mktemp -d /var/tmp/letterrec-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
start=$(date +%s)
say "debootstrap --variant=minbase $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
  || { tail -20 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; die "debootstrap failed (log above)"; }
rm -f "$ROOTFS.log"

ln -sf python3 "$ROOTFS/usr/bin/python"
[ -f "$CA_BUNDLE" ] && cp "$CA_BUNDLE" "$ROOTFS$CA_BUNDLE"
# The same sources as debootstrap used, plus security updates, for apt-get inside builds.
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
# What an image does not need: package lists and caches, docs, man pages.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*

tar -C "$ROOTFS" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "stand-in for python:3.11-slim-bookworm (debootstrap minbase, $MIRROR)" \
  - "$TAG" >/dev/null

python_version=$(docker run --rm --network host "$TAG" python --version)
size=$(docker image inspect -f '{{.Size}}' "$TAG")
say "made $TAG in $(( $(date +%s) - start )) s: Debian $SUITE minbase, $python_version, $(( size / 1000000 )) MB"
