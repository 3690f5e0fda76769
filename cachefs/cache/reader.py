"""The block reader: every byte read from the bucket comes through here.

The FUSE core and the prefetcher both ask it for blocks; it owns the tiers (recent large blocks
in memory, then the disk cache, then the backend), single-flight downloads and readahead.
With a cluster-shared cache tier (``backends.tier``), a block download asks the tier first and
the origin backend only when the tier misses (down, slow, without the object, or holding another
version than the listed one): the tier can make a read slower, never wrong or failed.

Concurrency protocol (what may interleave at an ``await``):
- Downloading a block is single-flight per (inode, block, ETag): concurrent readers of one
  uncached block cause one GET. The download runs in the daemon's service nursery, not in the
  reader's task, so a reader that is interrupted does not waste the download or strand other
  waiters.
- Every GET is pinned with If-Match to the ETag in the ``BlockRef``, and cached blocks are
  checked against it, so a caller never gets a mix of two versions: a changed object raises
  ``ObjectChanged`` and the caller decides what that means (ESTALE for a reader).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .. import metrics
from ..backends import Backend
from ..backends.tier import Tier
from ..errors import BackendError, NotFound, ObjectChanged
from .store import BLOCK_SIZE, BlockRef, DataCache

log = logging.getLogger(__name__)

READAHEAD_MAX_BLOCKS = 16  # sequential readers get up to 16 blocks (64 MiB) ahead
LARGE_FETCHES = 16  # block downloads of large objects in flight (bounds memory: 16 x 4 MiB)
RECENT_BLOCKS = 16  # large blocks kept in memory after download (64 MiB): a sequential reader
#                     asks for each 4 MiB block in 32 reads of 128 KiB; serving those from memory
#                     saves a disk read and a thread hop each


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


@dataclass
class Readahead:
    """Per open file: where a sequential reader is, and how far ahead blocks were scheduled."""

    next_offset: int = 0
    window: int = 1  # in blocks; doubles while the reader stays sequential
    ahead_until: int = 0  # blocks below this have been scheduled


def block_ref(ino: int, etag: str, size: int, block: int, mtime_ns: int = 0) -> BlockRef:
    """Block ``block`` of the version ``etag`` of an object of ``size`` bytes last modified at
    ``mtime_ns`` (as listed; 0 if unknown: the cache tier is then not asked)."""
    start = block * BLOCK_SIZE
    return BlockRef(ino, block, etag, min(BLOCK_SIZE, size - start), size if mtime_ns else -1, mtime_ns)


def block_count(size: int) -> int:
    return max(1, (size + BLOCK_SIZE - 1) // BLOCK_SIZE)


class BlockReader:
    def __init__(self, cache: DataCache, backend: Backend, tier: Tier | None = None) -> None:
        self.cache = cache
        self.backend = backend
        self.tier = tier
        self._flights: dict[tuple[int, int, str], _Flight] = {}
        self._large = trio.CapacityLimiter(LARGE_FETCHES)
        self._recent: collections.OrderedDict[tuple[int, int, str], bytes] = collections.OrderedDict()
        self.nursery: trio.Nursery | None = None  # set by the daemon; downloads live here

    async def read(self, ref: BlockRef, key: str, lo: int, length: int, *, count: bool) -> bytes:
        """Bytes [lo, lo+length) of one block from the fastest tier that has it. ``count``: this
        is the first read of the block by this open file (counted as a hit or a miss)."""
        planner = self.cache.planner
        recent = self._recent.get((ref.ino, ref.block, ref.etag))
        if recent is not None:
            self._recent.move_to_end((ref.ino, ref.block, ref.etag))
            if count:
                metrics.cache_hits.inc()
                if planner is not None and ref.block == 0:
                    planner.on_read(ref.ino, hit=True)
            metrics.read_bytes.labels("cache").inc(length)
            return recent[lo:lo + length]
        path = self.cache.lookup(ref)
        if path is not None:
            data = await self.cache.read(path, lo, length)
            if data is not None and len(data) == length:
                if count:
                    metrics.cache_hits.inc()
                    if planner is not None and ref.block == 0:
                        planner.on_read(ref.ino, hit=True)
                metrics.read_bytes.labels("cache").inc(length)
                return data
        if count:
            metrics.cache_misses.inc()
            if planner is not None and ref.block == 0:
                planner.on_read(ref.ino, hit=False)
        evict = True
        if planner is not None and planner.active:  # Belady with bypass: see cache.order
            evict = planner.admit(ref.ino, full=self.cache.over_high(ref.size))
        data = await self.fetch(ref, key, evict=evict)
        metrics.read_bytes.labels("backend").inc(length)
        return data[lo:lo + length]

    def cached(self, ref: BlockRef) -> bool:
        return (ref.ino, ref.block, ref.etag) in self._flights or self.cache.contains(ref)

    async def fetch(self, ref: BlockRef, key: str, *, evict: bool) -> bytes:
        """Download one block (single-flight) and offer it to the cache. Raises BackendError."""
        fkey = (ref.ino, ref.block, ref.etag)
        flight = self._flights.get(fkey)
        if flight is None:
            flight = self._flights[fkey] = _Flight()
            assert self.nursery is not None, "BlockReader.nursery is not set"
            self.nursery.start_soon(self._download, ref, key, flight, evict)
        await flight.done.wait()
        if flight.error is not None:
            if isinstance(flight.error, BackendError):
                raise flight.error
            raise BackendError(str(flight.error))
        assert flight.data is not None
        return flight.data

    async def _download(self, ref: BlockRef, key: str, flight: _Flight, evict: bool) -> None:
        cache = self.cache
        admitted = False
        try:
            if ref.size == 0:
                flight.data = b""
                return
            admitted = await cache.reserve(ref.size, evict=evict)

            def write(data: bytes) -> OSError | None:
                return cache.write_file(ref, data) if admitted else None

            if ref.size > BLOCK_SIZE // 2:
                async with self._large:
                    flight.data, error = await self._get(ref, key, write)
                self._recent[(ref.ino, ref.block, ref.etag)] = flight.data
                while len(self._recent) > RECENT_BLOCKS:
                    self._recent.popitem(last=False)
            else:
                flight.data, error = await self._get(ref, key, write)
            if admitted:
                admitted = False
                cache.commit(ref, error)
        except Exception as exc:
            flight.error = exc
            if not isinstance(exc, ObjectChanged | NotFound):
                log.warning("download of %r block %d failed: %s", key, ref.block, exc)
        finally:
            if admitted:
                cache.unreserve(ref.size)
            del self._flights[(ref.ino, ref.block, ref.etag)]
            flight.done.set()

    async def _get(self, ref: BlockRef, key: str,
                   write: Callable[[bytes], OSError | None]) -> tuple[bytes, OSError | None]:
        """The block's bytes from the cache tier if it has the listed version, else from the
        origin (pinned to the ETag); ``write`` runs in the same worker thread."""
        start = ref.block * BLOCK_SIZE
        if self.tier is not None and ref.object_size >= 0:
            got = await self.tier.get_then(key, start, ref.size, ref.object_size, ref.mtime_ns, write)
            if got is not None:
                metrics.fetched.labels("tier").inc()
                metrics.fetched_bytes.labels("tier").inc(ref.size)
                return got
        got = await self.backend.get_range_then(key, start, ref.size, ref.etag, write)
        metrics.fetched.labels("origin").inc()
        metrics.fetched_bytes.labels("origin").inc(ref.size)
        return got

    def forget(self, ino: int) -> None:
        """Drop the in-memory blocks of a file (it changed, or was rewritten here)."""
        for k in [k for k in self._recent if k[0] == ino]:
            del self._recent[k]

    def readahead(self, state: Readahead, ino: int, etag: str, size: int, mtime_ns: int, key: str,
                  offset: int, last: int) -> None:
        """Schedule downloads ahead of a sequential reader that just asked for blocks up to
        ``last`` from ``offset``."""
        if size <= BLOCK_SIZE or self.nursery is None:
            return
        if offset != state.next_offset and offset != 0:
            state.window = 1  # random access: no readahead
            return
        state.window = min(state.window * 2, READAHEAD_MAX_BLOCKS)
        nblocks = block_count(size)
        start = max(last + 1, state.ahead_until)
        stop = min(nblocks, last + 1 + state.window)
        for block in range(start, stop):
            ref = block_ref(ino, etag, size, block, mtime_ns)
            if not self.cached(ref):
                self.nursery.start_soon(self._prefetch_block, ref, key)
        state.ahead_until = max(state.ahead_until, stop)

    async def _prefetch_block(self, ref: BlockRef, key: str) -> None:
        with contextlib.suppress(BackendError):  # the reader will fetch the block itself and see the error
            await self.fetch(ref, key, evict=True)
