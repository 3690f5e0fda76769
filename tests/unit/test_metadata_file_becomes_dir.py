"""A file that becomes a directory (its key is now a prefix) leaves nothing cached behind: the
listing page that shows the prefix reports the file's inode, and the lister hands it to
``on_stale``, which drops its cached blocks."""

from __future__ import annotations

from pathlib import Path

import trio

from cachefs.cache.store import BlockRef, DataCache
from cachefs.metadata import ROOT_INODE, MetadataStore


def test_a_prefix_replacing_a_file_reports_the_file(tmp_path: Path) -> None:
    store = MetadataStore(str(tmp_path / "meta"))
    cache = DataCache(str(tmp_path), store, 1 << 20, "lru", 3600)
    try:
        store.ingest([("a", 3000, "e1", 0.0), ("b", 2000, "e2", 0.0)], [], seen=1.0)
        a, b = store.lookup(ROOT_INODE, b"a"), store.lookup(ROOT_INODE, b"b")
        assert a is not None and b is not None

        async def fill() -> None:
            assert await cache.store(BlockRef(a.ino, 0, "e1", 3000), b"a" * 3000)
            assert await cache.store(BlockRef(b.ino, 0, "e2", 2000), b"b" * 2000)

        trio.run(fill)
        # "a/" as a common prefix, and "b/c" as an object below "b": both files are replaced.
        result = store.ingest([("b/c", 10, "e3", 0.0)], ["a/"], seen=2.0)
        assert sorted(result.changed) == sorted([a.ino, b.ino])
        new_a, new_b = store.lookup(ROOT_INODE, b"a"), store.lookup(ROOT_INODE, b"b")
        assert new_a is not None and new_a.is_dir and new_b is not None and new_b.is_dir
        assert store.totals() == (1, 10)
        cache.drop_inodes(result.changed)  # what the lister's on_stale does with them
        assert cache.used == 0
        assert not any(p.is_file() for p in (tmp_path / "data").rglob("*"))
    finally:
        store.close()
