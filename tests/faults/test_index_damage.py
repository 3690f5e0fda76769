"""A damaged LMDB index (a power loss under sync=False, a bad disk): found, rebuilt, said so,
and nothing written and not yet uploaded is lost."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from pathlib import Path

from cachefs.testing.servers import Server
from tests.fuse.mounts import fuse_mounts, mounted, wait_daemon_gone

from .helpers import daemon_log, faulty_bucket


def damage(cache: Path) -> None:
    """Overwrite every other page of the index after its two meta pages with noise."""
    (data,) = cache.glob("*/meta/data.mdb")
    rng = random.Random(1)
    size = data.stat().st_size
    with open(data, "r+b") as f:
        for off in range(3 * 4096, size, 2 * 4096):
            f.seek(off)
            f.write(rng.randbytes(4096))


def test_damaged_index_is_rebuilt_and_staged_data_still_uploaded(seaweed: Server, tmp_path: Path) -> None:
    with faulty_bucket(seaweed, f"dmg-{os.getpid()}-{int(time.time())}") as fb:
        b = fb.bucket
        objects = {f"d{i % 7}/f{i:04d}": random.Random(i).randbytes(200) for i in range(1500)}
        b.put_many(objects)
        cache, mnt = tmp_path / "cache", tmp_path / "mnt"
        args = [*b.mount_args, "--read-write"]
        with mounted(b.source, mnt, cache, b.mount_env, *args) as m:
            for rel in list(objects)[:50]:
                assert (m.path / rel).read_bytes() == objects[rel]
            pid = int(m.status()["pid"])
            # A file still being written when the daemon dies: its data is only staged.
            fd = os.open(m.path / "d0" / "unsaved.bin", os.O_WRONLY | os.O_CREAT)
            os.write(fd, b"precious " * 1000)
            os.kill(pid, signal.SIGKILL)
            wait_daemon_gone(cache)
            with contextlib.suppress(OSError):
                os.close(fd)  # on a dead mount
            damage(cache)
            # The next mount finds the damage, rebuilds, and uploads the staged file.
        with mounted(b.source, mnt, cache, b.mount_env, *args) as m:
            log = daemon_log(cache)
            assert "rebuilding the namespace" in log, log[-2000:]
            for rel in list(objects)[::37]:
                assert (m.path / rel).read_bytes() == objects[rel]
            deadline = time.monotonic() + 30
            while True:
                keys = fb.server.list_keys(b.name, "d0/")
                if "d0/unsaved.bin" in keys and not m.status()["writes"]["pending"]:
                    break
                assert time.monotonic() < deadline, "the staged file was not uploaded"
                time.sleep(0.2)
            assert fb.server.get(b.name, "d0/unsaved.bin") == b"precious " * 1000
            assert "found after the cache index was rebuilt" in daemon_log(cache)
            assert m.status()["metadata_damaged"] is None
        assert str(mnt) not in fuse_mounts()
