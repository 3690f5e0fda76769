"""Listing: fill the LMDB listing from the bucket, and keep it fresh.

The listing sits with the metadata it fills: the FUSE core and the prefetcher ask ``Lister`` for
a fresh directory or a refreshed file record; neither calls the backend to list or HEAD.

Concurrency protocol:
- Listing a directory is single-flight per directory inode: a second lookup/readdir of a
  directory being listed waits for the first listing instead of starting another.
- Files written through this mount and not yet uploaded are "local" (``Record.local``): a
  listing never overwrites or removes them (see ``MetadataStore.ingest``/``finish_listing``).
- Whoever learns that files changed or vanished (a relist, a HEAD after a failed If-Match) calls
  ``on_stale`` with their inodes, so cached data and the kernel's pages of them are dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from .. import metrics
from ..backends import Backend
from ..errors import NotFound
from .store import ROOT_INODE, MetadataStore, Record, WriteError

log = logging.getLogger(__name__)

LIST_CONCURRENCY = 32  # directories listed at once by the start-up walk


class Lister:
    def __init__(self, meta: MetadataStore, backend: Backend, metadata_ttl: float) -> None:
        self.meta = meta
        self.backend = backend
        self.prefix = backend.source.prefix
        self.ttl = metadata_ttl
        self._listing: dict[int, trio.Event] = {}
        self.listed_once = trio.Event()
        #: called with inodes whose data changed or that are gone: drop cached data and pages
        self.on_stale: Callable[[list[int]], None] = lambda inos: None
        #: called when a listing could not be written to LMDB (the cache disk is full)
        self.on_write_error: Callable[[Exception], None] = lambda exc: None

    def key(self, rec: Record) -> str:
        """The object key of a record in the bucket."""
        return self.prefix + rec.rel

    def fresh(self, rec: Record) -> bool:
        return rec.listed_at > 0 and self.ttl > 0 and time.time() - rec.listed_at < self.ttl

    async def ensure_listed(self, rec: Record) -> Record:
        """The directory record, after a complete listing if its listing is missing or stale.
        Raises NotFound if the directory vanished meanwhile."""
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
                self.on_write_error(exc)
            finally:
                del self._listing[rec.ino]
                ev.set()
        new = self.meta.get(rec.ino)
        if new is None:
            raise NotFound(f"{rec.rel!r} is gone")
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
                self.on_stale(result.changed)
            token = page.token
            if token is None:
                break
        removed = self.meta.finish_listing(rec.ino, started, recursive=False)
        if removed:
            self.on_stale(removed)
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

    async def refresh(self, ino: int) -> None:
        """Re-read one file's size and ETag from the bucket (its object changed under a read)."""
        rec = self.meta.get(ino)
        if rec is None or rec.local:
            return
        try:
            info = await self.backend.head(self.key(rec))
        except NotFound:
            return
        self.meta.update_file(ino, info.size, info.etag, info.mtime)
        self.on_stale([ino])
