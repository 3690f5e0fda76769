"""The data cache's books against the disk: DataCache and BlockReader over the local-directory
backend, inside trio, without FUSE.

What must hold after any mix of concurrent reads, evictions, drops, re-commits, adopted uploads,
retags and abandoned downloads: the bytes named by the index == ``cache.used`` == the bytes of
the data files on disk, every file has an entry and every entry a file of its size, and the total
stored in LMDB is the same number (a restart starts from it).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from cachefs import metrics
from cachefs.backends.local import LocalBackend
from cachefs.cache.reader import BlockReader
from cachefs.cache.store import TMP_SUFFIX, USED_KEY, BlockRef, DataCache
from cachefs.errors import BackendError, ObjectChanged
from cachefs.metadata import MetadataStore
from cachefs.metadata.store import unpack_block, unpack_block_key
from cachefs.source import parse_source

T = TypeVar("T")


class HangingLocal(LocalBackend):
    """The local directory, where a share of the GETs hang past the retry deadline: the attempt
    is abandoned (``abandon_on_cancel``) and its thread goes on to write the cache file after
    the reservation was given back. Counts GET threads still running."""

    def __init__(self, root: Path, *, hang_share: float, hang: float, timeout: float) -> None:
        super().__init__(parse_source(f"file://{root}"), timeout=timeout, max_connections=64)
        self.hang_share, self.hang = hang_share, hang
        self.running = 0
        self.hung = 0  # GETs that hung and then finished (their writes came after the deadline)
        self._mu = threading.Lock()
        self._rng = random.Random(11)

    async def get_range_then(self, key: str, start: int, length: int, etag: str | None,
                             then: Callable[[bytes], T]) -> tuple[bytes, T]:
        def call() -> tuple[bytes, T]:
            with self._mu:
                self.running += 1
                hang = self._rng.random() < self.hang_share
            try:
                if hang:
                    time.sleep(self.hang)
                data = self._checked_get(key, start, length, etag)
                result = data, then(data)
                if hang:
                    with self._mu:
                        self.hung += 1
                return result
            finally:
                with self._mu:
                    self.running -= 1

        return await self._call("get", call)

    async def idle(self) -> None:
        """Wait until no GET thread runs (abandoned ones included)."""
        while self.running:
            await trio.sleep(0.02)


def books(cache: DataCache) -> tuple[dict[str, int], dict[str, int], list[str], int]:
    """(index: file name -> size, disk: file name -> size, temporary files, stored total)."""
    index: dict[str, int] = {}
    with cache.meta.env.begin() as txn:
        for key, val in txn.cursor(db=cache.meta.blocks):
            ino, block = unpack_block_key(bytes(key))
            etag_h, size, _ = unpack_block(bytes(val))
            index[f"{ino & 0xFF:02x}/{ino}.{block}.{etag_h:016x}"] = size
        raw = txn.get(USED_KEY, db=cache.meta.meta)
        stored = int.from_bytes(bytes(raw), "big") if raw is not None else -1
    disk: dict[str, int] = {}
    tmp: list[str] = []
    data = Path(cache.root) / "data"
    for sub in data.iterdir():
        for f in sub.iterdir():
            name = f"{sub.name}/{f.name}"
            if f.name.endswith(TMP_SUFFIX):
                tmp.append(name)
            else:
                disk[name] = f.stat().st_size
    return index, disk, tmp, stored


def assert_books_agree(cache: DataCache) -> int:
    index, disk, tmp, stored = books(cache)
    assert tmp == []
    assert sorted(set(disk) - set(index)) == [], "files without an entry"
    assert sorted(set(index) - set(disk)) == [], "entries without a file"
    assert {n: s for n, s in index.items() if disk[n] != s} == {}, "files of the wrong size"
    total = sum(index.values())
    assert total == sum(disk.values()) == cache.used == stored
    return total


def evictions() -> float:
    return float(metrics.cache_evictions._value.get())


def open_cache(tmp: Path, capacity: int, policy: str = "lru") -> DataCache:
    meta = MetadataStore(str(tmp / "cache" / "meta"))
    return DataCache(str(tmp / "cache"), meta, capacity, policy, idle_evict=3600)


CHURN_FILES = 40
CHURN_ROUNDS = 8
CHURN_READERS = 24


def test_books_agree_with_the_disk_after_a_churn(tmp_path: Path) -> None:
    """24 readers, a writer of new versions (some only retagged), a dropper, an uploader whose
    files the cache adopts, staged bytes charged and given back, the evictor at work (the cache
    holds a third of the data), GETs abandoned at their deadline, and every download in flight
    cancelled at the end of each of 8 rounds. Every read returns exactly one version's bytes."""
    rng = random.Random(1)
    src = tmp_path / "src"
    src.mkdir()
    keys = [f"f{i:02d}" for i in range(CHURN_FILES)]
    versions: dict[tuple[str, str], bytes] = {}
    current: dict[str, tuple[str, int]] = {}
    for key in keys:
        (src / key).write_bytes(rng.randbytes(rng.randrange(2_000, 30_000)))
    inos = {key: i + 2 for i, key in enumerate(keys)}
    backend = HangingLocal(src, hang_share=0.05, hang=0.25, timeout=0.1)
    cache = open_cache(tmp_path, capacity=sum(os.path.getsize(src / k) for k in keys) // 3)
    reader = BlockReader(cache, backend)
    counts = {"ok": 0, "failed": 0, "changed": 0, "adopted": 0}
    stamp = [10**18]

    def remember(key: str) -> None:
        st = os.stat(src / key)
        etag = f"{st.st_mtime_ns:x}-{st.st_size:x}"
        versions[(key, etag)] = (src / key).read_bytes()
        current[key] = (etag, st.st_size)

    def new_version(key: str, data: bytes) -> None:
        """Replace atomically, with an mtime no other version has (the local ETag is mtime+size)."""
        tmp = src / f".{key}.new"
        tmp.write_bytes(data)
        stamp[0] += 1_000_000
        os.utime(tmp, ns=(stamp[0], stamp[0]))
        os.rename(tmp, src / key)
        remember(key)

    for key in keys:
        remember(key)

    async def read_loop(seed: int) -> None:
        r = random.Random(seed)
        while True:
            key = r.choice(keys)
            etag, size = current[key]
            ref = BlockRef(inos[key], 0, etag, size)
            try:
                data = await reader.read(ref, key, 0, size, count=False)
            except BackendError as exc:
                counts["changed" if isinstance(exc, ObjectChanged) else "failed"] += 1
            else:
                assert data == versions[(key, etag)], key
                counts["ok"] += 1
            await trio.sleep(0)

    async def writer_loop() -> None:
        while True:
            await trio.sleep(rng.uniform(0.005, 0.03))
            key = rng.choice(keys)
            old, _ = current[key]
            if rng.random() < 0.3:  # a server-side copy: same bytes, a new ETag
                data = versions[(key, old)]
                new_version(key, data)
                cache.retag(inos[key], old, current[key][0])
            else:
                new_version(key, rng.randbytes(rng.randrange(2_000, 30_000)))

    async def dropper_loop() -> None:
        while True:
            await trio.sleep(rng.uniform(0.005, 0.03))
            key = rng.choice(keys)
            keep = {inos[key]: current[key][0]} if rng.random() < 0.5 else None
            cache.drop_inodes([inos[key]], keep)
            reader.forget(inos[key])

    async def uploader_loop() -> None:
        """What ``Writer._close`` does after an upload: reserve, adopt the staging file."""
        n = 0
        while True:
            await trio.sleep(rng.uniform(0.01, 0.05))
            key = rng.choice(keys)
            etag, size = current[key]
            staging = tmp_path / f"staging-{n}"
            n += 1
            staging.write_bytes(versions[(key, etag)])
            fd = os.open(staging, os.O_RDONLY)
            try:
                if await cache.reserve(size, urgent=True):
                    ok = False
                    try:
                        ok = await trio.to_thread.run_sync(cache.adopt, inos[key], etag, fd, size)
                    finally:
                        if not ok:
                            cache.unreserve(size)
                    counts["adopted"] += ok
            finally:
                os.close(fd)
                staging.unlink()

    async def stager_loop() -> None:
        """Data written through the mount and staged: charged, and given back at the end."""
        while True:
            amount = rng.randrange(1, 20_000)
            cache.charge(amount)
            try:
                await trio.sleep(rng.uniform(0.01, 0.05))
            finally:
                cache.unreserve(amount)

    async def flusher_loop() -> None:
        while True:
            await trio.sleep(0.02)
            cache.flush_atimes()

    before = evictions()

    async def main() -> None:
        async with trio.open_nursery() as top:
            await top.start(cache.run)
            for _ in range(CHURN_ROUNDS):
                async with trio.open_nursery() as nursery:
                    reader.nursery = nursery
                    for i in range(CHURN_READERS):
                        nursery.start_soon(read_loop, rng.randrange(1 << 30) + i)
                    for loop in (writer_loop, dropper_loop, uploader_loop, stager_loop, flusher_loop):
                        nursery.start_soon(loop)
                    await trio.sleep(rng.uniform(0.2, 0.5))
                    nursery.cancel_scope.cancel()  # downloads in flight are abandoned
            async with trio.open_nursery() as nursery:  # a quiet pass, so the books hold something
                reader.nursery = nursery
                for key in keys:
                    etag, size = current[key]
                    with contextlib.suppress(BackendError):
                        await reader.read(BlockRef(inos[key], 0, etag, size), key, 0, size, count=False)
            await backend.idle()  # the abandoned GET threads have finished (and tried to write)
            top.cancel_scope.cancel()

    try:
        trio.run(main)
        total = assert_books_agree(cache)
        print(f"\nchurn: {counts}, {evictions() - before:.0f} evictions, {backend.hung} GETs abandoned "
              f"and finished later, {total} bytes cached of capacity {cache.capacity}")
        assert counts["ok"] > 200 and counts["adopted"] > 0 and total > 0
        assert evictions() > before
        assert backend.hung > 0
        assert cache.used <= cache.capacity
        assert cache.fsck() == (0, 0, total)  # nothing to repair
    finally:
        cache.meta.close()
    # A restart takes the stored total without reading the index.
    again = open_cache(tmp_path, capacity=cache.capacity)
    try:
        assert again.used == total
        assert_books_agree(again)
    finally:
        again.meta.close()


def test_abandoned_download_writes_no_file(tmp_path: Path) -> None:
    """A GET that answers after its deadline (the read has failed, the reservation was given
    back) must not leave a cache file behind that nothing accounts for."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "k").write_bytes(b"x" * 5000)
    backend = HangingLocal(tmp_path / "src", hang_share=1.0, hang=0.3, timeout=0.05)
    cache = open_cache(tmp_path, capacity=1 << 20)
    reader = BlockReader(cache, backend)
    st = os.stat(tmp_path / "src" / "k")
    ref = BlockRef(2, 0, f"{st.st_mtime_ns:x}-{st.st_size:x}", 5000)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            reader.nursery = nursery
            with pytest.raises(BackendError):
                await reader.read(ref, "k", 0, 5000, count=False)
            assert cache.used == 0
            await backend.idle()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        assert backend.hung == 1  # the GET did finish, and wrote its data to the cache
        assert assert_books_agree(cache) == 0
        assert not cache.contains(ref)
    finally:
        cache.meta.close()


def test_eviction_spares_a_victim_committed_again_since_it_was_chosen(tmp_path: Path) -> None:
    """The evictor chooses victims from one read transaction and deletes them in a later write
    transaction. A victim dropped and cached again in between (same version, a new access time)
    is no longer the entry chosen: it stays, and its bytes are not subtracted."""
    cache = open_cache(tmp_path, capacity=1 << 20)
    refs = [BlockRef(ino, 0, "v1", 1000 * ino) for ino in (2, 3, 4)]

    async def main() -> None:
        for ref in refs:
            assert await cache.store(ref, b"a" * ref.size)
        chunk, _ = cache._scan(b"", 100)
        chosen_at = time.time()
        victims = cache._choose(chunk, amount=1 << 30, share=1.0, cutoff=None)
        assert len(victims) == 3
        cache.drop_inodes([refs[0].ino])
        assert await cache.store(refs[0], b"b" * refs[0].size)  # cached again meanwhile
        cache.lookup(refs[1])  # read meanwhile: its access time is not flushed yet
        freed, deleted = await trio.to_thread.run_sync(cache._delete_victims, victims, chosen_at)
        assert (freed, deleted) == (refs[2].size, 1)

    try:
        trio.run(main)
        assert cache.contains(refs[0]) and cache.contains(refs[1]) and not cache.contains(refs[2])
        assert assert_books_agree(cache) == refs[0].size + refs[1].size
    finally:
        cache.meta.close()


def test_full_cache_without_evictor_serves_uncached_and_evictor_makes_room(tmp_path: Path) -> None:
    """Reads never evict themselves: with no evictor running, a full cache admits nothing; with
    it, a read that finds no room is admitted once the evictor has made some, and the cache
    settles between the watermarks."""
    cache = open_cache(tmp_path, capacity=100_000)

    async def main() -> None:
        for ino in range(2, 12):
            assert await cache.store(BlockRef(ino, 0, "v", 10_000), b"z" * 10_000)
        assert cache.used == 100_000
        assert not await cache.reserve(10_000)  # no evictor: not admitted, nothing evicted
        assert cache.used == 100_000
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            assert await cache.store(BlockRef(20, 0, "v", 10_000), b"y" * 10_000)
            assert cache.contains(BlockRef(20, 0, "v", 10_000))  # the newest stays (LRU)
            assert not cache.contains(BlockRef(2, 0, "v", 10_000))  # the oldest went
            assert cache.used <= 100_000
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        assert assert_books_agree(cache) == cache.used
    finally:
        cache.meta.close()


def test_stable_cache_with_nothing_idle_rejects_without_walking_again(tmp_path: Path) -> None:
    """``stable`` keeps its subset: with nothing idle, a miss is served uncached, and the next
    ones do not wait for another walk of the index (``IDLE_RESCAN``)."""
    cache = open_cache(tmp_path, capacity=50_000, policy="stable")

    async def main() -> None:
        for ino in range(2, 7):
            assert await cache.store(BlockRef(ino, 0, "v", 10_000), b"z" * 10_000)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            assert not await cache.reserve(10_000)  # the evictor found nothing idle
            rounds = cache._rounds_done
            for _ in range(20):
                assert not await cache.reserve(10_000)
            assert cache._rounds_done == rounds  # no walk per miss
            assert await cache.reserve(10_000, urgent=True)  # written data evicts (LRU)
            cache.unreserve(10_000)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        assert assert_books_agree(cache) == cache.used
    finally:
        cache.meta.close()
