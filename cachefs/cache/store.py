"""Object data on local disk, indexed in LMDB.

Small objects (up to ``BLOCK_SIZE``) are one block; larger objects are cut into blocks so that a
few KB read from a 10 GB object costs one block. A block lives in ``data/XX/<ino>.<block>.<etag
hash>``; it is written to a temporary file in the same directory, renamed into place, and only
then recorded in the LMDB ``blocks`` table. So an entry always names a complete file, and a crash
leaves at worst a file without an entry, which the start-up check removes.

Admission and eviction (``--cache-policy``):
- ``stable`` (default): when the cache is full, new data is admitted only by evicting entries
  unused for ``idle_evict`` seconds. A training job reading a shuffled dataset larger than the
  cache keeps a fixed subset, so every epoch hits ``capacity / dataset`` of its reads — the best
  any cache can do for a random order — instead of LRU's near-zero; and a node that moves on to
  another dataset still ages the old one out.
- ``lru``: evict the least recently used entries.
- An announced read order (``cache.order``), whatever the policy: while one is known, the
  evictor first takes blocks of files no stream reads again, then of the file read latest
  (Belady's rule over the known future), and frees only from ``PLAN_HIGH`` down to ``PLAN_LOW``
  of the capacity, so that what it gives up is what the optimum would give up next. What no
  order mentions keeps the policy above (``stable``: evicted once idle), and it is not admitted
  at the expense of announced data.

Eviction runs in the background (``run``, a service the daemon starts), never inside a read:
when admissions that may evict take ``used`` past ``HIGH_WATERMARK`` of the capacity, the evictor
frees down to ``LOW_WATERMARK``. It walks the index ``SCAN_CHUNK`` entries per read transaction
in a worker thread, resuming where its last walk stopped, and deletes in batches of
``DELETE_BATCH``: memory is proportional to a chunk, not to the cache. In each chunk it takes the
entries idle for ``idle_evict`` (``stable``), or the least recently used entries holding the
share of the chunk's bytes that the whole index must give up (``lru``, and room for data written
through the mount whatever the policy). Keys are inode numbers, unrelated to access order, so
every chunk is a sample of the whole and this approximates LRU without sorting the index. A read
that finds no room waits at most ``READ_WAIT`` for the evictor, then is served uncached.

Accounting: ``used`` = bytes named by index entries (``indexed``) + bytes reserved (downloads in
flight, data written through the mount and not yet cached). ``indexed`` is also stored in the
LMDB meta table (``USED_KEY``), written in the same transaction as every change to the entries,
so it is right at start without reading the index, and it never drifts from the entries.

Start-up: the mount does not wait for a check of the files. ``check`` runs in the background:
it walks the index in chunks, dropping entries whose file is missing or short, then the data
directories one at a time, removing files that no entry names (point lookups, no set of names).
Until it is done, a missing or short file is read as a miss.

Access times are kept in memory and written to LMDB in batches (``flush_atimes``), so a cache
hit costs no write transaction.

Concurrency protocol (downloads write files in worker threads; the evictor, the check and
``adopt`` change the index from worker threads):
- Which entries exist, which files exist in ``data/``, and the counters change only while
  ``_lock`` (a threading lock, held for one short batch) is held. So a check made under it still
  holds when the change is made: the evictor deletes an entry only if it is still the one it
  chose (same ETag hash and access time, not read since), and a file is removed only if no
  entry names it. Lock order: ``_lock``, then an LMDB write transaction; never the reverse.
- A file renamed into place whose entry is not written yet is *pending* (``_pending``): nobody
  removes it, nor the entry that names it; its writer records it or removes it.
- A reservation is a ``_Ticket`` in the context of the task that made it, which the worker
  thread of its download inherits. ``commit`` and ``unreserve`` end it. A download thread that
  outlived its task (abandoned on cancellation or at the retry deadline) finds its ticket ended
  and puts no file in place; a file it put there before is removed with the reservation.
- Access times not yet flushed (``_atimes``) count when victims are chosen, and a victim read
  after it was chosen is spared.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import itertools
import logging
import os
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field

import lmdb
import trio

from .. import metrics
from ..metadata.store import (
    CORRUPTION,
    MetadataStore,
    WriteError,
    block_key,
    etag_hash,
    pack_block,
    unpack_block,
    unpack_block_key,
)
from .order import Planner

log = logging.getLogger(__name__)

ATIME_BATCH = 5000  # access times written per transaction (a few milliseconds each)
BLOCK_SIZE = 4 << 20  # 4 MiB: one GET per block is ~1 RTT + 4 MiB of transfer
HIGH_WATERMARK = 0.95  # the evictor starts when admissions that may evict pass 95% of capacity,
LOW_WATERMARK = 0.9  # and frees down to 90%, so that it runs in batches, not per block
TMP_SUFFIX = ".tmp"
FULL_FRACTION = 0.95  # `cachefs status` calls the cache full from 95% of its capacity
IDLE_RESCAN = 60.0  # seconds between walks for idle entries when the stable cache has none
READ_WAIT = 0.5  # seconds a read with no room waits for the evictor; then it is served uncached
#                  (longer means the evictor is behind, and the read should not wait for it)
URGENT_WAIT = 30.0  # seconds data written through the mount waits for room before ENOSPC
SCAN_CHUNK = 4096  # index entries per read transaction when evicting or checking (a few ms)
DELETE_BATCH = 128  # entries deleted (and files unlinked) per hold of the lock (about 1 ms)
SWEEPS_PER_ROUND = 2  # whole walks of the index one eviction round makes at most
URGENT_BOOST = 8  # data written through the mount waits: each chunk gives up 8x its share, so
#                   a round frees what is needed in an eighth of a walk (LRU a little coarser)
PLAN_HIGH = 0.99  # with an announced order: evict from 99% of capacity
PLAN_LOW = 0.98  # down to 98% (a victim chosen from the known future is the right one, not a sample)
LRU_RETRY = 1.0  # seconds before another LRU round when the last one could free nothing
USED_KEY = b"cache_bytes"  # LMDB meta table: bytes named by block entries (u64 BE)

_U64 = struct.Struct(">Q")
_Entry = tuple[bytes, int, int, float]  # block key, etag hash, size, atime


@dataclass(frozen=True, slots=True)
class BlockRef:
    ino: int
    block: int
    etag: str
    size: int  # bytes in this block
    # The listed version of the whole object, for checking a copy from the cache tier (which
    # keeps the origin's size and Last-Modified, not its ETag); not part of the block's identity.
    object_size: int = field(default=-1, compare=False)  # -1: unknown, the tier is not asked
    mtime_ns: int = field(default=0, compare=False)


@dataclass(eq=False, slots=True)
class _Ticket:
    """One reservation (see the concurrency protocol in the module docstring)."""

    live: bool = True
    path: str | None = None  # the file its download put in place: pending until commit


_TICKET: contextvars.ContextVar[_Ticket | None] = contextvars.ContextVar("cachefs_reservation",
                                                                         default=None)


class DataCache:
    def __init__(self, root: str, meta: MetadataStore, capacity: int, policy: str,
                 idle_evict: float) -> None:
        self.root = root
        self.meta = meta
        self.capacity = capacity
        self.policy = policy
        self.idle_evict = idle_evict
        self.disk_full = False  # the last cache write failed with ENOSPC/EDQUOT
        self.disk_limiter = trio.CapacityLimiter(16)  # concurrent file reads/writes
        self._atimes: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._pending: collections.Counter[str] = collections.Counter()
        self._indexed = 0  # bytes named by entries (== the stored USED_KEY)
        self._reserved = 0  # bytes reserved or charged, not in the index
        self._tmp_tag = f"{os.getpid()}-{secrets.token_hex(4)}"  # our temporary files
        self._tmp_seq = itertools.count()
        # The evictor (``run``) and those waiting for it.
        self._running = False
        self._wake = trio.Event()
        self._progress = trio.Event()  # set (and replaced) when space was freed or a round ended
        self._rounds_started = 0
        self._rounds_done = 0
        self._demand = 0  # bytes waited for in reserve()
        self._urgent = 0  # waiting reserve()s that evict whatever the policy
        self._cursor = b""  # block key where the next walk of the index starts
        self._nothing_until = 0.0  # a round found nothing to evict: misses do not wake it till then
        self.planner: Planner | None = None  # announced read orders (set by the prefetcher)
        os.makedirs(os.path.join(root, "data"), mode=0o700, exist_ok=True)
        self._indexed = self._load_total()
        metrics.cache_capacity.set(capacity)
        metrics.cache_used.set(self.used)

    @property
    def used(self) -> int:
        """Bytes cached plus bytes reserved (downloads in flight, data written and staged)."""
        return self._indexed + self._reserved

    @property
    def planned(self) -> bool:
        """An announced order decides what is evicted."""
        return self.planner is not None and self.planner.active

    @property
    def high(self) -> float:
        return PLAN_HIGH if self.planned else HIGH_WATERMARK

    @property
    def low(self) -> float:
        return PLAN_LOW if self.planned else LOW_WATERMARK

    def over_high(self, size: int) -> bool:
        """Would ``size`` more bytes take the cache past the level where eviction starts?"""
        return self.used + size > self.capacity * self.high

    @property
    def full(self) -> bool:
        """The disk under the cache is full, or the cache is at (nearly) its capacity."""
        return self.disk_full or self.used >= self.capacity * FULL_FRACTION

    # -- paths ------------------------------------------------------------------------------

    def path(self, ino: int, block: int, etag: str) -> str:
        return self._path(ino, block, etag_hash(etag))

    def _path(self, ino: int, block: int, etag_h: int) -> str:
        return os.path.join(self.root, "data", f"{ino & 0xFF:02x}", f"{ino}.{block}.{etag_h:016x}")

    def _key_path(self, key: bytes, etag_h: int) -> str:
        return self._path(*unpack_block_key(key), etag_h)

    def _tmp_name(self, path: str) -> str:
        return f"{path}.{self._tmp_tag}.{next(self._tmp_seq)}{TMP_SUFFIX}"

    # -- start-up ---------------------------------------------------------------------------

    def _load_total(self) -> int:
        with self.meta.env.begin() as txn:
            raw = txn.get(USED_KEY, db=self.meta.meta)
            if raw is not None:
                return int(_U64.unpack(bytes(raw))[0])
            # An index from before the total was stored: sum it once (no file is read).
            total = sum(unpack_block(bytes(val))[1] for _, val in txn.cursor(db=self.meta.blocks))
        try:
            with self.meta.env.begin(write=True) as txn:
                txn.put(USED_KEY, _U64.pack(total), db=self.meta.meta)
        except WriteError as exc:  # the next change to the index stores it
            self.index_write_failed(exc)
        return total

    def _store_total(self, txn: lmdb.Transaction, delta: int) -> None:
        """In the transaction that changes the entries by ``delta`` bytes (``_lock`` held)."""
        if delta:
            txn.put(USED_KEY, _U64.pack(self._indexed + delta), db=self.meta.meta)

    def fsck(self) -> tuple[int, int, int]:
        """Make the index and the files agree, blocking (tools and tests; the daemon runs
        ``check`` in the background). Returns (entries dropped, files removed, bytes cached)."""
        dropped = removed = 0
        pos: bytes | None = b""
        while pos is not None:
            pos, n = self._check_entries(pos)
            dropped += n
        for sub in self._data_dirs():
            removed += self._check_dir(sub)
        return dropped, removed, self._indexed

    async def check(self) -> tuple[int, int, int]:
        """``fsck`` in the background of a mounted filesystem: one chunk of the index or one
        data directory per worker-thread call, so memory stays bounded and a shutdown waits for
        one chunk at most. Logs what it repaired."""
        start = time.monotonic()
        dropped = removed = 0
        pos: bytes | None = b""
        try:
            while pos is not None:
                pos, n = await trio.to_thread.run_sync(self._check_entries, pos)
                dropped += n
            for sub in await trio.to_thread.run_sync(self._data_dirs):
                removed += await trio.to_thread.run_sync(self._check_dir, sub)
        except (WriteError, OSError) as exc:  # the cache keeps working; a miss is a miss
            log.warning("cache check stopped: %s", exc)
            if isinstance(exc, WriteError):
                self.index_write_failed(exc)
        if dropped or removed:
            log.warning("cache check repaired %d index entries without data and %d data files "
                        "without entries", dropped, removed)
        log.info("cache check finished in %.1f s: %d bytes cached", time.monotonic() - start,
                 self._indexed)
        metrics.cache_used.set(self.used)
        return dropped, removed, self._indexed

    def _data_dirs(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.root, "data")))

    def _check_entries(self, start: bytes) -> tuple[bytes | None, int]:
        """Drop the entries of one chunk of the index whose file is missing or short. Returns
        where the next chunk starts (None: done) and the number dropped. Runs in a thread."""
        chunk, nxt = self._scan(start, SCAN_CHUNK)
        suspects = [e for e in chunk if not _file_ok(self._key_path(e[0], e[1]), e[2])]
        if not suspects:
            return nxt, 0
        dropped = freed = 0
        try:
            with self._lock:
                with self.meta.env.begin(write=True) as txn:
                    for key, etag_h, _, _ in suspects:
                        raw = txn.get(key, db=self.meta.blocks)
                        if raw is None:
                            continue
                        cur_h, size, _ = unpack_block(bytes(raw))
                        path = self._key_path(key, cur_h)
                        # Looked at again under the lock: a download may have put it right since.
                        if cur_h != etag_h or self._pending[path] or _file_ok(path, size):
                            continue
                        txn.delete(key, db=self.meta.blocks)
                        dropped += 1
                        freed += size
                    self._store_total(txn, -freed)
                self._indexed -= freed
        except WriteError as exc:  # a missing or short file is read as a miss anyway
            self.index_write_failed(exc)
            return nxt, 0
        metrics.cache_used.set(self.used)
        return nxt, dropped

    def _check_dir(self, sub: str) -> int:
        """Remove the files of ``data/<sub>`` that no entry names (and temporary files not
        ours). Returns how many. Runs in a thread; memory: the names of one directory."""
        subdir = os.path.join(self.root, "data", sub)
        try:
            names = os.listdir(subdir)
        except (NotADirectoryError, FileNotFoundError):
            return 0
        removed = 0
        for i in range(0, len(names), SCAN_CHUNK):
            removed += self._remove_strays(sub, names[i:i + SCAN_CHUNK])
        return removed

    def _remove_strays(self, sub: str, names: list[str]) -> int:
        subdir = os.path.join(self.root, "data", sub)
        with self.meta.env.begin() as txn:
            strays = [n for n in names if not self._wanted(txn, sub, n)]
        if not strays:
            return 0
        removed = 0
        with self._lock, self.meta.env.begin() as txn:
            for name in strays:
                path = os.path.join(subdir, name)
                if self._pending[path] or self._wanted(txn, sub, name):
                    continue  # recorded (or put in place to be) since the first look
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:  # a directory, say: not ours to remove
                    log.warning("cache check: cannot remove %s: %s", path, exc.strerror)
                    continue
                removed += 1
        return removed

    def _wanted(self, txn: lmdb.Transaction, sub: str, name: str) -> bool:
        """A file of ours: named by an entry, or a temporary file this process is writing."""
        if name.endswith(TMP_SUFFIX):
            return f".{self._tmp_tag}." in name
        parts = name.split(".")
        if len(parts) != 3 or len(parts[2]) != 16:
            return False
        try:
            ino, block, etag_h = int(parts[0]), int(parts[1]), int(parts[2], 16)
        except ValueError:
            return False
        if f"{ino & 0xFF:02x}" != sub or name != f"{ino}.{block}.{etag_h:016x}":
            return False
        try:
            raw = txn.get(block_key(ino, block), db=self.meta.blocks)
        except struct.error:  # numbers too large for a key
            return False
        return raw is not None and unpack_block(bytes(raw))[0] == etag_h

    # -- reads ------------------------------------------------------------------------------

    def lookup(self, ref: BlockRef) -> str | None:
        """Path of the cached block if present and of the right version."""
        key = block_key(ref.ino, ref.block)
        with self.meta.env.begin() as txn:
            raw = txn.get(key, db=self.meta.blocks)
        if raw is None:
            return None
        etag_h, size, _ = unpack_block(bytes(raw))
        if etag_h != etag_hash(ref.etag) or size != ref.size:
            return None
        self._atimes[key] = time.time()
        return self.path(ref.ino, ref.block, ref.etag)

    def holds(self, ino: int) -> bool:
        """Whether any block of ``ino`` is cached (any version)."""
        prefix = block_key(ino, 0)[:8]
        with self.meta.env.begin() as txn:
            cur = txn.cursor(db=self.meta.blocks)
            return bool(cur.set_range(prefix)) and bytes(cur.key()).startswith(prefix)

    def contains(self, ref: BlockRef) -> bool:
        with self.meta.env.begin() as txn:
            raw = txn.get(block_key(ref.ino, ref.block), db=self.meta.blocks)
        return raw is not None and unpack_block(bytes(raw))[0] == etag_hash(ref.etag)

    async def read(self, path: str, offset: int, size: int) -> bytes | None:
        """Bytes from a cached block file, or None if it vanished (treated as a miss)."""
        def pread() -> bytes | None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)

        return await trio.to_thread.run_sync(pread, limiter=self.disk_limiter)

    # -- admission --------------------------------------------------------------------------

    async def reserve(self, size: int, *, evict: bool = True, urgent: bool = False) -> bool:
        """Admit ``size`` bytes and count them as used now, so concurrent downloads never
        overshoot the capacity. False: not admitted (counted). Every True must be followed by
        ``commit`` or ``unreserve`` in the same task. With ``evict``, a full cache wakes the
        evictor and waits for it briefly; ``urgent`` (data written through the mount) evicts the
        least recently used cached data whatever the policy, and waits longer."""
        _TICKET.set(None)
        if evict and self.over_high(size):
            self._kick(urgent)
        if self.used + size > self.capacity and not (evict and await self._wait_for_room(size, urgent)):
            metrics.cache_rejected.inc()
            return False
        with self._lock:
            self._reserved += size
        _TICKET.set(_Ticket())
        metrics.cache_used.set(self.used)
        return True

    def unreserve(self, size: int) -> None:
        """Give back reserved bytes. Ends the calling task's reservation: a download thread of
        it that still runs puts no file in place, and a file it put there is removed."""
        ticket = _TICKET.get()
        with self._lock:
            self._reserved -= size
            if ticket is not None:
                self._end(ticket, keep=False)
        if ticket is not None:
            _TICKET.set(None)
        metrics.cache_used.set(self.used)

    def charge(self, size: int) -> None:
        """Count bytes that are already on disk (staged data found at start) as used."""
        with self._lock:
            self._reserved += size
        metrics.cache_used.set(self.used)

    def _end(self, ticket: _Ticket, *, keep: bool) -> None:
        """End a reservation (``_lock`` held): its file is no longer pending; unless ``keep``
        (it is about to be recorded), remove it if no entry names it."""
        ticket.live = False
        path, ticket.path = ticket.path, None
        if path is None:
            return
        self._pending[path] -= 1
        if self._pending[path] <= 0:
            del self._pending[path]
        if not keep:
            ino, block, etag_h = _parse(path)
            self._unlink_unnamed(block_key(ino, block), etag_h)

    # -- writes -----------------------------------------------------------------------------

    def write_file(self, ref: BlockRef, data: bytes) -> OSError | None:
        """Write a block's file: temporary file, then rename. Blocking: runs in a worker thread
        (the download's own, right after the GET). Returns the error instead of raising it. If
        the reservation has ended meanwhile (the download was abandoned), writes nothing."""
        ticket = _TICKET.get()
        path = self.path(ref.ino, ref.block, ref.etag)
        tmp = self._tmp_name(path)
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            with self._lock:
                if ticket is not None and not ticket.live:
                    os.unlink(tmp)
                    return None  # nobody will record it: its space is no longer reserved
                os.rename(tmp, path)
                if ticket is not None and ticket.path is None:
                    ticket.path = path
                    self._pending[path] += 1
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return exc
        return None

    def commit(self, ref: BlockRef, error: OSError | None) -> bool:
        """Record a reserved block whose file ``write_file`` wrote (or failed to: ``error``)."""
        ticket = _TICKET.get()
        if ticket is not None:
            _TICKET.set(None)
        etag_h = etag_hash(ref.etag)
        key = block_key(ref.ino, ref.block)
        failed: Exception | None = None
        with self._lock:
            self._reserved -= ref.size
            placed = ticket is None or ticket.path is not None
            if ticket is not None:
                self._end(ticket, keep=True)
            if error is None and placed:
                try:
                    with self.meta.env.begin(write=True) as txn:
                        old = txn.get(key, db=self.meta.blocks)
                        txn.put(key, pack_block(etag_h, ref.size, time.time()), db=self.meta.blocks)
                        old_h, old_size, _ = unpack_block(bytes(old)) if old is not None else (etag_h, 0, 0.0)
                        self._store_total(txn, ref.size - old_size)
                    self._indexed += ref.size - old_size
                    if old_h != etag_h:
                        self._unlink_unnamed(key, old_h)
                except WriteError as exc:
                    failed = exc
                    self._unlink_unnamed(key, etag_h)
        metrics.cache_used.set(self.used)
        if error is not None:
            metrics.cache_write_errors.inc()
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                if not self.disk_full:
                    log.warning("cache dir %s is full; serving from the backend without caching", self.root)
                self.disk_full = True
            else:
                log.warning("cannot write cache file: %s", error.strerror)
            return False
        if failed is not None:
            self.index_write_failed(failed)
            return False
        if not placed:
            return False
        self.disk_full = False
        return True

    def adopt(self, ino: int, etag: str, fd: int, size: int) -> bool:
        """Turn an uploaded staging file (open as ``fd``) into cached blocks of version ``etag``;
        the ``size`` bytes are already reserved. Blocking: runs in a thread. False if the
        blocks could not be written or recorded (the caller then unreserves)."""
        etag_h = etag_hash(etag)
        placed: list[tuple[BlockRef, str]] = []
        released = False
        try:
            for block in range((size + BLOCK_SIZE - 1) // BLOCK_SIZE):
                ref = BlockRef(ino, block, etag, min(BLOCK_SIZE, size - block * BLOCK_SIZE))
                path = self.path(ino, block, etag)
                tmp = self._tmp_name(path)
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                try:
                    _copy_range(fd, tmp, block * BLOCK_SIZE, ref.size)
                    with self._lock:
                        os.rename(tmp, path)
                        self._pending[path] += 1
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                placed.append((ref, path))
            with self._lock:
                replaced: list[tuple[bytes, int]] = []
                delta = 0
                try:
                    with self.meta.env.begin(write=True) as txn:
                        now = time.time()
                        for ref, _ in placed:
                            key = block_key(ino, ref.block)
                            old = txn.get(key, db=self.meta.blocks)
                            if old is not None:
                                old_h, old_size, _ = unpack_block(bytes(old))
                                delta -= old_size
                                if old_h != etag_h:
                                    replaced.append((key, old_h))
                            txn.put(key, pack_block(etag_h, ref.size, now), db=self.meta.blocks)
                            delta += ref.size
                        self._store_total(txn, delta)
                finally:
                    self._release([p for _, p in placed])
                    released = True
                self._indexed += delta
                self._reserved -= size
                for key, old_h in replaced:
                    self._unlink_unnamed(key, old_h)
        except (OSError, WriteError) as exc:
            log.warning("could not keep written data in the cache: %s", exc)
            with self._lock:
                if not released:
                    self._release([p for _, p in placed])
                for ref, _ in placed:
                    self._unlink_unnamed(block_key(ino, ref.block), etag_h)
            return False
        metrics.cache_used.set(self.used)
        return True

    def _release(self, paths: list[str]) -> None:
        """These files are no longer pending (``_lock`` held)."""
        for path in paths:
            self._pending[path] -= 1
            if self._pending[path] <= 0:
                del self._pending[path]

    def _unlink_unnamed(self, key: bytes, etag_h: int) -> None:
        """Remove the file of version ``etag_h`` of block ``key`` unless an entry names it or it
        is pending (``_lock`` held, outside any write transaction). Unlinking a small file takes
        microseconds."""
        path = self._key_path(key, etag_h)
        if self._pending[path]:
            return
        with self.meta.env.begin() as txn:
            raw = txn.get(key, db=self.meta.blocks)
        if raw is not None and unpack_block(bytes(raw))[0] == etag_h:
            return
        _unlink(path)

    def index_write_failed(self, exc: Exception) -> None:
        """A write to the LMDB index failed (its disk is full): count it, say so once, go on
        without it. Reads are served from the backend; nothing half-written is ever used.
        A damaged index is not a full disk: it is noted for a rebuild at the next start."""
        metrics.cache_write_errors.inc()
        if isinstance(exc, CORRUPTION):
            self.meta.note_damage(exc)
            return
        if not self.disk_full:
            log.warning("cannot write the cache index in %s (%s); serving from the backend without "
                        "caching", self.root, exc)
        self.disk_full = True

    async def store(self, ref: BlockRef, data: bytes, *, evict: bool = True) -> bool:
        """Cache a block already in memory. Returns False if it was not admitted (cache full,
        disk full); the caller still has the data. ``evict=False`` (prefetch) never evicts."""
        if len(data) != ref.size:
            raise ValueError("block size mismatch")
        if not await self.reserve(ref.size, evict=evict):
            return False
        try:
            error = await trio.to_thread.run_sync(self.write_file, ref, data, limiter=self.disk_limiter)
        except BaseException:
            self.unreserve(ref.size)
            raise
        return self.commit(ref, error)

    def retag(self, ino: int, old: str, new: str) -> None:
        """The object's data is unchanged but its ETag is now ``new`` (a server-side copy):
        keep its cached blocks under the new version."""
        old_h, new_h = etag_hash(old), etag_hash(new)
        if old_h == new_h:
            return
        with self._lock:
            moved: list[tuple[bytes, int, float, str, str]] = []
            with self.meta.env.begin() as txn:
                entries = self._entries_of(ino, txn)
            for key, etag_h, size, atime in entries:
                src, dst = self._key_path(key, old_h), self._key_path(key, new_h)
                if etag_h != old_h or self._pending[src]:
                    continue
                try:
                    os.rename(src, dst)
                except OSError:
                    continue
                moved.append((key, size, atime, src, dst))
            try:
                with self.meta.env.begin(write=True) as txn:
                    for key, size, atime, _, _ in moved:
                        txn.put(key, pack_block(new_h, size, atime), db=self.meta.blocks)
            except WriteError as exc:
                for *_, src, dst in moved:  # the entries still name the old files
                    with contextlib.suppress(OSError):
                        os.rename(dst, src)
                self.index_write_failed(exc)

    def _entries_of(self, ino: int, txn: lmdb.Transaction) -> list[_Entry]:
        prefix = block_key(ino, 0)[:8]
        out: list[_Entry] = []
        cur = txn.cursor(db=self.meta.blocks)
        if cur.set_range(prefix):
            for key, val in cur:
                if not bytes(key).startswith(prefix):
                    break
                out.append((bytes(key), *unpack_block(bytes(val))))
        return out

    def drop_inodes(self, inos: list[int], keep: dict[int, str] | None = None) -> None:
        """Forget every cached block of these files (deleted or changed in the bucket), except
        the blocks of version ``keep[ino]`` where given."""
        if not inos:
            return
        kept = {ino: etag_hash(etag) for ino, etag in (keep or {}).items()}
        try:
            with self._lock:
                with self.meta.env.begin() as txn:
                    victims = [e for ino in inos for e in self._entries_of(ino, txn)
                               if kept.get(ino) != e[1]]
                freed = 0
                with self.meta.env.begin(write=True) as txn:
                    for key, _, _, _ in victims:
                        raw = txn.get(key, db=self.meta.blocks)
                        if raw is not None:
                            txn.delete(key, db=self.meta.blocks)
                            freed += unpack_block(bytes(raw))[1]
                    self._store_total(txn, -freed)
                self._indexed -= freed
                for key, etag_h, _, _ in victims:
                    path = self._key_path(key, etag_h)
                    if not self._pending[path]:
                        _unlink(path)
        except WriteError as exc:  # entries of an old version are never served (ETag check)
            self.index_write_failed(exc)
        metrics.cache_used.set(self.used)

    # -- the evictor ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The evictor, a service for the daemon's nursery. Without it running, a full cache
        admits nothing (reads are served uncached and writes get ENOSPC)."""
        self._running = True
        try:
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                self._rounds_started += 1
                try:
                    await self._evict_round()
                except WriteError as exc:
                    self.index_write_failed(exc)
                finally:
                    self._rounds_done = self._rounds_started
                    self._notify()
        finally:
            self._running = False
            self._notify()

    def _kick(self, urgent: bool) -> None:
        if self._running and (urgent or self.planned or time.monotonic() >= self._nothing_until):
            self._wake.set()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _wait_for_room(self, size: int, urgent: bool) -> bool:
        """Wait for the evictor to make room for ``size`` bytes: True if it did in time."""
        if not self._running or size > self.capacity:
            return False
        if not urgent and not self.planned and time.monotonic() < self._nothing_until:
            return False  # nothing could be evicted a moment ago: do not wait for a walk to say so
        first = self._rounds_started + 1  # the first round to start from now on sees the request
        self._demand += size
        self._urgent += urgent
        try:
            with trio.move_on_after(URGENT_WAIT if urgent else READ_WAIT):
                while self.used + size > self.capacity:
                    if not self._running or self._rounds_done >= first:
                        return False  # a round that knew of this request could not make room
                    self._wake.set()
                    await self._progress.wait()
                return True
            return False
        finally:
            self._demand -= size
            self._urgent -= urgent

    async def _evict_round(self) -> None:
        urgent = self._urgent > 0
        lru = urgent or self.policy == "lru"
        amount = self.used + self._demand - int(self.capacity * self.low)
        if amount <= 0 or (not self._demand and self.used <= self.capacity * self.high):
            return
        if self.planned:
            amount -= await self._evict_planned(amount)
            if amount <= 0:
                return
        if not urgent and time.monotonic() < self._nothing_until:
            return
        while self.flush_atimes(limit=ATIME_BATCH):
            await trio.sleep(0)
        cutoff = None if lru else time.time() - self.idle_evict
        freed = 0
        for _ in range(SWEEPS_PER_ROUND):
            share = min(1.0, (amount - freed) * (URGENT_BOOST if urgent else 1) / max(1, self._indexed))
            got = await self._sweep(amount - freed, share, cutoff)
            freed += got
            if freed >= amount or got == 0:
                break
        if freed == 0:
            # Nothing idle enough (stable: the cache keeps its stable subset), or nothing that
            # may go. Walking the index again for every miss would cost O(entries) each; look
            # again in a while.
            self._nothing_until = time.monotonic() + (IDLE_RESCAN if cutoff is not None else LRU_RETRY)

    async def _evict_planned(self, amount: int) -> int:
        """Free up to ``amount`` bytes from the blocks of announced files, in the order the
        planner gives (read by no stream again, then read latest). Returns the bytes freed."""
        freed = 0
        while freed < amount and self.planner is not None:
            victims: list[_Entry] = []
            size = 0
            while size < amount - freed and len(victims) < DELETE_BATCH:
                ino = self.planner.next_victim()
                if ino is None:
                    break
                with self.meta.env.begin() as txn:
                    entries = self._entries_of(ino, txn)
                victims += entries
                size += sum(e[2] for e in entries)
            if not victims:
                break
            gone, n = await trio.to_thread.run_sync(self._delete_victims, victims, time.time())
            freed += gone
            metrics.cache_evictions.inc(n)
            metrics.cache_used.set(self.used)
            self._notify()
        return freed

    async def _sweep(self, amount: int, share: float, cutoff: float | None) -> int:
        """One walk around the index from the cursor, stopping once ``amount`` bytes are freed.
        Returns the bytes freed."""
        freed = 0
        start = pos = self._cursor
        wrapped = False
        while freed < amount:
            chunk, nxt = await trio.to_thread.run_sync(self._scan, pos, SCAN_CHUNK)
            chosen_at = time.time()
            victims = self._choose(chunk, amount - freed, share, cutoff)
            for i in range(0, len(victims), DELETE_BATCH):
                gone, n = await trio.to_thread.run_sync(self._delete_victims, victims[i:i + DELETE_BATCH],
                                                        chosen_at)
                freed += gone
                metrics.cache_evictions.inc(n)
                metrics.cache_used.set(self.used)
                self._notify()
            if nxt is None:
                self._cursor = b""
                if wrapped or start == b"":
                    break
                wrapped, pos = True, b""
                continue
            self._cursor = pos = nxt
            if wrapped and nxt >= start:
                break
        return freed

    def _choose(self, chunk: list[_Entry], amount: int, share: float,
                cutoff: float | None) -> list[_Entry]:
        """Victims in one chunk, least recently used first (access times not yet flushed
        count): the idle ones (``cutoff``), or the ones holding ``share`` of the chunk's bytes;
        ``amount`` bytes at most (one entry more)."""
        touched = self._atimes
        used_at = [(touched.get(e[0], e[3]), e) for e in chunk]
        candidates = sorted((t, e) for t, e in used_at if cutoff is None or t < cutoff)
        quota = amount if cutoff is not None else min(amount, share * sum(e[2] for e in chunk))
        chosen: list[_Entry] = []
        total = 0
        for _, e in candidates:
            if total >= quota:
                break
            chosen.append(e)
            total += e[2]
        return chosen

    def _scan(self, start: bytes, limit: int) -> tuple[list[_Entry], bytes | None]:
        """Up to ``limit`` entries from key ``start`` on, and the key after them (None: the end).
        One read transaction; runs in a thread."""
        out: list[_Entry] = []
        with self.meta.env.begin() as txn:
            cur = txn.cursor(db=self.meta.blocks)
            if not cur.set_range(start):
                return out, None
            for key, val in cur:
                if len(out) == limit:
                    return out, bytes(key)
                out.append((bytes(key), *unpack_block(bytes(val))))
        return out, None

    def _delete_victims(self, victims: list[_Entry], chosen_at: float) -> tuple[int, int]:
        """Delete the victims that are still what was chosen: same version, same access time,
        not read since ``chosen_at``, file not being rewritten. Returns (bytes freed, entries
        deleted). Runs in a thread."""
        freed = 0
        gone: list[str] = []
        with self._lock:
            with self.meta.env.begin(write=True) as txn:
                for key, etag_h, _, atime in victims:
                    raw = txn.get(key, db=self.meta.blocks)
                    if raw is None or self._atimes.get(key, 0.0) >= chosen_at:
                        continue
                    cur_h, size, cur_atime = unpack_block(bytes(raw))
                    path = self._key_path(key, cur_h)
                    if cur_h != etag_h or cur_atime != atime or self._pending[path]:
                        continue
                    txn.delete(key, db=self.meta.blocks)
                    freed += size
                    gone.append(path)
                self._store_total(txn, -freed)
            self._indexed -= freed
            for path in gone:
                _unlink(path)
        return freed, len(gone)

    def flush_atimes(self, limit: int | None = None) -> bool:
        """Write batched access times to LMDB: all of them, or at most ``limit`` (one short
        transaction; the housekeeping loop calls it repeatedly with a yield between). Returns
        whether some are still pending."""
        if not self._atimes:
            return False
        if limit is None or len(self._atimes) <= limit:
            pending, self._atimes = self._atimes, {}
        else:
            keys = list(itertools.islice(self._atimes, limit))
            pending = {key: self._atimes.pop(key) for key in keys}
        try:
            with self.meta.env.begin(write=True) as txn:
                for key, atime in pending.items():
                    raw = txn.get(key, db=self.meta.blocks)
                    if raw is not None:
                        etag_h, size, _ = unpack_block(bytes(raw))
                        txn.put(key, pack_block(etag_h, size, atime), db=self.meta.blocks)
        except WriteError as exc:  # access times are hints for eviction: losing a batch is fine
            self.index_write_failed(exc)
        return bool(self._atimes)


def _file_ok(path: str, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:  # missing, or unreadable: either way not a block to serve
        return False


def _unlink(path: str) -> None:
    """Remove a block file (microseconds). A failure leaves a file without an entry, which
    ``used`` no longer counts and the next start's check removes."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove cache file %s: %s", path, exc.strerror)


def _parse(path: str) -> tuple[int, int, int]:
    """(ino, block, etag hash) of a block file's path made by ``DataCache._path``."""
    ino, block, etag_h = os.path.basename(path).split(".")
    return int(ino), int(block), int(etag_h, 16)


def _copy_range(fd: int, dst: str, offset: int, length: int) -> None:
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while length:
            n = os.copy_file_range(fd, out, length, offset)
            if n == 0:
                raise OSError(errno.EIO, "staging file shorter than its size")
            offset, length = offset + n, length - n
    finally:
        os.close(out)
