"""The LMDB store: listing, stable inode numbers, and the data-cache index.

Layout (one LMDB environment per cache namespace, four named databases):

    inodes   ino (u64 BE)                    -> Record (struct header + etag + key)
    dirents  parent ino (u64 BE) + name      -> child ino (u64 BE)
    blocks   ino (u64 BE) + block (u32 BE)   -> etag hash (u64) + size (u64) + atime (f64)
    staged   ino (u64 BE)                    -> multipart upload id (utf-8, may be empty)
    meta     b"schema", b"next_ino", b"files", b"bytes", b"cache_bytes" (see ``cache.store``)

Invariants:
- Every dirent points at an inode record whose parent is the dirent's parent, and every inode
  except the root has exactly one dirent. Inode numbers are never reused, so they are stable for
  as long as the cache dir lives.
- A directory's ``listed_at`` is the start time of the last *complete* listing that covered it;
  each entry's ``seen`` is the start time of the last listing that saw it. After a complete
  listing started at T, children with ``seen < T`` are gone from the bucket and are removed.
- A block entry exists only once its data file is complete (see ``cache.store``).
- A file written through the mount and not yet uploaded is *local*: its ``seen`` is ``LOCAL``
  (later than any listing), so listings neither overwrite it nor remove it; it has a ``staged``
  entry (the write journal, see ``cache.writer``) until its data is in the bucket.

Transactions are short and run on the trio thread (microseconds to a few milliseconds for a page
of 1,000 keys). The environment is opened with ``sync=False``: a killed daemon loses nothing (the
OS has the pages); after a power loss the namespace may be discarded and rebuilt, which for a
cache is the right trade against an fsync per listing page.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import os
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import lmdb

from .names import decode_name, encode_name, split_key

log = logging.getLogger(__name__)

SCHEMA = b"cachefs-1"
#: What a failed LMDB write raises (the cache dir's disk is full: DiskError, or a short write).
#: Callers that can go on without the write (the listing, the cache index) catch it.
WriteError = lmdb.Error
#: What LMDB raises when its file is damaged (a power loss under ``sync=False``, a bad disk).
#: Never "disk full": the namespace is marked damaged and rebuilt at the next start.
CORRUPTION = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.InvalidError,
              lmdb.VersionMismatchError, lmdb.BadChecksumError, lmdb.IncompatibleError,
              lmdb.BadTxnError)
DAMAGED = "damaged"  # marker file in the LMDB directory: rebuild this namespace at start
ROOT_INODE = 1
LOCAL = float("inf")  # ``seen`` of a file whose data is only on this machine (not yet uploaded)
MAP_SIZE = 1 << 40  # address space only; the file grows with use (1M objects ~ 300 MB)

CHECK_BATCH = 10_000  # entries read per transaction by ``check``
_U64 = struct.Struct(">Q")
_BLOCK_KEY = struct.Struct(">QI")
_BLOCK_VAL = struct.Struct(">QQd")  # etag hash, size, last access (s, float: LRU needs order)
_REC = struct.Struct(">BQQqddB")  # kind, parent, size, mtime_ns, seen, listed_at, etag length


class Kind(enum.IntEnum):
    FILE = 1
    DIR = 2


@dataclass(slots=True)
class Record:
    ino: int
    kind: Kind
    parent: int
    size: int
    mtime_ns: int
    etag: str
    seen: float
    listed_at: float  # directories only; 0 = never listed completely
    rel: str  # key relative to the mount root; "" for the root, directories end in "/"

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR

    @property
    def local(self) -> bool:
        """Written here and not yet uploaded: listings must not touch it."""
        return self.seen == LOCAL

    @property
    def name(self) -> str:
        return self.rel.rstrip("/").rpartition("/")[2]

    def pack(self) -> bytes:
        etag = self.etag.encode()
        return (_REC.pack(self.kind, self.parent, self.size, self.mtime_ns, self.seen,
                          self.listed_at, len(etag)) + etag + encode_name(self.rel))

    @classmethod
    def unpack(cls, ino: int, raw: bytes) -> Record:
        kind, parent, size, mtime_ns, seen, listed_at, elen = _REC.unpack_from(raw)
        off = _REC.size
        etag = raw[off:off + elen].decode()
        rel = decode_name(bytes(raw[off + elen:]))
        return cls(ino, Kind(kind), parent, size, mtime_ns, etag, seen, listed_at, rel)


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: bytes
    record: Record


@dataclass(slots=True)
class IngestResult:
    changed: list[int]  # files whose ETag changed, or that a directory replaced: their cached
    #                     data and kernel pages are stale
    skipped: int  # keys that cannot be file names (see names.py)


def etag_hash(etag: str) -> int:
    return int.from_bytes(hashlib.blake2b(etag.encode(), digest_size=8).digest(), "big")


def block_key(ino: int, block: int) -> bytes:
    return _BLOCK_KEY.pack(ino, block)


def unpack_block_key(raw: bytes) -> tuple[int, int]:
    ino, block = _BLOCK_KEY.unpack(raw)
    return ino, block


def pack_block(etag_h: int, size: int, atime: float) -> bytes:
    return _BLOCK_VAL.pack(etag_h, size, atime)


def unpack_block(raw: bytes) -> tuple[int, int, float]:
    etag_h, size, atime = _BLOCK_VAL.unpack(raw)
    return etag_h, size, atime


class MetadataStore:
    """All persistent metadata of one cache namespace."""

    def __init__(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        self.damaged: str | None = None
        self.env = lmdb.open(path, map_size=MAP_SIZE, max_dbs=5, subdir=True, sync=False,
                             metasync=False, readahead=False, max_readers=512, lock=True, mode=0o600)
        self.inodes = self.env.open_db(b"inodes")
        self.dirents = self.env.open_db(b"dirents")
        self.blocks = self.env.open_db(b"blocks")
        self.meta = self.env.open_db(b"meta")
        self.staged = self.env.open_db(b"staged")
        with self.env.begin(write=True) as txn:
            schema = txn.get(b"schema", db=self.meta)
            if schema is None:
                txn.put(b"schema", SCHEMA, db=self.meta)
                txn.put(b"next_ino", _U64.pack(ROOT_INODE + 1), db=self.meta)
                root = Record(ROOT_INODE, Kind.DIR, ROOT_INODE, 0, 0, "", 0.0, 0.0, "")
                txn.put(_U64.pack(ROOT_INODE), root.pack(), db=self.inodes)
            elif bytes(schema) != SCHEMA:
                raise RuntimeError(f"cache metadata has schema {bytes(schema)!r}, expected {SCHEMA!r}")

    def close(self) -> None:
        with contextlib.suppress(lmdb.Error):
            self.env.sync(True)
        self.env.close()

    # -- damage -----------------------------------------------------------------------------

    def note_damage(self, exc: BaseException) -> None:
        """LMDB reported damage: say so (once) and leave a marker so that the next start
        rebuilds the namespace (the listing is relisted; cached data is downloaded again;
        data written and not uploaded is kept, see ``cache.writer``)."""
        if self.damaged is None:
            self.damaged = f"{type(exc).__name__}: {exc}"
            log.error("the cache index in %s is damaged (%s); cachefs reports itself unhealthy and "
                      "rebuilds the index at its next start", self.path, self.damaged)
            with contextlib.suppress(OSError), open(os.path.join(self.path, DAMAGED), "w") as f:
                f.write(self.damaged + "\n")

    def check(self, until: float | None = None) -> tuple[int, bool]:
        """Read every page of every table (blocking: run in a thread), stopping at ``until``
        (``time.monotonic()``) if given. Returns (entries read, whether it read everything);
        damage found is noted (``note_damage``) and re-raised."""
        entries = 0
        try:
            for db in (self.inodes, self.dirents, self.blocks, self.staged, self.meta):
                after: bytes | None = None
                while True:
                    if until is not None and time.monotonic() > until:
                        return entries, False
                    with self.env.begin() as txn:
                        cur = txn.cursor(db=db)
                        if not (cur.set_range(after) if after else cur.first()):
                            break
                        n = 0
                        for key, _ in cur:
                            if after is not None and bytes(key) == after:
                                continue
                            after = bytes(key)
                            n += 1
                            if n >= CHECK_BATCH:
                                break
                    entries += n
                    if n < CHECK_BATCH:
                        break
        except CORRUPTION as exc:
            self.note_damage(exc)
            raise
        return entries, True

    # -- reads ------------------------------------------------------------------------------

    def get(self, ino: int) -> Record | None:
        with self.env.begin() as txn:
            raw = txn.get(_U64.pack(ino), db=self.inodes)
            return Record.unpack(ino, raw) if raw is not None else None

    def lookup(self, parent: int, name: bytes) -> Record | None:
        with self.env.begin() as txn:
            child = txn.get(_U64.pack(parent) + name, db=self.dirents)
            if child is None:
                return None
            ino = _U64.unpack(child)[0]
            raw = txn.get(child, db=self.inodes)
            return Record.unpack(ino, raw) if raw is not None else None

    def children(self, parent: int, after: bytes | None = None, limit: int = 1 << 62) -> list[DirEntry]:
        """Up to ``limit`` entries of directory ``parent`` in name order, after name ``after``."""
        prefix = _U64.pack(parent)
        out: list[DirEntry] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dirents)
            if not cur.set_range(prefix + (after or b"")):
                return out
            for key, child in cur:
                if not key.startswith(prefix):
                    break
                name = bytes(key[8:])
                if after is not None and name == after:
                    continue
                raw = txn.get(child, db=self.inodes)
                if raw is not None:
                    out.append(DirEntry(name, Record.unpack(_U64.unpack(child)[0], raw)))
                if len(out) >= limit:
                    break
        return out

    def resolve(self, rel_path: str) -> Record | None:
        """The record for a path relative to the mount root ("" is the root)."""
        rec = self.get(ROOT_INODE)
        for part in (p for p in rel_path.split("/") if p):
            if rec is None or not rec.is_dir:
                return None
            rec = self.lookup(rec.ino, encode_name(part))
        return rec

    def iter_children(self, parent: int, batch: int = 1000) -> Iterator[DirEntry]:
        """All entries of a directory in name order, ``batch`` per read transaction, so that a
        directory of a million objects never sits in memory at once."""
        after: bytes | None = None
        while True:
            entries = self.children(parent, after, batch)
            yield from entries
            if len(entries) < batch:
                return
            after = entries[-1].name

    def iter_files(self, top: int) -> Iterator[Record]:
        """Every file below directory ``top``, depth first, files of a directory before its
        subdirectories. Memory grows with the depth and the number of subdirectories, not files."""
        stack = [top]
        while stack:
            d = stack.pop()
            subdirs = []
            for e in self.iter_children(d):
                if e.record.is_dir:
                    subdirs.append(e.record.ino)
                else:
                    yield e.record
            stack.extend(reversed(subdirs))

    def totals(self) -> tuple[int, int]:
        """(files, bytes) in the listing."""
        with self.env.begin() as txn:
            files = txn.get(b"files", db=self.meta)
            size = txn.get(b"bytes", db=self.meta)
            return (_U64.unpack(files)[0] if files else 0, _U64.unpack(size)[0] if size else 0)

    # -- writes -----------------------------------------------------------------------------

    def _child(self, txn: lmdb.Transaction, child: bytes) -> Record:
        """The record a dirent value points at (the invariant says it exists)."""
        raw = txn.get(child, db=self.inodes)
        assert raw is not None, "dirent without inode record"
        return Record.unpack(_U64.unpack(child)[0], bytes(raw))

    def _alloc(self, txn: lmdb.Transaction) -> int:
        ino = _U64.unpack(bytes(txn.get(b"next_ino", db=self.meta) or b""))[0]
        txn.put(b"next_ino", _U64.pack(ino + 1), db=self.meta)
        return ino

    def _adjust(self, txn: lmdb.Transaction, files: int, size: int) -> None:
        if not files and not size:
            return
        for key, delta in ((b"files", files), (b"bytes", size)):
            raw = txn.get(key, db=self.meta)
            cur = _U64.unpack(raw)[0] if raw else 0
            txn.put(key, _U64.pack(max(0, cur + delta)), db=self.meta)

    def _ensure_dir(self, txn: lmdb.Transaction, parts: list[str], seen: float,
                    cache: dict[str, int], removed: list[int]) -> int:
        """Inode of the directory named by ``parts``, creating it (and its parents) as needed.
        A file in the way is removed and its inode appended to ``removed``."""
        parent = ROOT_INODE
        rel = ""
        for part in parts:
            rel += part + "/"
            known = cache.get(rel)
            if known is not None:
                parent = known
                continue
            dkey = _U64.pack(parent) + encode_name(part)
            child = txn.get(dkey, db=self.dirents)
            rec = self._child(txn, bytes(child)) if child else None
            if rec is not None and rec.kind is Kind.FILE:
                # A key that is both an object and a prefix: the directory wins.
                self._remove(txn, rec, removed)
                rec = None
            if rec is None:
                rec = Record(self._alloc(txn), Kind.DIR, parent, 0, 0, "", seen, 0.0, rel)
                txn.put(dkey, _U64.pack(rec.ino), db=self.dirents)
                txn.put(_U64.pack(rec.ino), rec.pack(), db=self.inodes)
            elif rec.seen < seen:
                rec.seen = seen
                txn.put(_U64.pack(rec.ino), rec.pack(), db=self.inodes)
            cache[rel] = rec.ino
            parent = rec.ino
        return parent

    def ingest(self, objects: Iterable[tuple[str, int, str, float]], prefixes: Iterable[str],
               seen: float) -> IngestResult:
        """Record one listing page. ``objects`` are (relative key, size, etag, mtime) and
        ``prefixes`` relative common prefixes ending in "/"; ``seen`` is the listing's start."""
        result = IngestResult([], 0)
        dirs: dict[str, int] = {}
        with self.env.begin(write=True) as txn:
            for rel in prefixes:
                split = split_key(rel)
                if split is None:
                    result.skipped += 1
                    continue
                self._ensure_dir(txn, split[0], seen, dirs, result.changed)
            for rel, size, etag, mtime in objects:
                split = split_key(rel)
                if split is None:
                    result.skipped += 1
                    continue
                parts, is_marker = split
                if is_marker:
                    self._ensure_dir(txn, parts, seen, dirs, result.changed)
                    continue
                parent = self._ensure_dir(txn, parts[:-1], seen, dirs, result.changed)
                dkey = _U64.pack(parent) + encode_name(parts[-1])
                child = txn.get(dkey, db=self.dirents)
                mtime_ns = int(mtime * 1e9)
                if child is None:
                    rec = Record(self._alloc(txn), Kind.FILE, parent, size, mtime_ns, etag, seen, 0.0, rel)
                    txn.put(dkey, _U64.pack(rec.ino), db=self.dirents)
                    self._adjust(txn, 1, size)
                else:
                    rec = self._child(txn, bytes(child))
                    if rec.kind is Kind.DIR:
                        result.skipped += 1  # the directory wins
                        continue
                    if rec.local:
                        continue  # written here, not uploaded yet: ours is newer
                    if rec.etag != etag or rec.size != size:
                        result.changed.append(rec.ino)
                        self._adjust(txn, 0, size - rec.size)
                    rec.size, rec.etag, rec.mtime_ns, rec.seen = size, etag, mtime_ns, seen
                txn.put(_U64.pack(rec.ino), rec.pack(), db=self.inodes)
        return result

    def _remove(self, txn: lmdb.Transaction, rec: Record, removed: list[int]) -> None:
        """Delete an entry (a directory with everything below it)."""
        if rec.is_dir:
            for entry in self._children_in(txn, rec.ino):
                self._remove(txn, entry, removed)
        else:
            removed.append(rec.ino)
            self._adjust(txn, -1, -rec.size)
        txn.delete(_U64.pack(rec.parent) + encode_name(rec.name), db=self.dirents)
        txn.delete(_U64.pack(rec.ino), db=self.inodes)

    def _holds_local(self, txn: lmdb.Transaction, rec: Record) -> bool:
        """A directory with a local file below it stays (as long as the file is local)."""
        if not rec.is_dir:
            return rec.local
        return any(self._holds_local(txn, child) for child in self._children_in(txn, rec.ino))

    def _children_in(self, txn: lmdb.Transaction, parent: int) -> list[Record]:
        prefix = _U64.pack(parent)
        out = []
        cur = txn.cursor(db=self.dirents)
        if cur.set_range(prefix):
            for key, child in cur:
                if not bytes(key).startswith(prefix):
                    break
                out.append(self._child(txn, bytes(child)))
        return out

    # -- changes made through the mount (read-write mounts) ----------------------------------

    def create(self, parent: int, name: str, kind: Kind, *, local: bool, now: float) -> Record:
        """A new empty file or directory named ``name`` in ``parent`` (which must not have it).
        A file created here is local until uploaded; a directory is listed (empty) as of now."""
        with self.env.begin(write=True) as txn:
            prec = self._child(txn, _U64.pack(parent))
            rel = prec.rel + name + ("/" if kind is Kind.DIR else "")
            seen = LOCAL if local else now
            rec = Record(self._alloc(txn), kind, parent, 0, time_ns(now), "", seen,
                         now if kind is Kind.DIR else 0.0, rel)
            txn.put(_U64.pack(parent) + encode_name(name), _U64.pack(rec.ino), db=self.dirents)
            txn.put(_U64.pack(rec.ino), rec.pack(), db=self.inodes)
            if kind is Kind.FILE:
                self._adjust(txn, 1, 0)
            return rec

    def set_file(self, ino: int, *, size: int, etag: str | None = None, mtime: float | None = None,
                 local: bool | None = None, seen: float | None = None) -> Record | None:
        """Update a file's size (and ETag, mtime, local state) after a write or an upload."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(_U64.pack(ino), db=self.inodes)
            if raw is None:
                return None
            rec = Record.unpack(ino, raw)
            self._adjust(txn, 0, size - rec.size)
            rec.size = size
            if etag is not None:
                rec.etag = etag
            if mtime is not None:
                rec.mtime_ns = time_ns(mtime)
            if local is True:
                rec.seen = LOCAL
            elif local is False and rec.local:
                rec.seen = seen if seen is not None else (mtime or 0.0)
            txn.put(_U64.pack(ino), rec.pack(), db=self.inodes)
            return rec

    def remove(self, ino: int) -> list[int]:
        """Delete an entry (a directory with everything below it); returns removed file inodes."""
        removed: list[int] = []
        with self.env.begin(write=True) as txn:
            raw = txn.get(_U64.pack(ino), db=self.inodes)
            if raw is not None:
                self._remove(txn, Record.unpack(ino, raw), removed)
        return removed

    def move(self, ino: int, new_parent: int, new_name: str) -> list[int]:
        """Rename an entry (and, for a directory, every path below it). An entry already at the
        new name is removed first; returns the inodes of the files removed that way."""
        removed: list[int] = []
        with self.env.begin(write=True) as txn:
            rec = self._child(txn, _U64.pack(ino))
            prec = self._child(txn, _U64.pack(new_parent))
            dkey = _U64.pack(new_parent) + encode_name(new_name)
            old = txn.get(dkey, db=self.dirents)
            if old is not None and bytes(old) != _U64.pack(ino):
                self._remove(txn, self._child(txn, bytes(old)), removed)
            txn.delete(_U64.pack(rec.parent) + encode_name(rec.name), db=self.dirents)
            txn.put(dkey, _U64.pack(ino), db=self.dirents)
            rec.parent = new_parent
            stack = [(rec, prec.rel + new_name + ("/" if rec.is_dir else ""))]
            while stack:
                r, rel = stack.pop()
                r.rel = rel
                if r.is_dir:
                    r.listed_at = 0.0  # list it again under its new name
                    stack.extend((c, rel + c.name + ("/" if c.is_dir else ""))
                                 for c in self._children_in(txn, r.ino))
                txn.put(_U64.pack(r.ino), r.pack(), db=self.inodes)
        return removed

    def iter_subtree(self, top: int) -> Iterator[Record]:
        """Every entry below directory ``top`` (files and directories)."""
        stack = [top]
        while stack:
            for e in self.iter_children(stack.pop()):
                yield e.record
                if e.record.is_dir:
                    stack.append(e.record.ino)

    # -- the write journal ------------------------------------------------------------------

    def journal_put(self, ino: int, upload_id: str = "") -> None:
        with self.env.begin(write=True) as txn:
            txn.put(_U64.pack(ino), upload_id.encode(), db=self.staged)

    def journal_delete(self, ino: int) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(_U64.pack(ino), db=self.staged)

    def journal(self) -> list[tuple[int, str]]:
        """(inode, multipart upload id) of every file with staged data not yet uploaded."""
        with self.env.begin() as txn:
            return [(_U64.unpack(bytes(k))[0], bytes(v).decode())
                    for k, v in txn.cursor(db=self.staged)]


def time_ns(seconds: float) -> int:
    return int(seconds * 1e9)
