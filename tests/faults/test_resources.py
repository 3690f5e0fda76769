"""Resource limits through a real mount: a cache dir on a tiny tmpfs that fills up (data files
and the LMDB index both live there), and a soak of many readers over >= 10,000 files with the
daemon's memory measured from /proc.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.testing.servers import Server, free_port
from tests.fuse.mounts import mounted, scrape

from .helpers import (
    Background,
    Faulty,
    alive,
    daemon_log,
    fast_upload,
    http_status,
    metric_sum,
    rss_kib,
    sha,
)
from .test_crash import readers

pytestmark = pytest.mark.timeout(400)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> int:
    """Write a file until the filesystem is full; the bytes written."""
    n = 0
    with open(directory / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            n += f.write(b"\0" * 4096)
    return n


def drop_page_cache() -> None:
    """So that reads reach the daemon again (the mount keeps pages across opens)."""
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def test_cache_disk_full_reads_go_on_from_the_backend(faulty_moto: Faulty, tmp_path: Path) -> None:
    b = faulty_moto.bucket
    rng = random.Random(5)
    objects = {f"d{i % 4}/f{i:03d}.bin": rng.randbytes(512 * 1024) for i in range(40)}  # 20 MiB
    b.put_many(objects)
    port = free_port()
    args = [*b.mount_args, "--metadata-ttl", "2", "--metrics-addr", str(port)]
    with tmpfs(tmp_path / "cache", "8m") as cache:
        with mounted(b.source, tmp_path / "mnt", cache, b.mount_env, *args) as m:
            pid = int(m.status()["pid"])
            n, wrong = readers(m.path, sorted(objects), objects, 8)
            assert wrong == [] and n == len(objects)
            full = scrape(port)
            assert full["cachefs_cache_write_errors_total"] > 0
            assert "is full; serving from the backend without caching" in daemon_log(cache)
            # Now nothing at all can be written, not even a page of LMDB: listings expire (TTL 2 s),
            # cached blocks are hit (access times to flush), misses cannot be cached.
            filled = fill(cache)
            end = time.monotonic() + 12  # past one access-time flush (every 10 s)
            rounds = 0
            while time.monotonic() < end or rounds < 2:
                drop_page_cache()
                n, wrong = readers(m.path, sorted(objects), objects, 8)
                assert wrong == [] and n == len(objects), wrong
                rounds += 1
                time.sleep(1)
            assert alive(pid)
            assert http_status(port, "/healthz") == 200
            after = scrape(port)
            print(f"\ntmpfs 8 MiB: {rounds + 1} full reads of {len(objects)} files identical; filler "
                  f"{filled} bytes; cache write errors {after['cachefs_cache_write_errors_total']:.0f}, "
                  f"admission rejected {after['cachefs_cache_admission_rejected_total']:.0f}, "
                  f"EIO {metric_sum({k: v for k, v in after.items() if 'EIO' in k}, 'cachefs_fuse_errors_total'):.0f}")
            assert metric_sum({k: v for k, v in after.items() if "EIO" in k}, "cachefs_fuse_errors_total") == 0
            assert after["cachefs_cache_write_errors_total"] > full["cachefs_cache_write_errors_total"]
        # A restart on the full disk still mounts and serves everything.
        with mounted(b.source, tmp_path / "mnt", cache, b.mount_env, *args) as m:
            n, wrong = readers(m.path, sorted(objects), objects, 8)
            assert wrong == [] and n == len(objects)
        assert "Traceback" not in daemon_log(cache)


def test_index_that_cannot_grow_does_not_break_reads(tmp_path: Path) -> None:
    """The same without FUSE and made certain: LMDB's map is shrunk to what it holds, so every
    write that needs a new page fails (MapFullError, as on a full disk). Listing, caching a
    block, recording access times and evicting all hit it; reads still return the right bytes
    and nothing raises."""
    import trio

    from cachefs import metrics, stack
    from cachefs.backends import create_backend
    from cachefs.cache.store import DataCache
    from cachefs.fs.core import CoreFS, Settings
    from cachefs.metadata import ROOT_INODE, MetadataStore
    from cachefs.source import parse_source

    rng = random.Random(6)
    files = {f"{d}/f{i:03d}": rng.randbytes(rng.randrange(100, 5000)) for d in ("a", "b") for i in range(300)}
    for rel, data in files.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(data)

    def errors() -> float:
        return metrics.cache_write_errors._value.get()

    async def read(core: CoreFS, rel: str) -> bytes:
        """Look the path up (listing what expired) and read the whole file."""
        parent = ROOT_INODE
        for part in rel.split("/"):
            rec = await core.lookup(parent, part.encode())
            parent = rec.ino
        fh = core.open(rec.ino)
        try:
            return await core.read(fh, 0, rec.size + 1)
        finally:
            await core.release(fh)

    async def main() -> None:
        backend = create_backend(parse_source(f"file://{tmp_path / 'src'}"), timeout=5)
        meta = MetadataStore(str(tmp_path / "cache" / "meta"))
        cache = DataCache(str(tmp_path / "cache"), meta, 600_000, "lru", idle_evict=3600)
        cache.fsck()
        layers = stack.build(meta, cache, backend, Settings(metadata_ttl=0.5))
        core = layers.core
        try:
            async with trio.open_nursery() as nursery:
                layers.reader.nursery = nursery
                await nursery.start(cache.run)  # the evictor
                await core.walk()  # a directory never listed cannot be shown without an index
                for rel in files:
                    if rel.startswith("a/"):
                        assert await read(core, rel) == files[rel]
                before = errors()
                meta.env.set_mapsize(1)  # LMDB keeps it at the size in use: no page to grow into
                await trio.sleep(0.6)  # listings expire
                for _ in range(2):
                    for rel in sorted(files, reverse=True):  # b/ (misses, evictions), then a/ (hits)
                        assert await read(core, rel) == files[rel]
                    cache.flush_atimes()
                assert errors() > before
                nursery.cancel_scope.cancel()
        finally:
            meta.close()

    trio.run(main)


SOAK_FILES = 10_000
SOAK_READERS = 32
GETS_OK = 'cachefs_backend_requests_total{operation="get",outcome="ok"}'
SOAK_RSS_GROWTH_MIB = 24  # bound on VmRSS growth from the end of the warm-up to the end (60 s: ~2)


def soak_seconds(config: pytest.Config) -> float:
    """--soak-seconds, else $CACHEFS_SOAK_SECONDS, else 60 (the CI default)."""
    value = config.getoption("soak_seconds", None) or os.environ.get("CACHEFS_SOAK_SECONDS") or 60
    return float(value)


@pytest.mark.slow
def test_soak_many_readers_memory_stays_bounded(seaweed: Server, tmp_path: Path,
                                                 pytestconfig: pytest.Config) -> None:
    """32 readers pick random files out of 10,000 for the soak's duration, checking every byte,
    through a cache that holds a third of them (LRU: constant eviction), with listings expiring
    every 5 s and the page cache dropped every 2 s (so reads reach the daemon). The daemon's
    resident memory must not keep growing."""
    duration = soak_seconds(pytestconfig)
    name = f"soak-{uuid.uuid4().hex[:10]}"
    seaweed.create_bucket(name)
    rng = random.Random(8)
    objects = {f"d{i % 100:02d}/f{i:05d}.bin": rng.randbytes(rng.randrange(500, 3000)) for i in range(SOAK_FILES)}
    fast_upload(seaweed, name, objects)
    digests = {k: sha(v) for k, v in objects.items()}
    keys = sorted(objects)
    port = free_port()
    args = ["--endpoint-url", seaweed.endpoint_url, "--cache-size", "8M", "--cache-policy", "lru",
            "--metadata-ttl", "5", "--metrics-addr", str(port)]
    with mounted(f"s3://{name}", tmp_path / "mnt", tmp_path / "cache", dict(os.environ, **seaweed.env), *args) as m:
        pid = int(m.status()["pid"])
        stop = threading.Event()
        reads = [0] * SOAK_READERS
        wrong: list[str] = []

        def reader(i: int) -> None:
            r = random.Random(i)
            while not stop.is_set():
                key = r.choice(keys)
                with open(m.path / key, "rb") as f:
                    if sha(f.read()) != digests[key]:
                        wrong.append(key)
                reads[i] += 1

        threads = [Background(reader, i) for i in range(SOAK_READERS)]
        start = time.monotonic()
        warmup = max(5.0, duration * 0.15)
        rss: list[tuple[float, int, int]] = []
        try:
            while time.monotonic() - start < duration:
                time.sleep(2)
                drop_page_cache()
                rss.append((time.monotonic() - start, rss_kib(pid), rss_kib(pid, "RssAnon")))
                assert all(t.is_alive() for t in threads), "a reader failed"
        finally:
            stop.set()
            for t in threads:
                t.result(60)
        sample = scrape(port)
        first = next(r for r in rss if r[0] >= warmup)
        last = rss[-1]
        peak = max(r[1] for r in rss)
        growth = (last[1] - first[1]) / 1024
        print(f"\nsoak {duration:.0f} s, {SOAK_FILES} files, {SOAK_READERS} readers: {sum(reads)} reads checked; "
              f"VmRSS {first[1] / 1024:.1f} MiB at {first[0]:.0f} s -> {last[1] / 1024:.1f} MiB at end "
              f"(peak {peak / 1024:.1f}, RssAnon {first[2] / 1024:.1f} -> {last[2] / 1024:.1f} MiB); "
              f"{sample['cachefs_cache_evictions_total']:.0f} evictions, "
              f"{sample[GETS_OK]:.0f} GETs")
        assert wrong == []
        assert alive(pid)
        assert sample["cachefs_cache_evictions_total"] > 0  # the cache really cycled
        assert growth <= SOAK_RSS_GROWTH_MIB, f"VmRSS grew {growth:.1f} MiB during the soak"
