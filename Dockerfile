# cachefs container image: the FUSE daemon, for a Kubernetes sidecar or DaemonSet (see k8s/).
#
#   docker build -t cachefs:dev .
#   docker run --rm --privileged -e CACHEFS_SOURCE=s3://bucket/prefix \
#       -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -p 9100:9100 cachefs:dev
#
# Without a registry, k8s/build-image.sh bootstraps the Debian base with debootstrap and builds
# this file with podman (tests/container runs the result as a sidecar would run).
#
# Two stages: the first compiles the vendored, patched pyfuse3 against libfuse3 (and installs every other dependency)
# into a virtualenv; the second copies that virtualenv into a slim image that has the fuse3
# runtime but no compiler. Both use the same base image and Debian's Python 3.11, so the
# virtualenv's interpreter path is valid in both.
#
# Reproducible: Python packages at the exact versions of constraints.txt; Debian packages pinned
# to their upstream version with a wildcard for the Debian revision (fuse3=3.14.*), which every
# point release of Debian 12 (bookworm) keeps while its security fixes still install.

ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# build-essential + pkg-config + libfuse3-dev + python3-dev: pyfuse3 has no binary wheels and
# builds against libfuse3. Nothing from this stage but /opt/cachefs reaches the final image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential=12.* \
        libfuse3-dev=3.14.* \
        pkg-config=1.8.* \
        python3-dev=3.11.* \
        python3-venv=3.11.* \
        patch=2.7.* \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python3 -m venv /opt/cachefs

WORKDIR /src
COPY third_party/ third_party/
# pyfuse3 3.5.0 with cachefs's patch (third_party/README.md), built from the vendored source
# (without its dependency, trio, which comes next from constraints.txt).
RUN third_party/build-pyfuse3.sh /opt/cachefs/bin/python
COPY pyproject.toml README.md constraints.txt ./
# The dependencies declared in pyproject.toml, at the versions of constraints.txt, in a layer of
# their own that a change of the code does not rebuild (an empty package stands in for it).
RUN mkdir cachefs && touch cachefs/__init__.py \
    && /opt/cachefs/bin/pip install --no-cache-dir -c constraints.txt . \
    && rm -rf cachefs build
COPY cachefs/ cachefs/
# Then the package itself: a regular (not editable) install.
RUN /opt/cachefs/bin/pip install --no-cache-dir --no-deps --force-reinstall . \
    && /opt/cachefs/bin/cachefs --help >/dev/null


FROM ${BASE_IMAGE}

# fuse3: fusermount3 (cachefs unmount uses it) and libfuse3-3, which pyfuse3 links against.
# python3: the interpreter of the virtualenv. tini: a minimal PID 1 that forwards SIGTERM to
# cachefs and reaps the fusermount3 children. ca-certificates (for TLS to the store) is the one
# package left unpinned, on purpose: Debian moves it to a new upstream version within a release
# (bookworm went from 20230311 to 20250419), and it must stay current.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        fuse3=3.14.* \
        libfuse3-3=3.14.* \
        python3=3.11.* \
        tini=0.19.* \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/cachefs /opt/cachefs
COPY daemon/entrypoint.sh /usr/local/bin/cachefs-entrypoint
COPY daemon/cachefs.toml /etc/cachefs/cachefs.toml

# The metrics server listens on all interfaces inside the container so that Prometheus (and the
# kubelet's probes) can reach it; outside a container cachefs defaults to 127.0.0.1. As the
# environment beats the config file, change the address with CACHEFS_METRICS_ADDR, not the file.
ENV PATH=/opt/cachefs/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CACHEFS_CONFIG=/etc/cachefs/cachefs.toml \
    CACHEFS_METRICS_ADDR=0.0.0.0:9100

# Runs as root, on purpose: mounting a FUSE filesystem needs CAP_SYS_ADMIN and /dev/fuse, and in
# Kubernetes mount propagation to other containers (Bidirectional) is only allowed for privileged
# containers. fusermount3 cannot help a non-root user here either: it is setuid root, which a
# container started without privileges (no_new_privs, no CAP_SYS_ADMIN) cannot use. The files
# cachefs serves are shown read-only (0444/0555) to every user, so the consumers (the training
# containers) run unprivileged and as any user.

# The default cache_dir; mount a local SSD (or a tmpfs) here.
VOLUME ["/var/cache/cachefs"]
EXPOSE 9100

# /healthz answers 200 while a real request through the mount completes within 5 s.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('CACHEFS_METRICS_ADDR', '9100').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=8)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "cachefs-entrypoint"]
