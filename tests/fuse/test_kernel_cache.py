"""Warm epochs answered by the kernel (issue 9), through the real command.

Read-only mounts run in the kernel's no-open and no-opendir modes (patched pyfuse3): a file
whose pages are cached is opened, read and closed, and a directory already listed is walked,
without a single request to the daemon; what changes in the bucket still reaches readers whole.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import time
from pathlib import Path

from .mounts import Mount, mounted
from .stores import Bucket

RNG = random.Random(9)
MiB = 1024 * 1024
WATCHED = ("open", "read", "release", "flush", "opendir", "readdir", "lookup", "getattr")


def _dataset() -> dict[str, bytes]:
    data = {f"epoch/d{d}/f{i:03d}.jpg": RNG.randbytes(RNG.randint(1, 110_000))
            for d in range(4) for i in range(30)}
    data["epoch/big.bin"] = RNG.randbytes(9 * MiB + 5)  # three blocks
    return data


def _epoch(root: Path) -> dict[str, str]:
    """One pass as a training job makes it: walk the tree, stat and read every file."""
    seen = {}
    for top, _dirs, files in os.walk(root):
        for name in files:
            path = Path(top) / name
            assert path.stat().st_size >= 0
            seen[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def _until_listed(m: Mount) -> None:
    """Wait for the walk that starts at mount to finish (it may drop the kernel's listings)."""
    deadline = time.monotonic() + 30
    while not m.status()["listing"]["complete"]:
        assert time.monotonic() < deadline, "the listing at mount never finished"
        time.sleep(0.1)


def _requests(m: Mount) -> dict[str, float]:
    got = m.status()["fuse_requests"]
    return {op: got[op] for op in WATCHED}


def test_warm_epoch_asks_the_daemon_nothing(any_bucket: Bucket, tmp_path: Path) -> None:
    data = _dataset()
    any_bucket.put_many(data)
    want = {k.removeprefix("epoch/"): hashlib.sha256(v).hexdigest() for k, v in data.items()}
    with mounted(any_bucket.source, tmp_path / "mnt", tmp_path / "cache", any_bucket.mount_env,
                 *any_bucket.mount_args) as m:
        _until_listed(m)
        assert _epoch(m.path / "epoch") == want
        cold = _requests(m)
        assert cold["read"] > 0 and cold["readdir"] > 0
        assert cold["open"] == cold["release"] == 0  # no-open mode from the first open on
        for _ in range(2):
            assert _epoch(m.path / "epoch") == want
        assert _requests(m) == cold, "a warm epoch sent requests to the daemon"


def test_object_replaced_during_a_sequential_read_gives_estale_never_a_mix(s3_bucket: Bucket,
                                                                           tmp_path: Path) -> None:
    old = RNG.randbytes(64 * MiB)
    new = RNG.randbytes(64 * MiB)  # same size: only the bytes could tell a mix
    s3_bucket.put("seq/large.bin", old)
    with mounted(s3_bucket.source, tmp_path / "mnt", tmp_path / "cache", s3_bucket.mount_env,
                 *s3_bucket.mount_args) as m:
        path = m.path / "seq/large.bin"
        got = bytearray()
        with open(path, "rb", buffering=0) as f:
            got += f.read(256 * 1024)
            s3_bucket.put("seq/large.bin", new)
            try:
                while chunk := f.read(1 * MiB):
                    got += chunk
            except OSError as exc:
                assert exc.errno == errno.ESTALE, exc
            else:
                raise AssertionError("the whole old object was read after it was replaced")
        assert bytes(got) == old[:len(got)], "bytes of the new version in a read of the old"
        # The next reader gets the new version whole (the kernel's pages of the old are dropped).
        deadline = time.monotonic() + 20
        while True:
            try:
                if path.read_bytes() == new:
                    break
            except OSError as exc:
                assert exc.errno == errno.ESTALE, exc  # pages of the old version not dropped yet
            assert time.monotonic() < deadline, "the new version never became readable"
            time.sleep(0.2)


def test_directory_listings_are_cached_until_the_bucket_changes(s3_bucket: Bucket, tmp_path: Path) -> None:
    s3_bucket.put_many({f"ls/f{i}": b"x" for i in range(5)})
    with mounted(s3_bucket.source, tmp_path / "mnt", tmp_path / "cache", s3_bucket.mount_env,
                 *s3_bucket.mount_args, "--metadata-ttl", "2") as m:
        d = m.path / "ls"
        assert sorted(os.listdir(d)) == [f"f{i}" for i in range(5)]
        _until_listed(m)
        os.listdir(d)
        before = m.status()["fuse_requests"]["readdir"]
        for _ in range(20):
            assert len(os.listdir(d)) == 5
        assert m.status()["fuse_requests"]["readdir"] == before, "the kernel did not keep the listing"
        s3_bucket.put("ls/added", b"new")
        s3_bucket.delete("ls/f0")
        deadline = time.monotonic() + 30
        while sorted(os.listdir(d)) != ["added", *[f"f{i}" for i in range(1, 5)]]:
            assert time.monotonic() < deadline, f"listing still {sorted(os.listdir(d))}"
            time.sleep(0.3)
        assert (d / "added").read_bytes() == b"new"
        assert not (d / "f0").exists()
