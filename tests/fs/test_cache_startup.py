"""Start-up does not grow with the cache: a cache dir of 200,000 cached blocks is ready (index
open, ``used`` right, evictor running) at once; the check of the files against the index runs
afterwards, in bounded memory, and still repairs what a crash or a hand left wrong.

Timings are asserted only with bounds far above the expected figures, to catch a return to work
proportional to the cache before the mount (which took ~40 s here for 200,000 blocks).
"""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest
import trio

from cachefs.cache.store import USED_KEY, DataCache
from cachefs.metadata import MetadataStore
from cachefs.metadata.store import block_key, etag_hash, pack_block

from .test_cache_accounting import assert_books_agree

ENTRIES = 200_000
READY_BOUND = 5.0  # seconds; expected: milliseconds
CHECK_MEMORY_BOUND = 8 << 20  # bytes traced at the peak of the check; expected ~1 MiB (the
#                               check it replaced held ~23 MiB of names at 200,000 blocks)
ETAG_H = etag_hash("v1")


def block_file(cache_dir: Path, ino: int) -> Path:
    return cache_dir / "data" / f"{ino & 0xFF:02x}" / f"{ino}.0.{ETAG_H:016x}"


def synthesize(cache_dir: Path, n: int) -> None:
    """``n`` one-byte blocks (inodes 2..n+1), as an index written before the total was stored:
    entries written straight into LMDB, and one hard link per entry to a one-byte file per data
    directory (ext4 caps links per file; links are much faster to make than files)."""
    meta = MetadataStore(str(cache_dir / "meta"))
    with meta.env.begin(write=True) as txn:
        for ino in range(2, n + 2):
            txn.put(block_key(ino, 0), pack_block(ETAG_H, 1, 1_000_000.0 + ino), db=meta.blocks)
    meta.close()
    sources = []
    for sub in range(256):
        (cache_dir / "data" / f"{sub:02x}").mkdir(parents=True, exist_ok=True)
        src = cache_dir / f"one-{sub:02x}"
        src.write_bytes(b"x")
        sources.append(src)
    for ino in range(2, n + 2):
        os.link(sources[ino & 0xFF], block_file(cache_dir, ino))
    for src in sources:
        src.unlink()


@pytest.mark.slow
def test_large_cache_is_ready_at_once_and_checked_in_the_background(tmp_path: Path) -> None:
    cache_dir = tmp_path / "ns"
    synthesize(cache_dir, ENTRIES)

    # An index from before the total was stored is summed once, without reading a file.
    meta = MetadataStore(str(cache_dir / "meta"))
    t0 = time.perf_counter()
    cache = DataCache(str(cache_dir), meta, 1 << 40, "stable", 3600)
    first_open = time.perf_counter() - t0
    assert cache.used == ENTRIES
    meta.close()

    # Planted at rest: an entry whose file is gone, a file cut short, a file without an entry
    # and a temporary file left by a crash.
    block_file(cache_dir, 2).unlink()
    block_file(cache_dir, 3).unlink()
    block_file(cache_dir, 3).write_bytes(b"")
    orphan = block_file(cache_dir, 999_999)
    orphan.write_bytes(b"data without an entry")
    tmp = block_file(cache_dir, 4).with_name(block_file(cache_dir, 4).name + ".12345.7f00.tmp")
    tmp.write_bytes(b"half a block")

    figures: dict[str, float] = {}

    async def main() -> None:
        t0 = time.perf_counter()
        meta = MetadataStore(str(cache_dir / "meta"))
        cache = DataCache(str(cache_dir), meta, 1 << 40, "stable", 3600)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(cache.run)
                figures["ready"] = time.perf_counter() - t0
                assert cache.used == ENTRIES  # right before any file was looked at
                tracemalloc.start()
                t1 = time.perf_counter()
                try:
                    assert await cache.check() == (2, 3, ENTRIES - 2)
                    figures["peak"] = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                figures["check"] = time.perf_counter() - t1
                nursery.cancel_scope.cancel()
            assert not orphan.exists() and not tmp.exists() and not block_file(cache_dir, 3).exists()
            assert cache.used == ENTRIES - 2
            with meta.env.begin() as txn:
                assert int.from_bytes(txn.get(USED_KEY, db=meta.meta) or b"", "big") == ENTRIES - 2
        finally:
            meta.close()

    trio.run(main)
    print(f"\n{ENTRIES} cached blocks: first open (summing an old index) {first_open:.2f} s; ready in "
          f"{figures['ready'] * 1000:.1f} ms; background check {figures['check']:.1f} s, traced "
          f"memory peak {figures['peak'] / 2**20:.2f} MiB")
    assert figures["ready"] < READY_BOUND
    assert figures["peak"] < CHECK_MEMORY_BOUND


def test_check_spares_files_being_written_and_drops_only_what_is_wrong(tmp_path: Path) -> None:
    """The check runs while the mount serves: a download's temporary file and a block put in
    place but not yet recorded are not strays; a block whose file vanished is dropped and its
    bytes leave ``used``."""
    from cachefs.cache.store import BlockRef

    meta = MetadataStore(str(tmp_path / "meta"))
    cache = DataCache(str(tmp_path), meta, 1 << 20, "lru", 3600)

    async def main() -> None:
        kept, lost = BlockRef(2, 0, "v", 100), BlockRef(3, 0, "v", 200)
        assert await cache.store(kept, b"k" * 100)
        assert await cache.store(lost, b"l" * 200)
        os.unlink(cache.path(3, 0, "v"))
        ours = Path(cache._tmp_name(cache.path(4, 0, "v")))
        ours.parent.mkdir(parents=True, exist_ok=True)
        ours.write_bytes(b"being written")
        pending = BlockRef(5, 0, "v", 50)
        assert await cache.reserve(50)
        assert await trio.to_thread.run_sync(cache.write_file, pending, b"p" * 50) is None
        assert await cache.check() == (1, 0, 100)
        assert ours.exists() and os.path.exists(cache.path(5, 0, "v"))
        assert cache.commit(pending, None)
        ours.unlink()

    try:
        trio.run(main)
        assert assert_books_agree(cache) == 150
    finally:
        meta.close()
