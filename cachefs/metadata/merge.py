"""Merge a directory listing into LMDB, writing only what changed.

A relist of a directory compares each page of the store's listing with the directory's entries
in LMDB, in the store's order, and writes only what differs: new entries, changed files
(size, ETag, mtime), removed entries. An unchanged entry costs a read, never a write, so a relist
of ten million unchanged objects writes next to nothing (the old way stamped every record with
the listing's time, rewriting the whole listing each TTL).

Order: S3 and Azure list in key order (UTF-8 bytes), where a subdirectory ``n`` is the prefix
``n/``. LMDB keeps a directory's entries in name order, where the subdirectory ``n`` comes before
``n.txt`` although ``n/`` comes after it ('.' < '/'). The merge reads LMDB in name order and
holds entries in a small heap keyed by their listing key until the listing has passed them, so
both sides are walked in listing order. The heap holds only subdirectories whose name is a
prefix of names being read (a handful), never the directory.

Invariants (with those of ``store``):
- An entry of LMDB that the listing passed without seeing is removed, unless it was created or
  seen after the listing started (``seen >= started``: a probe, a local create) or holds data
  written here and not uploaded (``store._holds_local``).
- Each slice of a page (``apply``) is one write transaction; the end of a listing (entries after the last key) is
  removed in bounded transactions, so no step holds the event loop for long.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

import lmdb

from .names import encode_name, split_key
from .store import _U64, Kind, MetadataStore, Record, time_ns

#: (listing key, name, (size, etag, mtime) for an object or None for a prefix)
Entry = tuple[bytes, str, "tuple[int, str, float] | None"]

READ_AHEAD = 256  # LMDB entries read per cursor positioning
END_BATCH = 1000  # entries removed per transaction at the end of a listing (a few ms)


@dataclass
class Merge:
    """The state of one directory's relist between pages."""

    meta: MetadataStore
    dir: Record
    started: float
    after: bytes | None = None  # last name read from LMDB (name order)
    exhausted: bool = False  # every LMDB entry has been read
    heap: list[tuple[bytes, bytes, int]] = field(default_factory=list)  # (listing key, name, ino)
    changed: list[int] = field(default_factory=list)  # files whose data changed (this page)
    removed: list[int] = field(default_factory=list)  # files removed (this page)
    skipped: int = 0  # keys that cannot be file names
    entries_changed: bool = False  # an entry was added or removed (not just a file changed)
    writes: int = 0  # records written, for tests and the benchmark
    #: objects whose name is an LMDB directory that this listing has not reached yet ("n" lists
    #: before "n/"): created if that directory turns out to be gone, dropped if it is listed
    deferred: dict[bytes, tuple[str, tuple[int, str, float]]] = field(default_factory=dict)

    # -- reading LMDB in listing order -------------------------------------------------------

    def _fill(self, txn: lmdb.Transaction, upto: bytes | None) -> None:
        """Read LMDB entries until every entry whose listing key is <= ``upto`` is in the heap
        (``None``: read the next ``READ_AHEAD`` entries, whatever their names)."""
        meta = self.meta
        prefix = _U64.pack(self.dir.ino)
        first = True
        while not self.exhausted and (first if upto is None else self.after is None or self.after <= upto):
            first = False
            cur = txn.cursor(db=meta.dirents)
            if not cur.set_range(prefix + (self.after or b"")):
                self.exhausted = True
                return
            read = 0
            for raw_key, child in cur:
                key = bytes(raw_key)
                if not key.startswith(prefix):
                    self.exhausted = True
                    return
                name = key[8:]
                if self.after is not None and name <= self.after:
                    continue
                rec = meta._child(txn, bytes(child))
                heapq.heappush(self.heap, (name + b"/" if rec.is_dir else name, name, rec.ino))
                self.after = name
                read += 1
                if (upto is not None and name > upto) or read >= READ_AHEAD:
                    break
            else:
                self.exhausted = True

    def _passed(self, txn: lmdb.Transaction, key: bytes) -> tuple[bytes, int] | None:
        """Remove the entries the listing passed without seeing (keys < ``key``); return the
        entry whose listing key is ``key``, if LMDB has one, as (name, inode)."""
        self._fill(txn, key)
        while self.heap and self.heap[0][0] < key:
            _, name, ino = heapq.heappop(self.heap)
            self._unseen(txn, name, ino)
        if self.heap and self.heap[0][0] == key:
            _, name, ino = heapq.heappop(self.heap)
            if self.deferred.pop(name, None) is not None:
                self.skipped += 1  # both an object and a prefix: the directory wins
            return name, ino
        return None

    def _unseen(self, txn: lmdb.Transaction, name: bytes, ino: int) -> None:
        deferred = self.deferred.pop(name, None)
        raw = txn.get(_U64.pack(ino), db=self.meta.inodes)
        if raw is None:
            return
        rec = Record.unpack(ino, bytes(raw))
        if rec.seen >= self.started or self.meta._holds_local(txn, rec):
            return
        self.meta._remove(txn, rec, self.removed)
        self.writes += 1
        self.entries_changed = True
        if deferred is not None:  # the directory is gone: the object of that name appears
            self._file(txn, deferred[0], deferred[1], None)

    # -- applying a page ---------------------------------------------------------------------

    def page(self, objects: list[tuple[str, int, str, float]], prefixes: list[str]) -> None:
        """Merge one page: ``objects`` (name relative to the directory, size, etag, mtime) and
        ``prefixes`` (relative, ending in "/"), both as the store listed them."""
        self.apply(self.prepare(objects, prefixes))

    @staticmethod
    def prepare(objects: list[tuple[str, int, str, float]], prefixes: list[str]) -> list[Entry]:
        """A page's entries in listing-key order, ready for ``apply`` (in slices, if wanted)."""
        entries: list[Entry] = []
        for name, size, etag, mtime in objects:
            if name and "/" not in name:  # "" is the directory's own marker
                entries.append((encode_name(name), name, (size, etag, mtime)))
        for p in prefixes:
            name = p[:-1]
            if name and "/" not in name:
                entries.append((encode_name(p), name, None))
        entries.sort(key=lambda e: e[0])
        return entries

    def apply(self, entries: list[Entry]) -> None:
        """Merge entries from ``prepare`` (following those already applied), in one write
        transaction; ``changed`` and ``removed`` then name the files it changed and removed."""
        self.changed, self.removed = [], []
        with self.meta.env.begin(write=True) as txn:
            for key, name, info in entries:
                if split_key(self.dir.rel + name) is None:
                    self.skipped += 1
                    continue
                found = self._passed(txn, key)
                if info is None:
                    self._dir(txn, name, found)
                else:
                    self._file(txn, name, info, found)

    def _dir(self, txn: lmdb.Transaction, name: str, found: tuple[bytes, int] | None) -> None:
        if found is not None:
            return  # an unchanged directory: nothing to write
        meta = self.meta
        dkey = _U64.pack(self.dir.ino) + encode_name(name)
        child = txn.get(dkey, db=meta.dirents)
        if child is not None:
            rec = meta._child(txn, bytes(child))
            if rec.is_dir:
                return  # created meanwhile (a probe, a mkdir)
            meta._remove(txn, rec, self.removed)  # a key that is both: the directory wins
            self.entries_changed = True
        rec = Record(meta._alloc(txn), Kind.DIR, self.dir.ino, 0, 0, "", self.started, 0.0,
                     self.dir.rel + name + "/")
        txn.put(dkey, _U64.pack(rec.ino), db=meta.dirents)
        txn.put(_U64.pack(rec.ino), rec.pack(), db=meta.inodes)
        self.writes += 1
        self.entries_changed = True

    def _file(self, txn: lmdb.Transaction, name: str, info: tuple[int, str, float],
              found: tuple[bytes, int] | None) -> None:
        meta = self.meta
        size, etag, mtime = info
        mtime_ns = time_ns(mtime)
        dkey = _U64.pack(self.dir.ino) + encode_name(name)
        if found is None:
            child = txn.get(dkey, db=meta.dirents)
            if child is None:
                rec = Record(meta._alloc(txn), Kind.FILE, self.dir.ino, size, mtime_ns, etag,
                             self.started, 0.0, self.dir.rel + name)
                txn.put(dkey, _U64.pack(rec.ino), db=meta.dirents)
                txn.put(_U64.pack(rec.ino), rec.pack(), db=meta.inodes)
                meta._adjust(txn, 1, size)
                self.writes += 1
                self.entries_changed = True
                return
            rec = meta._child(txn, bytes(child))  # created meanwhile
            if rec.is_dir:
                if rec.seen < self.started:  # not listed yet: is it still there?
                    self.deferred[encode_name(name)] = (name, info)
                else:
                    self.skipped += 1  # the directory wins
                return
        else:
            rec = meta._child(txn, _U64.pack(found[1]))
        if rec.local or (rec.size == size and rec.etag == etag and rec.mtime_ns == mtime_ns):
            return  # written here and not uploaded (ours is newer), or unchanged
        if rec.etag != etag or rec.size != size:
            self.changed.append(rec.ino)
            meta._adjust(txn, 0, size - rec.size)
        rec.size, rec.etag, rec.mtime_ns = size, etag, mtime_ns
        txn.put(_U64.pack(rec.ino), rec.pack(), db=meta.inodes)
        self.writes += 1

    # -- the end -----------------------------------------------------------------------------

    def finish(self) -> Iterator[list[int]]:
        """Remove what the listing never reached and mark the directory listed, in bounded
        transactions; yields the files removed by each (the caller checkpoints between)."""
        meta = self.meta
        while True:
            self.removed = []
            with meta.env.begin(write=True) as txn:
                for _ in range(END_BATCH):
                    if not self.heap:
                        self._fill(txn, None)
                        if not self.heap:
                            break
                    _, name, ino = heapq.heappop(self.heap)
                    self._unseen(txn, name, ino)
                done = not self.heap and self.exhausted
                if done:
                    raw = txn.get(_U64.pack(self.dir.ino), db=meta.inodes)
                    if raw is not None:
                        drec = Record.unpack(self.dir.ino, bytes(raw))
                        drec.listed_at = self.started
                        txn.put(_U64.pack(self.dir.ino), drec.pack(), db=meta.inodes)
            yield self.removed
            if done:
                return
