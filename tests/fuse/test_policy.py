"""The cache policy through a real mount: shuffled epochs over a dataset 1.5x the cache.

The kernel's page cache would answer warm reads without asking the daemon, so each file's pages
are dropped after reading (POSIX_FADV_DONTNEED): every epoch's reads reach cachefs, as they would
for a dataset larger than the node's RAM.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from .mounts import mounted
from .stores import Bucket

pytestmark = pytest.mark.timeout(300)

FILES, SIZE = 240, 8_000


def read_dropping_pages(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, SIZE * 2)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return data
    finally:
        os.close(fd)


def epochs(bucket: Bucket, tmp: Path, policy: str, data: dict[str, bytes]) -> list[float]:
    capacity = FILES * SIZE * 2 // 3
    ratios = []
    with mounted(bucket.source, tmp / policy / "mnt", tmp / policy / "cache", bucket.mount_env,
                 *bucket.mount_args, "--cache-size", str(capacity), "--cache-policy", policy) as m:
        keys = sorted(data)
        rng = random.Random(3)
        for epoch in range(4):
            rng.shuffle(keys)
            before = m.status()["reads"]
            for key in keys:
                assert read_dropping_pages(m.path / key) == data[key]
            after = m.status()["reads"]
            hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
            assert hits + misses == FILES
            if epoch:
                ratios.append(hits / FILES)
    return ratios


def test_stable_keeps_the_optimum_where_lru_thrashes(s3_bucket: Bucket, tmp_path: Path) -> None:
    data = {f"p/c{i % 8}/f{i:04d}": os.urandom(SIZE) for i in range(FILES)}
    s3_bucket.put_many(data)
    optimum = 2 / 3  # cache / dataset
    stable = epochs(s3_bucket, tmp_path, "stable", data)
    lru = epochs(s3_bucket, tmp_path, "lru", data)
    assert min(stable) >= 0.9 * optimum, stable
    assert max(lru) < 0.9 * optimum, lru
