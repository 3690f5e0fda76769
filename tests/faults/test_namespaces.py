"""Old cache namespaces give their disk back when a daemon needs it (cache/namespaces.py)."""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from pathlib import Path

from cachefs.testing.servers import Server
from tests.fuse.mounts import mounted

from .helpers import daemon_log, faulty_bucket
from .test_resources import tmpfs

MiB = 1 << 20
DAY = 86400


def fake_namespace(cache: Path, name: str, size: int, idle_days: float, staged: bool = False) -> Path:
    ns = cache / name
    (ns / "data" / "00").mkdir(parents=True)
    (ns / "data" / "00" / "1.0.abc").write_bytes(b"\1" * size)
    (ns / "lock").write_text("1\n")
    if staged:
        (ns / "staging").mkdir()
        (ns / "staging" / "7").write_bytes(b"not uploaded")
    when = time.time() - idle_days * DAY
    os.utime(ns / "lock", (when, when))
    return ns


def test_unused_namespaces_are_reclaimed_when_space_is_needed(seaweed: Server, tmp_path: Path) -> None:
    with faulty_bucket(seaweed, f"ns-{uuid.uuid4().hex[:10]}") as fb, tmpfs(tmp_path / "cache", "64m") as cache:
        b = fb.bucket
        b.put("x", b"data")
        old = fake_namespace(cache, "s3-old-1111", 20 * MiB, idle_days=30)
        older = fake_namespace(cache, "s3-older-2222", 20 * MiB, idle_days=60)
        recent = fake_namespace(cache, "s3-recent-3333", 4 * MiB, idle_days=1)
        pending = fake_namespace(cache, "s3-pending-4444", 4 * MiB, idle_days=90, staged=True)
        busy = fake_namespace(cache, "s3-busy-5555", 4 * MiB, idle_days=90)
        fd = os.open(busy / "lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a daemon holds it
        try:
            # Needs 40 MiB: the 64 MiB disk has ~12 MiB free, so the two stale namespaces go
            # (oldest first); the recent, busy and pending ones stay.
            with mounted(b.source, tmp_path / "mnt", cache, b.mount_env, *b.mount_args,
                         "--cache-size", "40M", "--reclaim-after", "7d") as m:
                assert (m.path / "x").read_bytes() == b"data"
                deadline = time.monotonic() + 20
                while old.exists() or older.exists():
                    assert time.monotonic() < deadline, sorted(p.name for p in cache.iterdir())
                    time.sleep(0.1)
                log = daemon_log(cache)
        finally:
            os.close(fd)
        assert recent.exists() and busy.exists() and pending.exists()
        assert "reclaimed cache namespace s3-older-2222" in log and "reclaimed cache namespace s3-old-1111" in log
        assert log.index("s3-older-2222") < log.index("s3-old-1111")
        assert "s3-pending-4444 is unused but holds data not uploaded yet" in log
