"""Resource limits through a real mount: a cache dir on a tiny tmpfs that fills up (data files
and the LMDB index both live there), and a soak of many readers over >= 10,000 files with the
daemon's memory measured from /proc.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.testing.servers import free_port
from tests.fuse.mounts import mounted

from .helpers import Faulty, alive, daemon_log, http_status, metric_sum, scrape
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

    from cachefs import metrics
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
            core.release(fh)

    async def main() -> None:
        backend = create_backend(parse_source(f"file://{tmp_path / 'src'}"), timeout=5)
        meta = MetadataStore(str(tmp_path / "cache" / "meta"))
        cache = DataCache(str(tmp_path / "cache"), meta, 600_000, "lru", idle_evict=3600)
        cache.fsck()
        core = CoreFS(meta, cache, backend, Settings(metadata_ttl=0.5))
        try:
            async with trio.open_nursery() as nursery:
                core.nursery = nursery
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
