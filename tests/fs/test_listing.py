"""Listing without FUSE: lookups that do not wait for whole listings, single-flight by ETag."""

from __future__ import annotations

import os
from pathlib import Path

import trio
from prometheus_client import REGISTRY

from cachefs.cache.reader import block_ref
from cachefs.fs.core import CoreFS
from cachefs.metadata import ROOT_INODE

from .test_core import make_tree, run_core


def lists() -> float:
    return REGISTRY.get_sample_value("cachefs_backend_requests_total", {"operation": "list", "outcome": "ok"}) or 0


def test_lookup_in_a_never_listed_directory_needs_one_listing_page(tmp_path: Path) -> None:
    """5,000 entries are 5 pages; the lookup answers after one (a listing that starts at the
    name) while the whole listing runs in the background."""
    make_tree(tmp_path / "src", {f"flat/f{i:05d}": b"." for i in range(5000)})

    async def body(core: CoreFS) -> None:
        await core.listed(ROOT_INODE)  # the root is listed; flat is not
        flat = core.meta.resolve("flat")
        assert flat is not None and flat.listed_at == 0
        before = lists()
        rec = await core.lookup(flat.ino, b"f04321")
        assert rec.size == 1 and lists() - before == 1
        assert await core.lookup(flat.ino, b"f00007")  # known from the background listing or a probe
        with trio.fail_after(20):
            while core.meta.resolve("flat").listed_at == 0:  # type: ignore[union-attr]
                await trio.sleep(0.05)
        assert len(core.meta.children(flat.ino)) == 5000

    run_core(tmp_path, body)


def test_readers_of_two_versions_do_not_share_a_download(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"f": b"version one"})

    async def body(core: CoreFS) -> None:
        rec = await core.lookup(ROOT_INODE, b"f")
        old = block_ref(rec.ino, rec.etag, rec.size, 0)
        new = block_ref(rec.ino, "another-etag", rec.size, 0)
        key = core.lister.key(rec)
        results: dict[str, object] = {}

        async def fetch(name: str, ref: object) -> None:
            try:
                results[name] = await core.reader.fetch(ref, key, evict=True)  # type: ignore[arg-type]
            except Exception as exc:
                results[name] = type(exc).__name__

        async with trio.open_nursery() as n:
            n.start_soon(fetch, "old", old)
            n.start_soon(fetch, "new", new)
        assert results["old"] == b"version one"
        assert results["new"] == "ObjectChanged"  # its own GET, pinned to its own ETag

    run_core(tmp_path, body)
    assert os.path.exists(tmp_path / "src" / "f")


def test_kernel_invalidations_are_coalesced_never_dropped() -> None:
    from cachefs.mount import Invalidator

    done: list[int] = []

    async def main() -> None:
        inv = Invalidator(done.append)
        async with trio.open_nursery() as n:
            n.start_soon(inv.run)
            for start in range(0, 50_000, 1000):  # far more than any channel would hold
                inv.add(list(range(start, start + 1000)))
                inv.add([1, 2, 3])  # reported again before the first batch ran: once is enough
            with trio.fail_after(30):
                while len(set(done)) < 50_000:
                    await trio.sleep(0.01)
            n.cancel_scope.cancel()

    trio.run(main)
    assert set(done) == set(range(50_000))
    assert len(done) <= 50_000 + 3 * 50
