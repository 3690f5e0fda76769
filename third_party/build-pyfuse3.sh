#!/usr/bin/env bash
# Build and install the vendored pyfuse3 with cachefs's patch into a Python environment.
#
#   third_party/build-pyfuse3.sh PYTHON
#
# The vendored tree (pyfuse3-3.5.0/) stays as released; the patch is applied to a copy. The
# installed version is 3.5.0+cachefs.<first 8 hex digits of the patch's sha256>, so a changed
# patch is rebuilt and an unchanged one is not. Needs what pyfuse3 needs to build: a C compiler,
# python3-dev, libfuse3-dev, pkg-config (install.sh installs them) and `patch`.
set -euo pipefail

PY=${1:?usage: build-pyfuse3.sh PYTHON}
here=$(cd "$(dirname "$0")" && pwd)
patch_file="$here/pyfuse3-3.5.0-cachefs.patch"
version="3.5.0+cachefs.$(sha256sum "$patch_file" | cut -c1-8)"

installed=$("$PY" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' 2>/dev/null || true)
if [ "$installed" = "$version" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -a "$here/pyfuse3-3.5.0" "$work/src"
patch -s -p1 -d "$work/src" < "$patch_file"
echo "build-pyfuse3: building pyfuse3 $version (a minute or two: Cython and a C compile)"
# --no-deps: its one dependency, trio, is installed with the package at the version pinned in
# constraints.txt.
SETUPTOOLS_SCM_PRETEND_VERSION="$version" "$PY" -m pip install -q --no-cache-dir --no-deps "$work/src"
