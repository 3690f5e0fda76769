"""Several daemons on one cache dir, as sidecars of consecutive and concurrent pods on one node
share a node-local cache volume (k8s/sidecar): the next daemon starts warm in the namespace the
last one left, and a daemon that finds the namespace in use mounts with a private sibling
(cachefs/cache/namespaces.py) instead of failing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cachefs.testing.servers import Server

from .mounts import Mount, cachefs, fuse_mounts, mounted, wait_daemon_gone
from .stores import Bucket

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dataset(moto: Server) -> tuple[Bucket, dict[str, str]]:
    """A bucket of small files and a few larger ones; their SHA-256 by key."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    bucket = Bucket("s3", name, moto.endpoint_url, moto.env, moto.s3_client())
    objects = {f"train/{i // 10:02d}/{i:04d}.bin": os.urandom(200 + 997 * i) for i in range(40)}
    objects |= {f"big/{i}.bin": os.urandom((3 << 20) + i) for i in range(2)}
    bucket.put_many(objects)
    return bucket, {key: hashlib.sha256(data).hexdigest() for key, data in objects.items()}


def read_all(mnt: Path, hashes: dict[str, str]) -> None:
    """Read every file through the mount (found by walking it) and check its hash."""
    seen = {str(p.relative_to(mnt)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in mnt.rglob("*") if p.is_file()}
    assert seen == hashes


@contextlib.contextmanager
def mounted_together(bucket: Bucket, mnts: list[Path], cache: Path) -> Iterator[list[Mount]]:
    """Daemons on one cache dir, mounted one after the other and all running at once."""
    mounts: list[Mount] = []
    try:
        for mnt in mnts:
            mnt.mkdir()
            args = ["mount", bucket.source, str(mnt), "--cache-dir", str(cache), *bucket.mount_args]
            cachefs(*args, env=bucket.mount_env, check=True)
            mounts.append(Mount(mnt, cache, bucket.mount_env, args))
        yield mounts
    finally:
        for m in mounts:
            with contextlib.suppress(Exception):
                m.unmount()
        wait_daemon_gone(cache)
        assert not {str(m) for m in mnts} & set(fuse_mounts())


def cache_ns(m: Mount) -> str:
    return os.path.basename(m.status()["cache"]["dir"])


def test_consecutive_daemons_start_warm(dataset: tuple[Bucket, dict[str, str]], tmp_path: Path) -> None:
    bucket, hashes = dataset
    cache = tmp_path / "node-cache"
    with mounted(bucket.source, tmp_path / "job1", cache, bucket.mount_env, *bucket.mount_args) as first:
        read_all(first.path, hashes)
        assert first.gets() >= len(hashes)
        lists = first.status()["backend"]["by_operation"]["list"]
        assert lists >= 1 + len({key.rpartition("/")[0] for key in hashes})  # the check, each directory
        ns = cache_ns(first)
    # The next Job on the node: another daemon, another mountpoint, the same cache dir.
    with mounted(bucket.source, tmp_path / "job2", cache, bucket.mount_env, *bucket.mount_args) as second:
        assert cache_ns(second) == ns
        read_all(second.path, hashes)
        assert second.gets() == 0, "the second daemon downloaded files the first had cached"
        status = second.status()
        assert status["reads"]["bytes_from_backend"] == 0
        # Only the start-up check of the bucket: the listing is in the cache too.
        assert status["backend"]["by_operation"]["list"] == 1, "the listing was not reused"


def test_concurrent_daemons_each_mount_and_read_everything(
        dataset: tuple[Bucket, dict[str, str]], tmp_path: Path) -> None:
    bucket, hashes = dataset
    cache = tmp_path / "node-cache"
    with mounted_together(bucket, [tmp_path / "a", tmp_path / "b"], cache) as (a, b):
        ns_a, ns_b = cache_ns(a), cache_ns(b)
        assert ns_b == ns_a + ".2", (ns_a, ns_b)
        with ThreadPoolExecutor(4) as pool:  # both trainers read everything at the same time
            for job in [pool.submit(read_all, m.path, hashes) for m in (a, b, a, b)]:
                job.result()
        assert a.gets() >= len(hashes) and b.gets() >= len(hashes)
    # Both namespaces stay: the next pair of concurrent daemons starts warm in both.
    with mounted_together(bucket, [tmp_path / "c", tmp_path / "d"], cache) as (c, d):
        assert {cache_ns(c), cache_ns(d)} == {ns_a, ns_b}
        read_all(c.path, hashes)
        read_all(d.path, hashes)
        assert c.gets() == 0 and d.gets() == 0
