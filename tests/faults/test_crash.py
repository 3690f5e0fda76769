"""Crashes through the real command: ``kill -9`` of the daemon in the middle of prefetches and
read-heavy runs, again and again on one cache dir; repairs of a cache dir that does not agree
with its index; SIGTERM in the middle of heavy reads.

What a user must observe: every remount succeeds on the stale mountpoint by itself, every file
reads back identical (a block cut short by the crash is never served), and what was cached
before the crash is served from the cache, not fetched again (``cachefs status`` counts GETs).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fuse.mounts import CACHEFS, cachefs, fuse_mounts, mounted, wait_daemon_gone

from .helpers import Background, Faulty, daemon_log, sha, wait_gone

pytestmark = pytest.mark.timeout(400)

GROUPS = 12  # one crash per group, 11 of them followed by a remount in the loop
SMALL_PER_GROUP = 24
SMALL = 64 * 1024
LARGE = 9 * 1024 * 1024 + 4321  # three blocks, the last one partial
BLOCK = 4 * 1024 * 1024
BLOCKS_PER_GROUP = SMALL_PER_GROUP + 3
GONE = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENOENT, errno.EINTR)


def cached_blocks(cache: Path) -> int:
    """Block files in the cache (after ``wait_checked``: the strays are gone)."""
    return sum(1 for p in cache.glob("*/data/*/*") if p.is_file())


def work_started(cache: Path, before: int, timeout: float = 30.0) -> None:
    """Wait until the group's first block is cached, so that the crash that follows lands in the
    middle of the work on a loaded machine too (not before it began)."""
    deadline = time.monotonic() + timeout
    while cached_blocks(cache) <= before and time.monotonic() < deadline:
        time.sleep(0.01)


def wait_checked(cache: Path, mounts: int, timeout: float = 60.0) -> None:
    """Wait until the check of the cache files against the index, which each mount runs in the
    background, has finished ``mounts`` times in this cache dir."""
    deadline = time.monotonic() + timeout
    while daemon_log(cache).count("cache check finished") < mounts:
        assert time.monotonic() < deadline, "the background cache check did not finish"
        time.sleep(0.05)


def make_dataset(rng: random.Random) -> dict[str, bytes]:
    objects: dict[str, bytes] = {}
    for g in range(GROUPS):
        for i in range(SMALL_PER_GROUP):
            objects[f"g{g:02d}/s{i:02d}.bin"] = rng.randbytes(SMALL)
        objects[f"g{g:02d}/large.bin"] = rng.randbytes(LARGE)
    return objects


def group(objects: dict[str, bytes], g: int) -> list[str]:
    return sorted(k for k in objects if k.startswith(f"g{g:02d}/"))


def readers(root: Path, keys: list[str], objects: dict[str, bytes], workers: int,
            stop: threading.Event | None = None) -> tuple[int, list[str]]:
    """Read keys with many threads until done (or the daemon is gone); (files checked, wrong)."""
    wrong: list[str] = []
    checked = 0
    lock = threading.Lock()

    def one(key: str) -> None:
        nonlocal checked
        if stop is not None and stop.is_set():
            return
        try:
            with open(root / key, "rb") as f:
                got = f.read()
        except OSError as exc:
            if stop is not None and exc.errno in GONE:
                stop.set()  # the daemon was killed under us: expected
                return
            raise
        with lock:
            checked += 1
            if sha(got) != sha(objects[key]):
                wrong.append(f"{key}: {len(got)} bytes")

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, keys))
    return checked, wrong


def test_kill9_during_prefetch_and_reads_then_remount(faulty_moto: Faulty, tmp_path: Path) -> None:
    b, proxy = faulty_moto.bucket, faulty_moto.proxy
    rng = random.Random(7)
    objects = make_dataset(rng)
    b.put_many(objects)
    proxy.latency = 0.02  # 40 ms per round trip: a crash lands in the middle of the work
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    args = ["mount", b.source, str(mnt), "--cache-dir", str(cache), *b.mount_args, "--prefetch-concurrency", "4"]
    env = b.mount_env
    reused: list[int] = []
    checked_total = 0
    mode = []
    try:
        for g in range(GROUPS + 1):
            cachefs(*args, env=env, check=True)  # on the stale mountpoint from the last crash
            wait_checked(cache, g + 1)
            status = json.loads(cachefs("status", "--json", str(mnt), env=env, check=True).stdout)
            pid = int(status["pid"])
            if g > 0:
                # The group the last crash interrupted: what it cached is whole and reused.
                prev = g - 1
                partial = cached_blocks(cache) - prev * BLOCKS_PER_GROUP
                assert 0 <= partial <= BLOCKS_PER_GROUP, partial
                n, wrong = readers(mnt, group(objects, prev), objects, 8)
                assert wrong == [] and n == SMALL_PER_GROUP + 1
                checked_total += n
                status = json.loads(cachefs("status", "--json", str(mnt), env=env, check=True).stdout)
                assert status["backend"]["by_operation"]["get"] == BLOCKS_PER_GROUP - partial, (prev, partial)
                assert cached_blocks(cache) == g * BLOCKS_PER_GROUP
                reused.append(partial)
            if g == GROUPS:
                break
            # Work on the next group and kill the daemon at a random moment in the middle of it.
            keys = group(objects, g)
            delay = rng.uniform(0.0, 0.5)  # after the first block of the group is cached
            if g % 2 == 0:
                mode.append("prefetch")
                client = subprocess.Popen([*CACHEFS, "prefetch", str(mnt), f"g{g:02d}", "--wait", "--no-progress"],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                work_started(cache, g * BLOCKS_PER_GROUP)
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
                client.wait(30)
            else:
                mode.append("reads")
                stop = threading.Event()
                bg = Background(readers, mnt, keys, objects, 8, stop)
                work_started(cache, g * BLOCKS_PER_GROUP)
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
                n, wrong = bg.result(60)
                assert wrong == []  # whatever was read before the crash was right
                checked_total += n
            assert wait_gone(pid, 10)
            wait_daemon_gone(cache)
        # Everything is cached now: a full read costs not a single GET more.
        n, wrong = readers(mnt, sorted(objects), objects, 8)
        assert wrong == [] and n == len(objects)
        checked_total += n
        status = json.loads(cachefs("status", "--json", str(mnt), env=env, check=True).stdout)
        assert status["backend"]["by_operation"]["get"] == BLOCKS_PER_GROUP - reused[-1]
    finally:
        if str(mnt) in fuse_mounts():
            cachefs("unmount", str(mnt), env=env)
        wait_daemon_gone(cache)
    log = daemon_log(cache)
    stale = log.count("is a stale mount")
    repairs = re.findall(r"repaired (\d+) index entries without data and (\d+) data files", log)
    print(f"\n{GROUPS} kill -9 ({', '.join(mode)}), {stale} stale mountpoints cleaned up, blocks reused "
          f"after each crash {reused} of {BLOCKS_PER_GROUP}, start-up repairs {repairs}, "
          f"{checked_total} file reads checked")
    assert stale == GROUPS
    assert str(mnt) not in fuse_mounts()
    # Data cached before a crash was reused in most rounds (a kill may land before the first block).
    assert sum(1 for r in reused if r > 0) >= GROUPS // 2, reused


def test_start_repairs_a_cache_dir_that_disagrees_with_its_index(faulty_moto: Faulty, tmp_path: Path) -> None:
    """Planted at rest: a data file without an index entry, an entry whose data file is gone, a
    data file cut short (its entry names more bytes), and a leftover temporary file. The next
    start removes them, logs the repair count, and serves every file identical."""
    b = faulty_moto.bucket
    rng = random.Random(3)
    objects = {f"r/{i}.bin": rng.randbytes(30_000 + i) for i in range(6)}
    b.put_many(objects)
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    with mounted(b.source, mnt, cache, b.mount_env, *b.mount_args) as m:
        for k, data in objects.items():
            assert (m.path / k).read_bytes() == data
    files = sorted(p for p in cache.glob("*/data/*/*") if p.is_file())
    assert len(files) == len(objects)
    gone, short, kept = files[0], files[1], files[2]
    gone.unlink()  # entry without data
    with open(short, "r+b") as f:  # entry whose data is incomplete
        f.truncate(1000)
    orphan = kept.parent / "999999.0.00000000deadbeef"
    orphan.write_bytes(b"data without an entry")  # data without entry
    tmp = kept.parent / f"{kept.name}.12345.7f00.tmp"
    tmp.write_bytes(b"half a block")  # a write the crash interrupted
    with mounted(b.source, mnt, cache, b.mount_env, *b.mount_args) as m:
        wait_checked(cache, 2)  # the check runs after the mount, in the background
        log = daemon_log(cache)
        found = re.findall(r"cache check repaired (\d+) index entries without data and (\d+) data files "
                           r"without entries", log)
        assert found == [("2", "3")], log[-2000:]  # gone + short; orphan + tmp + the short file
        assert not orphan.exists() and not tmp.exists()
        for k, data in objects.items():
            assert (m.path / k).read_bytes() == data
        assert m.gets() == 2  # only the two blocks that were lost; the rest came from the cache


def test_sigterm_during_heavy_reads_unmounts_in_bounded_time(faulty_moto: Faulty, tmp_path: Path) -> None:
    b, proxy = faulty_moto.bucket, faulty_moto.proxy
    rng = random.Random(4)
    objects = {f"t/{i:03d}.bin": rng.randbytes(300_000) for i in range(200)}
    objects["t/large.bin"] = rng.randbytes(3 * BLOCK + 5)
    b.put_many(objects)
    proxy.latency = 0.05  # 100 ms per round trip: plenty of reads in flight when the signal comes
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    with mounted(b.source, mnt, cache, b.mount_env, *b.mount_args) as m:
        pid = int(m.status()["pid"])
        stop = threading.Event()
        bg = Background(readers, mnt, sorted(objects) * 2, objects, 32, stop)
        time.sleep(1.5)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid, 15), "the daemon did not exit within 15 s of SIGTERM"
        took = time.monotonic() - t0
        n, wrong = bg.result(30)  # no reader hangs on the gone daemon
        print(f"\nSIGTERM with 32 readers busy: daemon gone after {took:.1f} s; {n} reads checked before")
        assert wrong == []
        assert str(mnt) not in fuse_mounts()  # unmounted, not left stale
        assert os.listdir(mnt) == []
        assert "received SIGTERM; unmounting" in daemon_log(cache)
        assert "Traceback" not in daemon_log(cache)
