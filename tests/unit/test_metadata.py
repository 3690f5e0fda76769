"""The LMDB store: keys become a tree, inodes are stable, listings replace what they cover."""

from __future__ import annotations

from pathlib import Path

from cachefs.metadata import ROOT_INODE, MetadataStore, split_key
from cachefs.metadata.merge import Merge


def names(store: MetadataStore, ino: int) -> list[str]:
    return [e.name.decode() for e in store.children(ino)]


def test_split_key_rules() -> None:
    assert split_key("a/b/c.jpg") == (["a", "b", "c.jpg"], False)
    assert split_key("a/b/") == (["a", "b"], True)
    for hidden in ("a//b", "./a", "a/../b", "/a", "a/" + "x" * 256, "a\0b"):
        assert split_key(hidden) is None, hidden
    assert split_key("a/" + "x" * 255) is not None


def test_tree_from_keys_and_stable_inodes(tmp_path: Path) -> None:
    store = MetadataStore(str(tmp_path / "m"))
    objs = [("train/cat/1.jpg", 10, "e1", 1.0), ("train/dog/2.jpg", 20, "e2", 2.0),
            ("top.txt", 3, "e3", 3.0), ("empty/", 0, "m", 0.0)]
    store.ingest(objs, [], seen=100.0)
    assert names(store, ROOT_INODE) == ["empty", "top.txt", "train"]
    train = store.lookup(ROOT_INODE, b"train")
    assert train is not None and train.is_dir
    cat = store.resolve("train/cat/1.jpg")
    assert cat is not None and cat.size == 10 and cat.etag == "e1"
    assert store.totals() == (3, 33)
    store.close()
    again = MetadataStore(str(tmp_path / "m"))
    assert again.resolve("train/cat/1.jpg").ino == cat.ino  # type: ignore[union-attr]


def test_directory_wins_over_object_of_same_name(tmp_path: Path) -> None:
    store = MetadataStore(str(tmp_path / "m"))
    store.ingest([("a", 1, "x", 0.0), ("a/b", 2, "y", 0.0)], [], seen=1.0)
    a = store.lookup(ROOT_INODE, b"a")
    assert a is not None and a.is_dir and names(store, a.ino) == ["b"]
    store.ingest([("c/d", 1, "x", 0.0), ("c", 2, "y", 0.0)], [], seen=1.0)
    c = store.lookup(ROOT_INODE, b"c")
    assert c is not None and c.is_dir


def test_relisting_removes_what_is_gone_and_reports_changes(tmp_path: Path) -> None:
    store = MetadataStore(str(tmp_path / "m"))
    store.ingest([("d/x", 1, "e1", 0.0), ("d/y", 1, "e1", 0.0)], [], seen=1.0)
    x = store.resolve("d/x")
    d = store.resolve("d")
    assert x is not None and d is not None
    merge = Merge(store, d, 2.0)  # a relist of d that sees x changed and no y
    merge.page([("x", 5, "e2", 0.0)], [])
    assert merge.changed == [x.ino]
    removed = [ino for batch in merge.finish() for ino in batch]
    assert len(removed) == 1
    assert names(store, d.ino) == ["x"]
    assert store.resolve("d/x").ino == x.ino  # type: ignore[union-attr]
    assert store.totals() == (1, 5)


def test_children_paging_resumes_after_name(tmp_path: Path) -> None:
    store = MetadataStore(str(tmp_path / "m"))
    store.ingest([(f"f{i:04d}", 1, "e", 0.0) for i in range(3000)], [], seen=1.0)
    seen: list[bytes] = []
    after = None
    while True:
        batch = store.children(ROOT_INODE, after, 256)
        if not batch:
            break
        seen += [e.name for e in batch]
        after = batch[-1].name
    assert len(seen) == 3000 == len(set(seen)) and seen == sorted(seen)
