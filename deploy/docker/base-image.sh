#!/usr/bin/env bash
# Makes a Docker base image for arcsim without any container registry: Debian (minbase) with
# python3 and venv, bootstrapped from a Debian mirror with debootstrap and loaded with `docker import`.
#
#   deploy/docker/base-image.sh [NAME]          # default NAME: arcsim-base (make base-image)
#
# Needs root, debootstrap and a Docker engine ($DOCKER_HOST). The root filesystem is cached as a
# tarball (ARCSIM_BASE_CACHE, default build/base-image/), so a rerun only imports it (seconds),
# and the import is skipped when NAME already holds that tarball. Settings: ARCSIM_BASE_SUITE
# (default bookworm: python 3.11), ARCSIM_DEBIAN_MIRROR (default: this host's apt mirror when it is
# Debian, else http://deb.debian.org/debian), ARCSIM_BASE_PACKAGES (extra packages, comma-separated).
set -euo pipefail

name=${1:-arcsim-base}
suite=${ARCSIM_BASE_SUITE:-bookworm}
cache=${ARCSIM_BASE_CACHE:-build/base-image}
packages=python3,python3-venv${ARCSIM_BASE_PACKAGES:+,$ARCSIM_BASE_PACKAGES}
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "base-image: $*" >&2; }

# The first Debian (not security) mirror apt uses here, in either sources format.
host_mirror() {
    local uri
    uri=$( { grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i = 2; i <= NF; i++) print $i}';
             grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
                 sed -E 's/\[[^]]*\]//' | awk '{print $2}'; } |
           grep -E '/debian/?$' | head -n 1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

key=$(printf '%s\n' "$suite" "$packages" | sha256sum | cut -c1-12)
tarball="$cache/$name-$suite-$key.tar.gz"
if [ ! -s "$tarball" ]; then
    [ "$(id -u)" = 0 ] || { say "debootstrap needs root (or put a cached $tarball in place)"; exit 1; }
    command -v debootstrap >/dev/null || { say "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
    mirror=${ARCSIM_DEBIAN_MIRROR:-$(host_mirror)}
    mkdir -p "$cache"
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs" "$tarball.tmp"' EXIT
    say "debootstrap $suite ($packages) from $mirror"
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
        { tail -n 20 "$cache/debootstrap.log" >&2; say "debootstrap failed (log: $cache/debootstrap.log)"; exit 1; }
    # What an image does not need: downloaded packages, package lists, docs, manuals, translations.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/locale
    tar --numeric-owner -C "$rootfs" -c . | gzip -1 >"$tarball.tmp"
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
fi

digest=$(sha256sum "$tarball" | cut -c1-64)
current=$(docker image inspect --format '{{index .Config.Labels "org.arcsim.rootfs"}}' "$name" 2>/dev/null || true)
if [ "$current" = "$digest" ]; then
    say "$name is up to date ($tarball)"
    exit 0
fi
say "docker import $tarball -> $name"
docker import \
    --change "LABEL org.arcsim.rootfs=$digest" \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    "$tarball" "$name" >/dev/null
say "made $name"
