#!/usr/bin/env bash
# Build the cachefs image with podman where no container registry is reachable: the Debian 12
# base image is bootstrapped locally with debootstrap (from the machine's own apt mirror) and
# imported, then the repository's Dockerfile is built on it.
#
#   k8s/build-image.sh [IMAGE]        default IMAGE: localhost/cachefs:dev
#
# Environment: BASE_IMAGE (default localhost/cachefs-base:bookworm; bootstrapped only if podman
# does not have it yet, or with REFRESH_BASE=1), MIRROR / SECURITY_MIRROR (default: the URIs of
# the machine's apt sources), PODMAN_RUNTIME (default runc: crun refuses cgroup v1 hosts in
# hybrid mode). Needs root, podman, runc and debootstrap (apt-get install podman runc debootstrap).
# Prints the build time and the image size at the end.
set -euo pipefail

main() {
  cd "$(dirname "$0")/.."
  image=${1:-localhost/cachefs:dev}
  base=${BASE_IMAGE:-localhost/cachefs-base:bookworm}
  runtime=${PODMAN_RUNTIME:-runc}
  for tool in podman debootstrap "$runtime"; do
    command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install podman runc debootstrap)"
  done

  if [ "${REFRESH_BASE:-0}" = 1 ] || ! podman image exists "$base"; then
    bootstrap_base "$base"
  fi

  say "building $image on $base"
  start=$(date +%s)
  # Host network for the RUN steps (apt, pip); ulimits at or below the host's, which a
  # container may not raise.
  # Docker format: OCI images drop SHELL (pipefail) and HEALTHCHECK.
  podman build --format docker --runtime "$runtime" --network host \
      --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
      --build-arg BASE_IMAGE="$base" -t "$image" -f Dockerfile .
  took=$(( $(date +%s) - start ))
  size=$(podman image inspect --format '{{.Size}}' "$image")
  say "built $image in ${took} s; image size $(( size / 1000000 )) MB"
}

say() { printf 'build-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# The first URI of the machine's apt sources (deb822 or one-line format) serving $1 ("bookworm"
# or "bookworm-security"); nothing if none (a missing file is no error).
apt_uri() {
  local suite=$1
  {
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v suite="$suite" '
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) print uri }
      /^$/ { uri = "" }' || true
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v suite="$suite" '
      $1 == "deb" && $3 == suite { print $2 }' || true
  } | awk 'NR == 1'
}

bootstrap_base() {
  local tag=$1 mirror security work
  mirror=${MIRROR:-$(apt_uri bookworm)}
  security=${SECURITY_MIRROR:-$(apt_uri bookworm-security)}
  [ -n "$mirror" ] || die "no Debian mirror for bookworm in the apt sources: set MIRROR"
  work=$(mktemp -d /var/tmp/cachefs-base.XXXXXX)
  # An interrupted debootstrap may leave /proc and /sys mounted in the tree: never delete into them.
  # shellcheck disable=SC2064  # expand $work now
  trap "umount -R '$work/root/proc' '$work/root/sys' 2>/dev/null; rm -rf --one-file-system '$work'" EXIT
  say "debootstrap bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  # The suites an official debian:bookworm image has: point-release updates and security fixes.
  {
    printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\n' "$mirror"
    printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    if [ -n "$security" ]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\n' "$security"
      printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    fi
  } >"$work/root/etc/apt/sources.list.d/debian.sources"
  rm -f "$work/root/etc/apt/sources.list"
  # Slim, as the official images: apt keeps neither the packages it installed nor its binary
  # caches (RUN steps delete only the lists), and no documentation or translations.
  printf '%s\n' 'APT::Keep-Downloaded-Packages "false";' 'Dir::Cache::pkgcache "";' \
      'Dir::Cache::srcpkgcache "";' >"$work/root/etc/apt/apt.conf.d/docker-clean"
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
      'path-exclude /usr/share/locale/*' >"$work/root/etc/dpkg/dpkg.cfg.d/docker-slim"
  find "$work/root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
  rm -rf "$work/root/usr/share/man/"* "$work/root/usr/share/info/"* "$work/root/usr/share/locale/"* \
      "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"* "$work/root/var/log/"*
  # Behind a TLS-inspecting proxy the machine trusts extra CAs (/usr/local/share/ca-certificates),
  # and pip in the build must too: this base (never the Dockerfile) carries them, in the bundle
  # and where the runtime stage's ca-certificates package adds them to its own.
  local change=()
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    say "the base trusts this machine's extra CAs: $(cd /usr/local/share/ca-certificates && echo ./*.crt)"
    mkdir -p "$work/root/usr/local/share/ca-certificates" "$work/root/etc/ssl/certs"
    cp /usr/local/share/ca-certificates/*.crt "$work/root/usr/local/share/ca-certificates/"
    cp /etc/ssl/certs/ca-certificates.crt "$work/root/etc/ssl/certs/"
    change=(--change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt')
  fi
  tar -C "$work/root" --numeric-owner -c . \
    | podman import --change 'CMD ["bash"]' "${change[@]}" - "$tag" >/dev/null
  say "imported $tag ($(du -sm "$work/root" | cut -f1) MB)"
  rm -rf --one-file-system "$work"
  trap - EXIT
}

main "$@"
