"""The image, run as a container: the sidecar pattern of k8s/sidecar with podman instead of a cluster.

The image is built from the Dockerfile on a Debian 12 base bootstrapped here (k8s/build-image.sh;
podman's layer cache makes a rebuild of an unchanged tree take seconds). Then:
- the cachefs container runs with /dev/fuse and CAP_SYS_ADMIN against moto on the host (host
  network), with the shared directory bound `rshared` (Bidirectional in Kubernetes) and its cache
  in a host directory (the node-local cache volume);
- a trainer container, unprivileged (uid 1000, no capabilities, read-only), sees the directory
  `rslave` (HostToContainer) and reads every file in a loop, checking each hash;
- `kill -9` of the cachefs container, then `podman start` of it: the entrypoint cleans the stale
  mount, mounts again, the new mount reaches the running trainer, which reads everything again
  (from the cache: no GET);
- SIGTERM (`podman stop`): cachefs unmounts and exits 0, and no mount is left on the host.

Needs root, podman, runc and debootstrap (install.sh --test installs them); fails, rather than
skips, without them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefs.testing.servers import Server, free_port

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/cachefs:test"
# crun refuses these cgroup v1 hosts; a container may not raise ulimits above the host's.
RUN = ["podman", "run", "--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

TRAINER = r"""
import hashlib, json, os, sys, time
root = sys.argv[1]
epoch = 0

def fail(exc):
    raise exc

while True:
    epoch += 1
    try:
        hashes = {}
        for d, _, files in os.walk(root, onerror=fail):
            for f in files:
                p = os.path.join(d, f)
                with open(p, "rb") as fh:
                    hashes[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
        if not hashes:
            raise FileNotFoundError(f"no files under {root}")
        print(json.dumps({"epoch": epoch, "hashes": hashes}), flush=True)
    except OSError as exc:
        print(json.dumps({"epoch": epoch, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
    time.sleep(0.3)
"""


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="session")
def image() -> str:
    assert os.geteuid() == 0, "the container test runs as root (podman, /dev/fuse, rshared mounts)"
    for tool in ("podman", "runc", "debootstrap"):
        assert shutil.which(tool), f"{tool} is not installed: install.sh --test installs it"
    res = subprocess.run([str(REPO / "k8s" / "build-image.sh"), IMAGE], capture_output=True, text=True,
                         timeout=1500)
    assert res.returncode == 0, f"k8s/build-image.sh failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return IMAGE


def host_mounts() -> dict[str, str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4]: line.split(" - ")[1].split()[0] for line in f}


def logs(name: str) -> str:
    res = podman("logs", name, check=False)
    return res.stdout + res.stderr


def wait_for(what: str, check: Any, timeout: float = 60, container: str | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f"; {container}'s log:\n{logs(container)[-3000:]}"
                                                             if container else ""))


def get_requests(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("cachefs_backend_requests_total{") and 'operation="get"' in line)


def fuse_reads(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("cachefs_fuse_operations_total{") and 'operation="read"' in line)


def answers(port: int, path: str) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=8).status == 200
    except OSError:
        return False


def ready(port: int) -> bool:
    return answers(port, "/readyz")


class Trainer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seen = 0  # epochs already looked at

    def epochs(self) -> list[dict[str, Any]]:
        out = podman("logs", self.name).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def next_epoch(self, timeout: float = 60, ok: bool = True) -> dict[str, Any]:
        """The first epoch after those seen so far that read everything (ok) or failed (not ok)."""
        def find() -> dict[str, Any] | None:
            for e in self.epochs()[self.seen:]:
                self.seen = e["epoch"]
                if ("hashes" in e) == ok:
                    return e
            return None
        return wait_for("the trainer's next " + ("complete" if ok else "failed") + " epoch", find, timeout,
                        container=self.name)


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:8]
    names = {"cachefs": f"cachefs-{tag}", "trainer": f"trainer-{tag}"}
    yield names
    for name in names.values():
        podman("rm", "-f", "-t", "5", name, check=False)


def test_sidecar_pattern_in_containers(image: str, moto: Server, names: dict[str, str], tmp_path: Path) -> None:
    bucket = f"c-{uuid.uuid4().hex[:10]}"
    moto.create_bucket(bucket)
    objects = {f"train/{i // 8}/{i:03d}.bin": os.urandom(100 + 4099 * i) for i in range(24)}
    objects["big.bin"] = os.urandom(5 << 20)
    moto.upload(bucket, objects)
    expected = {key: hashlib.sha256(data).hexdigest() for key, data in objects.items()}

    shared, cache = tmp_path / "shared", tmp_path / "node-cache"
    shared.mkdir()
    cache.mkdir()
    data = shared / "data"
    # A mount made in a container reaches the host only through a shared mount on the host side
    # (the kubelet's pod directories are; this machine's / is private): make the directory one.
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    subprocess.run(["mount", "--make-shared", str(shared)], check=True)
    port = free_port()
    cachefs = [*RUN, "-d", "--name", names["cachefs"], "--network", "host",
               "--device", "/dev/fuse", "--cap-add", "SYS_ADMIN",
               "-v", f"{shared}:{shared}:rshared", "-v", f"{cache}:/var/cache/cachefs",
               "-e", f"CACHEFS_SOURCE=s3://{bucket}", "-e", f"CACHEFS_MOUNTPOINT={data}",
               "-e", f"CACHEFS_ENDPOINT_URL={moto.endpoint_url}", "-e", f"CACHEFS_METRICS_ADDR=127.0.0.1:{port}",
               "-e", "CACHEFS_ALLOW_OTHER=true",
               *[arg for k, v in moto.env.items() for arg in ("-e", f"{k}={v}")], image]
    try:
        subprocess.run(cachefs, check=True, capture_output=True, text=True, timeout=60)
        wait_for("the mount on the host", lambda: host_mounts().get(str(data)) == "fuse.cachefs",
                 container=names["cachefs"])
        wait_for("/readyz", lambda: ready(port), container=names["cachefs"])

        # The trainer: unprivileged, sees the shared directory as HostToContainer would.
        subprocess.run([*RUN, "-d", "--name", names["trainer"], "--network", "none", "--read-only",
                        "--user", "1000:1000", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                        "-v", f"{shared}:{shared}:ro,rslave", "--entrypoint", "python3", image,
                        "-c", TRAINER, str(data)], check=True, capture_output=True, text=True, timeout=60)
        trainer = Trainer(names["trainer"])
        assert trainer.next_epoch()["hashes"] == expected
        assert answers(port, "/healthz"), "/healthz (a request through the mount) failed"
        gets_before = get_requests(port)
        assert gets_before >= len(expected)

        # kill -9, as a crashed or OOM-killed daemon: whatever the kernel must ask the daemon fails
        # (ENOTCONN); what it holds itself (pages, entries: no-open mode) it may still answer, so
        # the trainer may go on reading from its page cache or fail, but never reads wrong data.
        podman("kill", "--signal", "KILL", names["cachefs"])
        podman("wait", names["cachefs"], timeout=30)
        with pytest.raises(OSError) as dead:
            os.stat(data / "not-in-the-kernel-cache")
        assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED), dead.value
        # ... until the container restarts: the stale mount is cleaned up, a new one reaches the
        # running trainer, and the cache volume makes it warm.
        podman("start", names["cachefs"])
        wait_for("/readyz after the restart", lambda: ready(port), container=names["cachefs"])
        wait_for("the trainer reading through the new mount", lambda: fuse_reads(port) > 0,
                 container=names["trainer"])
        trainer.seen = trainer.epochs()[-1]["epoch"]
        assert trainer.next_epoch()["hashes"] == expected
        assert get_requests(port) == 0, "the restarted daemon downloaded files that were in its cache"
        assert trainer.next_epoch()["hashes"] == expected

        epochs = trainer.epochs()
        assert all(e["hashes"] == expected for e in epochs if "hashes" in e), "the trainer read wrong data"

        # SIGTERM: a clean unmount and exit.
        podman("stop", "-t", "30", names["cachefs"], timeout=60)
        state = json.loads(podman("inspect", names["cachefs"]).stdout)[0]["State"]
        assert state["ExitCode"] == 0, state
        assert str(data) not in host_mounts()
        log = logs(names["cachefs"])
        assert "unmounted" in log, log[-2000:]
    finally:
        for name in names.values():
            podman("rm", "-f", "-t", "5", name, check=False)
        if str(data) in host_mounts():
            subprocess.run(["fusermount3", "-uz", str(data)], check=False)
        subprocess.run(["umount", "-R", str(shared)], check=False)
