#!/usr/bin/env bash
# Install cachefs and everything it needs on Debian/Ubuntu, as root.
#
#   ./install.sh          system packages + the package in .venv (enough for `cachefs demo`)
#   ./install.sh --test   also test/bench tools: SeaweedFS, Azurite, hadolint, peers (s3fs, rclone),
#                         podman, runc and debootstrap (the container test)
#
# Idempotent: re-running only installs what is missing.
set -euo pipefail

# Everything is in a function that runs only once bash has read the whole file, so editing
# this script while it runs cannot break the run.
main() {
  cd "$(dirname "$0")"

  want_test=0
  for arg in "$@"; do
    case "$arg" in
      --test) want_test=1 ;;
      -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
      *) echo "install.sh: unknown option: $arg" >&2; exit 2 ;;
    esac
  done

  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

  # fuse3 (fusermount3), and what pyfuse3 needs to build from source.
  apt_pkgs=(fuse3 libfuse3-dev pkg-config build-essential python3-dev python3-venv ca-certificates patch)
  if [ "$want_test" -eq 1 ]; then
    # Azurite runs on node; s3fs and rclone are the peers the benchmark compares against.
    apt_pkgs+=(nodejs s3fs rclone systemd)  # systemd: systemd-analyze verifies the unit file
    apt_pkgs+=(rsync)  # tests/fuse/test_write.py: rsync -a into a read-write mount
    apt_pkgs+=(podman runc debootstrap)  # tests/container: k8s/build-image.sh, then run the image
    # Debian ships npm as its own package; NodeSource's nodejs bundles it and conflicts with it.
    command -v npm >/dev/null 2>&1 || apt_pkgs+=(npm)
  fi
  missing=()
  for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi

  PY=${PYTHON:-python3}
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  # pyfuse3 with the kernel-cache patch (third_party/README.md), before the package that needs it.
  third_party/build-pyfuse3.sh .venv/bin/python
  # Exact versions from constraints.txt (refresh: .venv/bin/python tools/refresh_constraints.py).
  if [ "$want_test" -eq 1 ]; then
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
    if ! [ -x .venv/azurite/node_modules/.bin/azurite ]; then
      npm install --no-audit --no-fund --silent --prefix .venv/azurite azurite@3
    fi
  else
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[demo]'
  fi
  # mount(8) runs /sbin/mount.fuse.<subtype> for `mount -t fuse.cachefs` and fstab lines.
  $SUDO ln -sfn "$PWD/.venv/bin/mount.fuse.cachefs" /sbin/mount.fuse.cachefs
  echo "install.sh: done; run .venv/bin/cachefs --help (mount(8) helper: /sbin/mount.fuse.cachefs)"
}

main "$@"
