"""Listing: fill the LMDB listing from the bucket, and keep it fresh.

The listing sits with the metadata it fills: the FUSE core and the prefetcher ask ``Lister`` for
a fresh directory or a refreshed file record; neither calls the backend to list or HEAD.

Concurrency protocol:
- Listing a directory is single-flight per directory inode: a second lookup/readdir of a
  directory being listed waits for the first listing instead of starting another.
- A stale directory is served from LMDB while it is listed again in the background; a lookup
  in a directory never listed is answered by one listing page that starts at the name. Only
  a directory never listed makes ``readdir`` wait for its listing.
- A relist writes only what changed (``merge``), page by page, each page one transaction.
- Files written through this mount and not yet uploaded are "local" (``Record.local``): a
  listing never overwrites or removes them (see ``merge``).
- Whoever learns that files changed or vanished (a relist, a HEAD after a failed If-Match) calls
  ``on_stale`` with their inodes, so cached data and the kernel's pages of them are dropped; a
  relist that added or removed entries calls ``on_entries_changed`` with the directory, so the
  kernel's cached copy of its entries is dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from .. import metrics
from ..backends import Backend
from ..errors import BackendError, NotFound
from .merge import Merge
from .names import decode_name
from .store import ROOT_INODE, MetadataStore, Record, WriteError

log = logging.getLogger(__name__)

LIST_CONCURRENCY = 32  # directories listed at once (the start-up walk, background relists)
MERGE_SLICE = 100  # listing entries merged per transaction (~1-2 ms on the event loop)
CHECKPOINT_EVERY = 1000  # entries walked between two yields to the event loop


class Lister:
    def __init__(self, meta: MetadataStore, backend: Backend, metadata_ttl: float) -> None:
        self.meta = meta
        self.backend = backend
        self.prefix = backend.source.prefix
        self.ttl = metadata_ttl
        self._listing: dict[int, trio.Event] = {}
        self._limiter = trio.CapacityLimiter(LIST_CONCURRENCY)
        self.nursery: trio.Nursery | None = None  # set by the daemon: background relists run here
        self.writes = 0  # records written by listings (unchanged entries cost none)
        self.listed_once = trio.Event()
        #: called with inodes whose data changed or that are gone: drop cached data and pages
        self.on_stale: Callable[[list[int]], None] = lambda inos: None
        #: called with a directory whose listing gained or lost entries: drop the kernel's copy
        self.on_entries_changed: Callable[[int], None] = lambda ino: None
        #: called when a listing could not be written to LMDB (the cache disk is full)
        self.on_write_error: Callable[[Exception], None] = lambda exc: None

    def key(self, rec: Record) -> str:
        """The object key of a record in the bucket."""
        return self.prefix + rec.rel

    def fresh(self, rec: Record) -> bool:
        return rec.listed_at > 0 and self.ttl > 0 and time.time() - rec.listed_at < self.ttl

    async def ensure_listed(self, rec: Record, *, complete: bool = False) -> Record:
        """The directory record, listed. A directory never listed (or any, with ``complete``
        or a TTL of 0) is listed completely first; a stale one is served from LMDB at once
        while it is listed again in the background (stale-while-revalidate), and keeps its
        old listing if that relist fails. Raises NotFound if the directory vanished."""
        if self.fresh(rec):
            return rec
        if rec.listed_at > 0 and self.ttl > 0 and not complete and self.nursery is not None:
            self._background(rec)
            return rec
        pending = self._listing.get(rec.ino)
        if pending is not None:
            await pending.wait()
        else:
            await self._list_once(rec, self._start(rec), background=False)
        new = self.meta.get(rec.ino)
        if new is None:
            raise NotFound(f"{rec.rel!r} is gone")
        return new

    def revalidate(self, rec: Record) -> None:
        """List a directory past its TTL again, in the background (never waits)."""
        if rec.listed_at > 0 and self.ttl > 0 and not self.fresh(rec) and self.nursery is not None:
            self._background(rec)

    async def lookup(self, parent: Record, name: bytes) -> Record | None:
        """The entry ``name`` of directory ``parent``, or None. In a directory never listed,
        the answer does not wait for the whole listing (minutes for a million entries): one
        listing page that starts at the name answers it, while the full listing runs in the
        background."""
        if parent.listed_at == 0 and self.nursery is not None:
            rec = self.meta.lookup(parent.ino, name)
            if rec is None:
                await self._probe(parent, name)
                rec = self.meta.lookup(parent.ino, name)
            self._background(parent)
            return rec
        await self.ensure_listed(parent)
        return self.meta.lookup(parent.ino, name)

    async def _probe(self, parent: Record, name: bytes) -> None:
        """Ingest the first listing page of keys that start with ``parent``/``name``."""
        seen = time.time()
        prefix = self.prefix + parent.rel + decode_name(name)
        page = await self.backend.list_page(prefix, "/", None)
        cut = len(self.prefix)
        result = self.meta.ingest(((o.key[cut:], o.size, o.etag, o.mtime) for o in page.objects),
                                  (p[cut:] for p in page.prefixes), seen)
        if result.changed:
            self.on_stale(result.changed)

    def _start(self, rec: Record) -> trio.Event:
        ev = self._listing[rec.ino] = trio.Event()
        return ev

    def _background(self, rec: Record) -> None:
        if rec.ino not in self._listing:
            assert self.nursery is not None
            self.nursery.start_soon(self._list_once, rec, self._start(rec), True)

    async def _list_once(self, rec: Record, done: trio.Event, background: bool) -> None:
        try:
            async with self._limiter:
                await self._list_dir(rec)
        except WriteError as exc:
            # The cache dir's disk is full: serve the listing we have; try again next time.
            self.on_write_error(exc)
        except BackendError as exc:
            if not background and rec.listed_at == 0:
                raise  # nothing to serve instead
            log.warning("listing %r failed; serving the previous listing: %s", rec.rel or "/", exc)
        finally:
            del self._listing[rec.ino]
            done.set()

    async def _list_dir(self, rec: Record) -> None:
        """List one directory completely and merge it into LMDB (only changes are written)."""
        merge = Merge(self.meta, rec, time.time())
        prefix = self.prefix + rec.rel
        cut = len(prefix)
        token: str | None = None
        while True:
            try:
                page = await self.backend.list_page(prefix, "/", token)
            except NotFound:
                break
            entries = merge.prepare([(o.key[cut:], o.size, o.etag, o.mtime) for o in page.objects],
                                    [p[cut:] for p in page.prefixes])
            for i in range(0, len(entries), MERGE_SLICE):
                merge.apply(entries[i:i + MERGE_SLICE])
                if merge.changed or merge.removed:
                    self.on_stale(merge.changed + merge.removed)
                await trio.sleep(0)  # a lookup waits for one slice, not a page
            token = page.token
            if token is None:
                break
        for removed in merge.finish():
            if removed:
                self.on_stale(removed)
            await trio.sleep(0)
        if merge.entries_changed:
            self.on_entries_changed(rec.ino)
        self.writes += merge.writes
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
                        for i, entry in enumerate(self.meta.iter_children(ino)):
                            if entry.record.is_dir:
                                outstanding += 1
                                send.send_nowait(entry.record.ino)
                            if i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
                                await trio.sleep(0)  # a flat directory of millions: let FUSE in
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

    async def refresh(self, ino: int) -> None:
        """Re-read one file's size and ETag from the bucket (its object changed under a read)."""
        rec = self.meta.get(ino)
        if rec is None or rec.local:
            return
        try:
            info = await self.backend.head(self.key(rec))
        except NotFound:
            return
        self.meta.set_file(ino, size=info.size, etag=info.etag, mtime=info.mtime)
        self.on_stale([ino])
