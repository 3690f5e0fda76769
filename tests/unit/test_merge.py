"""A relist merges page by page and writes only what changed (metadata/merge.py)."""

from __future__ import annotations

import random
from pathlib import Path

from cachefs.metadata import ROOT_INODE, MetadataStore
from cachefs.metadata.merge import Merge

Obj = tuple[str, int, str, float]


def relist(store: MetadataStore, objects: list[Obj], prefixes: list[str], started: float,
           page_size: int = 3) -> Merge:
    """Merge a root listing of ``objects`` and ``prefixes`` in the store's key order, in pages."""
    root = store.get(ROOT_INODE)
    assert root is not None
    merge = Merge(store, root, started)
    entries = sorted([(o[0], o) for o in objects] + [(p, p) for p in prefixes])
    changed: list[int] = []
    removed: list[int] = []
    for i in range(0, max(1, len(entries)), page_size):
        page = entries[i:i + page_size]
        merge.page([e for _, e in page if isinstance(e, tuple)], [e for _, e in page if isinstance(e, str)])
        changed += merge.changed
        removed += merge.removed
    for r in merge.finish():
        removed += r
    merge.changed, merge.removed = changed, removed
    return merge


def names(store: MetadataStore) -> list[str]:
    return [e.name.decode() for e in store.children(ROOT_INODE)]


def test_unchanged_relist_writes_nothing_and_changes_write_only_themselves(tmp_path: Path) -> None:
    store = MetadataStore(str(tmp_path / "m"))
    objs = [(f"f{i:04d}", i, f"e{i}", 1.0) for i in range(500)]
    dirs = [f"d{i:02d}/" for i in range(20)]
    first = relist(store, objs, dirs, started=10.0, page_size=97)
    assert first.writes == 520 and len(names(store)) == 520
    inos = {e.name: e.record.ino for e in store.children(ROOT_INODE)}

    again = relist(store, objs, dirs, started=20.0, page_size=97)
    assert again.writes == 0 and again.changed == [] and again.removed == []
    assert store.get(ROOT_INODE).listed_at == 20.0  # type: ignore[union-attr]

    objs[7] = ("f0007", 7, "new", 1.0)  # changed
    del objs[100]  # removed
    objs.append(("g", 1, "x", 1.0))  # added
    third = relist(store, objs, dirs[1:], started=30.0, page_size=97)
    assert third.writes == 4  # one change, one addition, two removals (f0100, d00)
    assert third.changed == [inos[b"f0007"]] and third.removed == [inos[b"f0100"]]
    assert "f0100" not in names(store) and "d00" not in names(store) and "g" in names(store)
    assert {e.name: e.record.ino for e in store.children(ROOT_INODE)}[b"f0007"] == inos[b"f0007"]


def test_directory_and_file_names_that_sort_differently_as_keys(tmp_path: Path) -> None:
    """'n/' lists after 'n.txt' and 'n-1' although the name 'n' sorts before them."""
    store = MetadataStore(str(tmp_path / "m"))
    objs = [("n.txt", 1, "a", 1.0), ("n-1", 1, "b", 1.0), ("n", 3, "c", 1.0), ("o", 1, "d", 1.0)]
    prefixes = ["n/", "m/", "n0/"]
    relist(store, objs, prefixes, started=1.0, page_size=2)
    assert names(store) == ["m", "n", "n-1", "n.txt", "n0", "o"]
    n = store.lookup(ROOT_INODE, b"n")
    assert n is not None and n.is_dir  # both an object and a prefix: the directory wins
    for page_size in (1, 2, 3, 50):
        merge = relist(store, objs, prefixes, started=2.0 + page_size, page_size=page_size)
        assert merge.writes == 0 and merge.removed == [], page_size
    assert names(store) == ["m", "n", "n-1", "n.txt", "n0", "o"]


def test_a_file_that_becomes_a_directory_reports_its_inode(tmp_path: Path) -> None:
    store = MetadataStore(str(tmp_path / "m"))
    relist(store, [("x", 5, "e", 1.0)], [], started=1.0)
    x = store.lookup(ROOT_INODE, b"x")
    assert x is not None and not x.is_dir
    merge = relist(store, [], ["x/"], started=2.0)
    assert merge.removed == [x.ino]  # its cached blocks must be dropped
    assert store.lookup(ROOT_INODE, b"x").is_dir  # type: ignore[union-attr]
    assert store.totals() == (0, 0)


def test_random_listings_converge_to_the_last_one(tmp_path: Path) -> None:
    store = MetadataStore(str(tmp_path / "m"))
    rng = random.Random(3)
    pool = [f"k{i}" for i in range(60)] + ["k1.x", "k1-y", "k10 z"]
    for round_ in range(30):
        objs = [(k, rng.randrange(5), f"e{rng.randrange(3)}", 1.0) for k in pool if rng.random() < 0.5]
        taken = {o[0] for o in objs}
        prefixes = [k + "/" for k in pool if k not in taken and rng.random() < 0.3]
        relist(store, objs, prefixes, started=float(round_ + 1), page_size=rng.randrange(1, 20))
        want = {o[0]: (o[1], o[2]) for o in objs} | {p[:-1]: None for p in prefixes}
        got = {e.name.decode(): (None if e.record.is_dir else (e.record.size, e.record.etag))
               for e in store.children(ROOT_INODE)}
        assert got == want, round_
        assert store.totals() == (len(objs), sum(o[1] for o in objs))
