"""The filesystem logic without FUSE: CoreFS over the local-directory backend, inside trio."""

from __future__ import annotations

import errno
import hashlib
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from cachefs import metrics, stack
from cachefs.backends import create_backend
from cachefs.cache.prefetch import Prefetcher
from cachefs.cache.store import BLOCK_SIZE, DataCache
from cachefs.fs.core import CoreFS, FsError, Settings
from cachefs.metadata import ROOT_INODE, MetadataStore
from cachefs.source import parse_source


def make_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def run_core(tmp: Path, body: Callable[[CoreFS], Awaitable[None]], *, capacity: int = 1 << 30,
             policy: str = "stable", ttl: float = 3600, read_write: bool = False) -> None:
    async def main() -> None:
        backend = create_backend(parse_source(f"file://{tmp / 'src'}"), timeout=5)
        meta = MetadataStore(str(tmp / "cache" / "meta"))
        cache = DataCache(str(tmp / "cache"), meta, capacity, policy, idle_evict=3600)
        cache.fsck()
        layers = stack.build(meta, cache, backend, Settings(metadata_ttl=ttl), read_write=read_write)
        core = layers.core
        try:
            async with trio.open_nursery() as nursery:
                layers.reader.nursery = nursery
                await nursery.start(cache.run)  # the evictor
                layers.lister.nursery = nursery
                if layers.writer is not None:
                    await nursery.start(layers.writer.run)
                await body(core)
                nursery.cancel_scope.cancel()
        finally:
            meta.close()

    trio.run(main)


async def read_all(core: CoreFS, rel: str) -> bytes:
    rec = core.meta.resolve(rel)
    if rec is None:
        parent = ROOT_INODE
        for part in rel.split("/"):
            rec = await core.lookup(parent, part.encode())
            parent = rec.ino
    assert rec is not None
    fh = core.open(rec.ino)
    try:
        out = bytearray()
        while len(out) < rec.size:
            chunk = await core.read(fh, len(out), 128 * 1024)
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        await core.release(fh)


def backend_gets() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("cachefs_backend_requests_total", {"operation": "get", "outcome": "ok"}) or 0


def test_read_small_large_and_ranges(tmp_path: Path) -> None:
    rng = random.Random(1)
    files = {"a/small": rng.randbytes(1000), "a/b/large": rng.randbytes(2 * BLOCK_SIZE + 12345), "empty": b""}
    make_tree(tmp_path / "src", files)

    async def body(core: CoreFS) -> None:
        for rel, data in files.items():
            assert await read_all(core, rel) == data
        large = core.meta.resolve("a/b/large")
        assert large is not None
        fh = core.open(large.ino)
        for _ in range(50):
            off = rng.randrange(large.size)
            size = rng.randrange(1, 300_000)
            assert await core.read(fh, off, size) == files["a/b/large"][off:off + size]
        await core.release(fh)
        with pytest.raises(FsError):
            await core.lookup(ROOT_INODE, b"missing")

    run_core(tmp_path, body)


def test_second_read_and_concurrent_readers_cause_one_get(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"x": os.urandom(50_000)})

    async def body(core: CoreFS) -> None:
        await core.lookup(ROOT_INODE, b"x")
        before = backend_gets()
        results: list[bytes] = []

        async def reader() -> None:
            results.append(await read_all(core, "x"))

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(reader)
        assert len({hashlib.sha256(r).digest() for r in results}) == 1
        assert backend_gets() - before == 1
        await read_all(core, "x")
        assert backend_gets() - before == 1

    run_core(tmp_path, body)


def test_changed_object_is_refetched_after_ttl(tmp_path: Path) -> None:
    """Past the TTL a lookup answers from LMDB at once and relists in the background
    (stale-while-revalidate): reads give the old version whole, then the new one whole."""
    make_tree(tmp_path / "src", {"d/f": b"old contents"})

    async def body(core: CoreFS) -> None:
        assert await read_all(core, "d/f") == b"old contents"
        (tmp_path / "src" / "d" / "f").write_bytes(b"brand new contents!")
        os.utime(tmp_path / "src" / "d" / "f", ns=(1, 10**18))
        await trio.sleep(0.3)  # past the TTL: the next lookup relists the directory
        seen = []
        with trio.fail_after(5):
            while not seen or seen[-1] != b"brand new contents!":
                await core.lookup(core.meta.resolve("d").ino, b"f")  # type: ignore[union-attr]
                seen.append(await read_all(core, "d/f"))
                await trio.sleep(0.05)
        assert set(seen) <= {b"old contents", b"brand new contents!"}
        assert core.meta.resolve("d/f").size == len(b"brand new contents!")  # type: ignore[union-attr]

    run_core(tmp_path, body, ttl=0.2)


def test_reader_with_pinned_etag_gets_estale_not_mixed_data(tmp_path: Path) -> None:
    data = os.urandom(2 * BLOCK_SIZE)
    make_tree(tmp_path / "src", {"big": data})

    async def body(core: CoreFS) -> None:
        rec = await core.lookup(ROOT_INODE, b"big")
        fh = core.open(rec.ino)
        assert await core.read(fh, 100, 1000) == data[100:1100]  # not sequential: no readahead
        (tmp_path / "src" / "big").write_bytes(os.urandom(2 * BLOCK_SIZE))
        os.utime(tmp_path / "src" / "big", ns=(1, 10**18))
        with pytest.raises(FsError) as info:
            await core.read(fh, BLOCK_SIZE + 10, 1000)
        assert info.value.errno == errno.ESTALE

    run_core(tmp_path, body)


def epoch_hit_ratio(policy: str, tmp_path: Path) -> list[float]:
    """Hit ratio of epochs 2-4 over a shuffled dataset 1.5x the cache size."""
    n, size = 300, 10_000
    make_tree(tmp_path / "src", {f"c{i % 10}/f{i}": os.urandom(size) for i in range(n)})
    capacity = n * size * 2 // 3
    ratios: list[float] = []

    async def body(core: CoreFS) -> None:
        await core.walk()
        rels = [r.rel for r in core.meta.iter_files(ROOT_INODE)]
        rng = random.Random(7)
        for epoch in range(4):
            rng.shuffle(rels)
            h0, m0 = metrics.cache_hits._value.get(), metrics.cache_misses._value.get()
            for rel in rels:
                await read_all(core, rel)
            h, m = metrics.cache_hits._value.get() - h0, metrics.cache_misses._value.get() - m0
            if epoch:
                ratios.append(h / (h + m))

    run_core(tmp_path, body, capacity=capacity, policy=policy)
    return ratios


def test_stable_policy_reaches_the_optimum_on_shuffled_epochs(tmp_path: Path) -> None:
    optimum = 2 / 3
    stable = epoch_hit_ratio("stable", tmp_path / "s")
    lru = epoch_hit_ratio("lru", tmp_path / "l")
    assert min(stable) >= 0.9 * optimum, stable
    assert max(lru) < 0.9 * optimum, lru  # the reason stable is the default


async def prefetch_all(core: CoreFS, concurrency: int) -> Prefetcher:
    """Run one prefetch of the whole mount to its end."""
    pre = Prefetcher(core.lister, core.reader, concurrency=concurrency)
    core.reader.nursery.start_soon(pre.run)  # type: ignore[union-attr]
    pre.submit([""])
    await trio.sleep(0)
    await pre.idle.wait()
    return pre


def test_prefetch_fills_cache_then_reads_hit(tmp_path: Path) -> None:
    files = {f"k{i % 5}/f{i}": os.urandom(5000 + i) for i in range(200)}
    make_tree(tmp_path / "src", files)

    async def body(core: CoreFS) -> None:
        pre = await prefetch_all(core, concurrency=16)
        assert pre.progress.files_done == 200 and pre.progress.files_failed == 0
        before = backend_gets()
        for rel, data in files.items():
            assert await read_all(core, rel) == data
        assert backend_gets() == before

    run_core(tmp_path, body)


def test_prefetch_stops_when_cache_full(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {f"f{i:03d}": os.urandom(10_000) for i in range(100)})

    async def body(core: CoreFS) -> None:
        pre = await prefetch_all(core, concurrency=4)
        assert pre.progress.stopped_full
        assert core.cache.used <= 500_000
        assert 40 <= pre.progress.files_done <= 50

    run_core(tmp_path, body, capacity=500_000)
