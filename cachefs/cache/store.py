"""Object data on local disk, indexed in LMDB.

Small objects (up to ``BLOCK_SIZE``) are one block; larger objects are cut into blocks so that a
few KB read from a 10 GB object costs one block. A block lives in ``data/XX/<ino>.<block>.<etag
hash>``; it is written to a temporary file in the same directory, renamed into place, and only
then recorded in the LMDB ``blocks`` table. So an entry always names a complete file, and a crash
leaves at worst a file without an entry, which ``fsck`` removes at the next start.

Admission and eviction (``--cache-policy``):
- ``stable`` (default): when the cache is full, new data is admitted only by evicting entries
  unused for ``idle_evict`` seconds. A training job reading a shuffled dataset larger than the
  cache keeps a fixed subset, so every epoch hits ``capacity / dataset`` of its reads — the best
  any cache can do for a random order — instead of LRU's near-zero; and a node that moves on to
  another dataset still ages the old one out.
- ``lru``: evict the least recently used entries down to ``LOW_WATERMARK``.

Access times are kept in memory and written to LMDB in batches (``flush_atimes``), so a cache
hit costs no write transaction.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass

import trio

from .. import metrics
from ..metadata.store import (
    MetadataStore,
    WriteError,
    block_key,
    etag_hash,
    pack_block,
    unpack_block,
    unpack_block_key,
)

log = logging.getLogger(__name__)

BLOCK_SIZE = 4 << 20  # 4 MiB: one GET per block is ~1 RTT + 4 MiB of transfer
LOW_WATERMARK = 0.9  # LRU evicts down to 90% so that eviction runs in batches, not per block
TMP_SUFFIX = ".tmp"
HISTOGRAM_BUCKETS = 4096  # resolution of the access-time histogram used to pick LRU victims
FULL_FRACTION = 0.95  # `cachefs status` calls the cache full from 95% of its capacity
IDLE_RESCAN = 60.0  # seconds between scans for idle entries when the stable cache is full


@dataclass(frozen=True, slots=True)
class BlockRef:
    ino: int
    block: int
    etag: str
    size: int  # bytes in this block


class DataCache:
    def __init__(self, root: str, meta: MetadataStore, capacity: int, policy: str,
                 idle_evict: float) -> None:
        self.root = root
        self.meta = meta
        self.capacity = capacity
        self.policy = policy
        self.idle_evict = idle_evict
        self.used = 0
        self.disk_full = False  # the last cache write failed with ENOSPC/EDQUOT
        self.disk_limiter = trio.CapacityLimiter(16)  # concurrent file reads/writes
        self._atimes: dict[bytes, float] = {}
        self._evicting = trio.Lock()
        self._no_idle_until = 0.0
        os.makedirs(os.path.join(root, "data"), mode=0o700, exist_ok=True)
        metrics.cache_capacity.set(capacity)

    # -- paths ------------------------------------------------------------------------------

    def path(self, ino: int, block: int, etag: str) -> str:
        return os.path.join(self.root, "data", f"{ino & 0xFF:02x}",
                            f"{ino}.{block}.{etag_hash(etag):016x}")

    # -- start-up ---------------------------------------------------------------------------

    def fsck(self) -> tuple[int, int, int]:
        """Make the index and the files agree (blocking; run in a thread at start).
        Returns (entries dropped, files removed, bytes in cache)."""
        dropped = removed = used = 0
        expected: set[str] = set()
        stale: list[bytes] = []
        with self.meta.env.begin() as txn:
            for key, val in txn.cursor(db=self.meta.blocks):
                ino, block = unpack_block_key(bytes(key))
                etag_h, size, _ = unpack_block(bytes(val))
                name = f"{ino}.{block}.{etag_h:016x}"
                path = os.path.join(self.root, "data", f"{ino & 0xFF:02x}", name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    st = None
                if st is None or st.st_size != size:
                    stale.append(bytes(key))
                    continue
                expected.add(name)
                used += size
        if stale:
            try:
                with self.meta.env.begin(write=True) as txn:
                    for key in stale:
                        txn.delete(key, db=self.meta.blocks)
                dropped = len(stale)
            except WriteError as exc:  # a missing or short file is read as a miss anyway
                self.index_write_failed(exc)
        data = os.path.join(self.root, "data")
        for sub in os.listdir(data):
            subdir = os.path.join(data, sub)
            if not os.path.isdir(subdir):
                continue
            for name in os.listdir(subdir):
                if name not in expected:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(subdir, name))
                    removed += 1
        self.used = used
        metrics.cache_used.set(used)
        return dropped, removed, used

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

    # -- writes -----------------------------------------------------------------------------

    async def reserve(self, size: int, *, evict: bool = True, urgent: bool = False) -> bool:
        """Admit ``size`` bytes (evicting if the policy allows) and count them as used now, so
        concurrent downloads never overshoot the capacity. False: not admitted (counted).
        Every True must be followed by ``commit`` or ``unreserve``. ``urgent`` (data written
        through the mount) evicts the least recently used cached data whatever the policy."""
        while self.used + size > self.capacity:
            if not await self._make_room(size, evict, urgent):
                metrics.cache_rejected.inc()
                return False
        self.used += size
        return True

    def unreserve(self, size: int) -> None:
        self.used -= size
        metrics.cache_used.set(self.used)

    def charge(self, size: int) -> None:
        """Count bytes that are already on disk (staged data found at start) as used."""
        self.used += size
        metrics.cache_used.set(self.used)

    def adopt(self, ino: int, etag: str, fd: int, size: int) -> bool:
        """Turn an uploaded staging file (open as ``fd``) into cached blocks of version ``etag``;
        the ``size`` bytes are already reserved. Blocking: runs in a thread. False if the
        blocks could not be written or recorded (the caller then unreserves)."""
        refs = []
        try:
            for block in range(max(1, (size + BLOCK_SIZE - 1) // BLOCK_SIZE) if size else 0):
                ref = BlockRef(ino, block, etag, min(BLOCK_SIZE, size - block * BLOCK_SIZE))
                path = self.path(ino, block, etag)
                tmp = f"{path}.{os.getpid()}.adopt{TMP_SUFFIX}"
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    offset, left = block * BLOCK_SIZE, ref.size
                    while left:
                        n = os.copy_file_range(fd, out, left, offset)
                        if n == 0:
                            raise OSError(errno.EIO, "staging file shorter than its size")
                        offset, left = offset + n, left - n
                finally:
                    os.close(out)
                os.rename(tmp, path)
                refs.append(ref)
            with self.meta.env.begin(write=True) as txn:
                now = time.time()
                for ref in refs:
                    txn.put(block_key(ino, ref.block), pack_block(etag_hash(etag), ref.size, now),
                            db=self.meta.blocks)
        except (OSError, WriteError) as exc:
            log.warning("could not keep written data in the cache: %s", exc)
            for ref in refs:
                self._unlink_later(ino, ref.block, etag_hash(etag))
            return False
        return True

    def write_file(self, ref: BlockRef, data: bytes) -> OSError | None:
        """Write a block's file: temporary file, then rename. Blocking: runs in a worker thread
        (the download's own, right after the GET). Returns the error instead of raising it."""
        path = self.path(ref.ino, ref.block, ref.etag)
        tmp = f"{path}.{os.getpid()}.{id(data):x}{TMP_SUFFIX}"
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return exc
        return None

    def commit(self, ref: BlockRef, error: OSError | None) -> bool:
        """Record a reserved block whose file ``write_file`` wrote (or failed to: ``error``)."""
        if error is not None:
            self.unreserve(ref.size)
            metrics.cache_write_errors.inc()
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                if not self.disk_full:
                    log.warning("cache dir %s is full; serving from the backend without caching", self.root)
                self.disk_full = True
            else:
                log.warning("cannot write cache file: %s", error.strerror)
            return False
        key = block_key(ref.ino, ref.block)
        try:
            with self.meta.env.begin(write=True) as txn:
                old = txn.get(key, db=self.meta.blocks)
                txn.put(key, pack_block(etag_hash(ref.etag), ref.size, time.time()), db=self.meta.blocks)
        except WriteError as exc:
            self.unreserve(ref.size)
            self._unlink_later(ref.ino, ref.block, etag_hash(ref.etag))
            self.index_write_failed(exc)
            return False
        if old is not None:
            old_h, old_size, _ = unpack_block(bytes(old))
            self.used -= old_size
            if old_h != etag_hash(ref.etag):
                self._unlink_later(ref.ino, ref.block, old_h)
        self.disk_full = False
        metrics.cache_used.set(self.used)
        return True

    def index_write_failed(self, exc: Exception) -> None:
        """A write to the LMDB index failed (its disk is full): count it, say so once, go on
        without it. Reads are served from the backend; nothing half-written is ever used."""
        metrics.cache_write_errors.inc()
        if not self.disk_full:
            log.warning("cannot write the cache index in %s (%s); serving from the backend without "
                        "caching", self.root, exc)
        self.disk_full = True

    @property
    def full(self) -> bool:
        """The disk under the cache is full, or the cache is at (nearly) its capacity."""
        return self.disk_full or self.used >= self.capacity * FULL_FRACTION

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

    def _unlink_later(self, ino: int, block: int, etag_h: int) -> None:
        path = os.path.join(self.root, "data", f"{ino & 0xFF:02x}", f"{ino}.{block}.{etag_h:016x}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # unlink of a small file: microseconds, fine on the trio thread

    def retag(self, ino: int, old: str, new: str) -> None:
        """The object's data is unchanged but its ETag is now ``new`` (a server-side copy):
        keep its cached blocks under the new version."""
        moved: list[tuple[bytes, bytes]] = []
        with self.meta.env.begin() as txn:
            cur = txn.cursor(db=self.meta.blocks)
            prefix = block_key(ino, 0)[:8]
            if cur.set_range(prefix):
                for key, val in cur:
                    if not bytes(key).startswith(prefix):
                        break
                    moved.append((bytes(key), bytes(val)))
        keep = []
        for key, val in moved:
            etag_h, size, atime = unpack_block(val)
            block = unpack_block_key(key)[1]
            if etag_h != etag_hash(old):
                continue
            try:
                os.rename(self.path(ino, block, old), self.path(ino, block, new))
            except OSError:
                continue
            keep.append((key, pack_block(etag_hash(new), size, atime)))
        try:
            with self.meta.env.begin(write=True) as txn:
                for key, val in keep:
                    txn.put(key, val, db=self.meta.blocks)
        except WriteError as exc:
            self.index_write_failed(exc)

    def drop_inodes(self, inos: list[int], keep: dict[int, str] | None = None) -> None:
        """Forget every cached block of these files (deleted or changed in the bucket), except
        the blocks of version ``keep[ino]`` where given."""
        if not inos:
            return
        kept = {ino: etag_hash(etag) for ino, etag in (keep or {}).items()}
        victims: list[tuple[bytes, int, int, int]] = []
        with self.meta.env.begin(write=True) as txn:
            cur = txn.cursor(db=self.meta.blocks)
            for ino in inos:
                prefix = block_key(ino, 0)[:8]
                if not cur.set_range(prefix):
                    continue
                for key, val in cur:
                    if not bytes(key).startswith(prefix):
                        break
                    etag_h, size, _ = unpack_block(bytes(val))
                    if kept.get(ino) != etag_h:
                        victims.append((bytes(key), ino, etag_h, size))
            for key, *_ in victims:
                txn.delete(key, db=self.meta.blocks)
        for key, ino, etag_h, size in victims:
            self._unlink_later(ino, unpack_block_key(key)[1], etag_h)
            self.used -= size
        metrics.cache_used.set(self.used)

    # -- policy -----------------------------------------------------------------------------

    async def _make_room(self, need: int, evict: bool, urgent: bool = False) -> bool:
        if not evict:
            return False
        async with self._evicting:
            if self.used + need <= self.capacity:
                return True
            if self.policy == "lru" or urgent:
                target = int(self.capacity * LOW_WATERMARK) - need
                cutoff = None
            else:
                if time.monotonic() < self._no_idle_until:
                    return False
                # Free a batch (not just this block) so the index is scanned rarely.
                target = min(self.capacity - need, int(self.capacity * LOW_WATERMARK))
                cutoff = time.time() - self.idle_evict
            self.flush_atimes()
            chosen = await trio.to_thread.run_sync(self._pick_victims, self.used - max(0, target),
                                                   cutoff)
            if chosen is None:
                # Nothing idle enough: the cache keeps its stable subset. Scanning again for
                # every miss would cost O(entries) each; look again in a while.
                self._no_idle_until = time.monotonic() + IDLE_RESCAN
                return False
            try:
                with self.meta.env.begin(write=True) as txn:
                    for key, _, _ in chosen:
                        txn.delete(key, db=self.meta.blocks)
            except WriteError as exc:
                self.index_write_failed(exc)
                return False
            for key, etag_h, size in chosen:
                ino, block = unpack_block_key(key)
                self._unlink_later(ino, block, etag_h)
                self.used -= size
            metrics.cache_evictions.inc(len(chosen))
            metrics.cache_used.set(self.used)
            return self.used + need <= self.capacity

    def _pick_victims(self, amount: int, cutoff: float | None) -> list[tuple[bytes, int, int]] | None:
        """Entries totalling at least ``amount`` bytes, least recently used first, only those
        used before ``cutoff`` if given; None if there are none. Runs in a thread.

        Two passes over the index so memory stays proportional to the victims, not the cache:
        the first builds a histogram of bytes by access time, which gives the access time below
        which enough bytes lie; the second collects exactly those entries."""
        # One read transaction for all passes: a snapshot. Entries committed or touched between
        # two passes would lie outside [lo, hi] and fall off the histogram.
        with self.meta.env.begin() as txn:
            lo, hi = float("inf"), float("-inf")
            for _, val in txn.cursor(db=self.meta.blocks):
                atime = unpack_block(bytes(val))[2]
                if cutoff is None or atime < cutoff:
                    lo, hi = min(lo, atime), max(hi, atime)
            if lo > hi:
                return None
            width = max((hi - lo) / HISTOGRAM_BUCKETS, 1e-6)
            histogram = [0] * (HISTOGRAM_BUCKETS + 1)
            for _, val in txn.cursor(db=self.meta.blocks):
                _, size, atime = unpack_block(bytes(val))
                if cutoff is None or atime < cutoff:
                    histogram[min(int((atime - lo) / width), HISTOGRAM_BUCKETS)] += size
            total, last = 0, HISTOGRAM_BUCKETS
            for i, size in enumerate(histogram):
                total += size
                if total >= amount:
                    last = i
                    break
            chosen: list[tuple[bytes, int, int]] = []
            for key, val in txn.cursor(db=self.meta.blocks):
                etag_h, size, atime = unpack_block(bytes(val))
                if (cutoff is None or atime < cutoff) and int((atime - lo) / width) <= last:
                    chosen.append((bytes(key), etag_h, size))
        return chosen

    def flush_atimes(self) -> None:
        """Write the batched access times to LMDB."""
        if not self._atimes:
            return
        pending, self._atimes = self._atimes, {}
        try:
            with self.meta.env.begin(write=True) as txn:
                for key, atime in pending.items():
                    raw = txn.get(key, db=self.meta.blocks)
                    if raw is not None:
                        etag_h, size, _ = unpack_block(bytes(raw))
                        txn.put(key, pack_block(etag_h, size, atime), db=self.meta.blocks)
        except WriteError as exc:  # access times are hints for eviction: losing a batch is fine
            self.index_write_failed(exc)
