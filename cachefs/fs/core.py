"""What the filesystem does, independent of FUSE: listing, attributes, reads.

The pyfuse3 adapter (``adapter``) only converts types and errors; everything here can be driven
from a test inside ``trio.run`` without a mount.

Concurrency protocol (what may interleave at an ``await``):
- Listing a directory is single-flight per directory inode: a second lookup/readdir of a
  directory being listed waits for the first listing instead of starting another.
- Downloading a block is single-flight per (inode, block): concurrent readers of one uncached
  object cause one GET. The download runs in the daemon's service nursery, not in the reader's
  task, so a reader that is interrupted does not waste the download or strand other waiters.
- An open file handle pins the object's ETag: every block it reads is fetched with If-Match on
  that ETag and cached blocks are checked against it, so a reader never gets a mix of two
  versions. If the object changed, the read fails with ESTALE and the listing is refreshed so
  the next open sees the new version.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .. import metrics
from ..backends import Backend
from ..cache.store import BLOCK_SIZE, BlockRef, DataCache
from ..errors import NotFound, ObjectChanged
from ..metadata import ROOT_INODE, MetadataStore, Record
from ..metadata.store import WriteError

log = logging.getLogger(__name__)

LIST_CONCURRENCY = 32  # directories listed at once by the start-up walk
READAHEAD_MAX_BLOCKS = 16  # sequential readers get up to 16 blocks (64 MiB) ahead
LARGE_FETCHES = 16  # block downloads of large objects in flight (bounds memory: 16 x 4 MiB)
RECENT_BLOCKS = 16  # large blocks kept in memory after download (64 MiB): a sequential reader
#                     asks for each 4 MiB block in 32 reads of 128 KiB; serving those from memory
#                     saves a disk read and a thread hop each
# The kernel retries a failed read at once (its readahead failed, then it reads the page itself):
# a block whose download failed for this open file less than this long ago fails again at once
# rather than waiting out another --backend-timeout, so one read() fails within the timeout.
FAILED_READ_MEMORY = 1.0


class FsError(Exception):
    """An error with an errno, raised by the core for the adapter to pass on."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code


@dataclass
class Settings:
    metadata_ttl: float = 86400.0
    uid: int = 0
    gid: int = 0
    file_mode: int = 0o444
    dir_mode: int = 0o555
    #: shown as the time of directories, which object stores do not have
    dir_mtime_ns: int = field(default_factory=lambda: time.time_ns())


@dataclass
class Handle:
    record: Record
    next_offset: int = 0  # where a sequential reader reads next
    window: int = 1  # readahead window in blocks; doubles while the reader stays sequential
    ahead_until: int = 0  # blocks below this have been scheduled
    counted: set[int] = field(default_factory=set)  # blocks already counted as a hit or a miss
    failed: dict[int, float] = field(default_factory=dict)  # block -> when its download gave EIO


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


class CoreFS:
    def __init__(self, meta: MetadataStore, cache: DataCache, backend: Backend,
                 settings: Settings) -> None:
        self.meta = meta
        self.cache = cache
        self.backend = backend
        self.settings = settings
        self.prefix = backend.source.prefix
        self.handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        self._listing: dict[int, trio.Event] = {}
        self._flights: dict[tuple[int, int], _Flight] = {}
        self._large = trio.CapacityLimiter(LARGE_FETCHES)
        self._recent: collections.OrderedDict[tuple[int, int, str], bytes] = collections.OrderedDict()
        self.nursery: trio.Nursery | None = None  # set by run(); downloads live here
        self.on_changed: Callable[[list[int]], None] = lambda inos: None
        self.listed_once = trio.Event()

    # -- listing ----------------------------------------------------------------------------

    def fresh(self, rec: Record) -> bool:
        ttl = self.settings.metadata_ttl
        return rec.listed_at > 0 and ttl > 0 and time.time() - rec.listed_at < ttl

    async def ensure_listed(self, rec: Record) -> Record:
        """The directory record, after a complete listing if its listing is missing or stale."""
        if self.fresh(rec):
            return rec
        pending = self._listing.get(rec.ino)
        if pending is not None:
            await pending.wait()
        else:
            self._listing[rec.ino] = ev = trio.Event()
            try:
                await self._list_dir(rec)
            except WriteError as exc:
                # The cache dir's disk is full: serve the listing we have; try again next time.
                self.cache.index_write_failed(exc)
            finally:
                del self._listing[rec.ino]
                ev.set()
        new = self.meta.get(rec.ino)
        if new is None:
            raise FsError(errno.ENOENT)
        return new

    async def _list_dir(self, rec: Record) -> None:
        started = time.time()
        prefix = self.prefix + rec.rel
        token: str | None = None
        cut = len(self.prefix)
        while True:
            try:
                page = await self.backend.list_page(prefix, "/", token)
            except NotFound:
                break
            result = self.meta.ingest(
                ((o.key[cut:], o.size, o.etag, o.mtime) for o in page.objects),
                (p[cut:] for p in page.prefixes), started)
            if result.changed:
                self.cache.drop_inodes(result.changed)
                self.on_changed(result.changed)
            token = page.token
            if token is None:
                break
        removed = self.meta.finish_listing(rec.ino, started, recursive=False)
        if removed:
            self.cache.drop_inodes(removed)
        files, size = self.meta.totals()
        metrics.listing_objects.set(files)
        metrics.listing_bytes.set(size)

    async def walk(self, top: int = ROOT_INODE) -> None:
        """List every directory below ``top``, many at once (start-up and prefetch)."""
        send, recv = trio.open_memory_channel[int](float("inf"))
        outstanding = 1
        send.send_nowait(top)
        done = trio.Event()

        async def worker() -> None:
            nonlocal outstanding
            async for ino in recv:
                try:
                    rec = self.meta.get(ino)
                    if rec is not None and rec.is_dir:
                        rec = await self.ensure_listed(rec)
                        for entry in self.meta.iter_children(ino):
                            if entry.record.is_dir:
                                outstanding += 1
                                send.send_nowait(entry.record.ino)
                except Exception as exc:
                    log.warning("listing failed: %s", exc)
                outstanding -= 1
                if outstanding == 0:
                    done.set()

        async with trio.open_nursery() as nursery:
            for _ in range(LIST_CONCURRENCY):
                nursery.start_soon(worker)
            await done.wait()
            nursery.cancel_scope.cancel()
        if top == ROOT_INODE:
            self.listed_once.set()

    # -- attributes and names ---------------------------------------------------------------

    def record(self, ino: int) -> Record:
        rec = self.meta.get(ino)
        if rec is None:
            raise FsError(errno.ENOENT)
        return rec

    async def lookup(self, parent: int, name: bytes) -> Record:
        if name.startswith(b".cachefs-health"):
            raise FsError(errno.ENOENT)  # health probe: answered without touching the bucket
        prec = self.record(parent)
        if not prec.is_dir:
            raise FsError(errno.ENOTDIR)
        prec = await self.ensure_listed(prec)
        rec = self.meta.lookup(parent, name)
        if rec is None:
            raise FsError(errno.ENOENT)
        return rec

    async def readdir(self, ino: int, after: bytes | None, limit: int) -> list[tuple[bytes, Record]]:
        rec = self.record(ino)
        if not rec.is_dir:
            raise FsError(errno.ENOTDIR)
        if after is None:
            await self.ensure_listed(rec)
        return [(e.name, e.record) for e in self.meta.children(ino, after, limit)]

    # -- data -------------------------------------------------------------------------------

    def open(self, ino: int) -> int:
        rec = self.record(ino)
        if rec.is_dir:
            raise FsError(errno.EISDIR)
        fh = next(self._fh)
        self.handles[fh] = Handle(rec)
        return fh

    def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        rec = handle.record
        end = min(offset + size, rec.size)
        if offset >= end:
            return b""
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        self._readahead(handle, offset, last)
        parts = []
        for block in range(first, last + 1):
            bstart = block * BLOCK_SIZE
            lo, hi = max(offset, bstart) - bstart, min(end, bstart + BLOCK_SIZE) - bstart
            parts.append(await self._read_block(handle, block, lo, hi - lo))
        handle.next_offset = end
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def block_ref(self, rec: Record, block: int) -> BlockRef:
        start = block * BLOCK_SIZE
        return BlockRef(rec.ino, block, rec.etag, min(BLOCK_SIZE, rec.size - start))

    async def _read_block(self, handle: Handle, block: int, lo: int, length: int) -> bytes:
        """Bytes [lo, lo+length) of one block. Hits and misses are counted once per block per
        open file, so a 110 KB file read in two requests is one miss, not a miss and a hit."""
        rec = handle.record
        ref = self.block_ref(rec, block)
        first = block not in handle.counted
        handle.counted.add(block)
        recent = self._recent.get((ref.ino, ref.block, ref.etag))
        if recent is not None:
            self._recent.move_to_end((ref.ino, ref.block, ref.etag))
            if first:
                metrics.cache_hits.inc()
            metrics.read_bytes.labels("cache").inc(length)
            return recent[lo:lo + length]
        path = self.cache.lookup(ref)
        if path is not None:
            data = await self.cache.read(path, lo, length)
            if data is not None and len(data) == length:
                if first:
                    metrics.cache_hits.inc()
                metrics.read_bytes.labels("cache").inc(length)
                return data
        if first:
            metrics.cache_misses.inc()
        failed_at = handle.failed.get(block)
        if failed_at is not None and time.monotonic() - failed_at < FAILED_READ_MEMORY:
            raise FsError(errno.EIO, "the backend failed this read a moment ago")
        try:
            data = await self.fetch(ref, rec.rel, evict=True)
        except FsError as exc:
            if exc.errno == errno.EIO:
                handle.failed[block] = time.monotonic()
            raise
        metrics.read_bytes.labels("backend").inc(length)
        return data[lo:lo + length]

    async def fetch(self, ref: BlockRef, rel: str, *, evict: bool) -> bytes:
        """Download one block (single-flight) and offer it to the cache."""
        key = (ref.ino, ref.block)
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            assert self.nursery is not None, "CoreFS.run() is not running"
            self.nursery.start_soon(self._download, ref, rel, flight, evict)
        await flight.done.wait()
        if flight.error is not None:
            if isinstance(flight.error, ObjectChanged):
                await self._refresh(ref.ino)
                raise FsError(errno.ESTALE, "object changed in the bucket")
            raise FsError(errno.EIO, str(flight.error))
        assert flight.data is not None
        return flight.data

    async def _download(self, ref: BlockRef, rel: str, flight: _Flight, evict: bool) -> None:
        cache = self.cache
        admitted = False
        try:
            if ref.size == 0:
                flight.data = b""
                return
            admitted = await cache.reserve(ref.size, evict=evict)

            def write(data: bytes) -> OSError | None:
                return cache.write_file(ref, data) if admitted else None

            key, start = self.prefix + rel, ref.block * BLOCK_SIZE
            if ref.size > BLOCK_SIZE // 2:
                async with self._large:
                    flight.data, error = await self.backend.get_range_then(key, start, ref.size, ref.etag, write)
                self._recent[(ref.ino, ref.block, ref.etag)] = flight.data
                while len(self._recent) > RECENT_BLOCKS:
                    self._recent.popitem(last=False)
            else:
                flight.data, error = await self.backend.get_range_then(key, start, ref.size, ref.etag, write)
            if admitted:
                admitted = False
                cache.commit(ref, error)
        except Exception as exc:
            flight.error = exc
            if not isinstance(exc, ObjectChanged | NotFound):
                log.warning("download of %r block %d failed: %s", rel, ref.block, exc)
        finally:
            if admitted:
                cache.unreserve(ref.size)
            del self._flights[(ref.ino, ref.block)]
            flight.done.set()

    async def _refresh(self, ino: int) -> None:
        rec = self.meta.get(ino)
        if rec is None:
            return
        try:
            info = await self.backend.head(self.prefix + rec.rel)
        except NotFound:
            return
        self.meta.update_file(ino, info.size, info.etag, info.mtime)
        self.cache.drop_inodes([ino])
        self.on_changed([ino])

    def _readahead(self, handle: Handle, offset: int, last: int) -> None:
        rec = handle.record
        if rec.size <= BLOCK_SIZE or self.nursery is None:
            return
        if offset != handle.next_offset and offset != 0:
            handle.window = 1  # random access: no readahead
            return
        handle.window = min(handle.window * 2, READAHEAD_MAX_BLOCKS)
        nblocks = (rec.size + BLOCK_SIZE - 1) // BLOCK_SIZE
        start = max(last + 1, handle.ahead_until)
        stop = min(nblocks, last + 1 + handle.window)
        for block in range(start, stop):
            ref = self.block_ref(rec, block)
            if (rec.ino, block) not in self._flights and not self.cache.contains(ref):
                self.nursery.start_soon(self._prefetch_block, ref, rec.rel)
        handle.ahead_until = max(handle.ahead_until, stop)

    async def _prefetch_block(self, ref: BlockRef, rel: str) -> None:
        with contextlib.suppress(FsError):  # the reader will fetch the block itself and see the error
            await self.fetch(ref, rel, evict=True)
