"""The prefetcher: pull whole prefixes, or an ordered list of paths, into the cache.

Jobs are queued in order; each job's files are walked lazily from LMDB (after a parallel listing)
and their blocks fed through a bounded channel to ``concurrency`` workers, so memory does not grow
with the dataset. On-demand reads never wait behind the prefetcher: they do not use its queue
and the backend reserves connections for them (see ``mount``).

Prefetch never evicts: when the cache is full it stops (``stopped_full``), so it cannot push out
what it fetched a moment ago, nor what readers are using.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import trio

from .. import metrics
from ..errors import BackendError
from ..metadata import Record
from ..metadata.listing import Lister
from .reader import BlockReader, block_count, block_ref

log = logging.getLogger(__name__)

COUNT_CHECKPOINT = 1000  # files counted between two yields to the event loop
QUEUE_DEPTH = 1024  # blocks handed to workers ahead of time; bounds memory, not the dataset


@dataclass
class Progress:
    files_total: int = 0
    files_done: int = 0
    files_failed: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    started: float = 0.0
    finished: float = 0.0
    running: bool = False
    stopped_full: bool = False
    jobs_queued: int = 0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        elapsed = (self.finished or time.time()) - self.started if self.started else 0.0
        d["elapsed"] = elapsed
        d["rate_bytes"] = self.bytes_done / elapsed if elapsed > 0 else 0.0
        return d


@dataclass
class Job:
    paths: list[str]  # relative to the mount root; "" is everything
    ordered: bool  # a --from-list job: files in exactly this order


class Prefetcher:
    def __init__(self, lister: Lister, reader: BlockReader, concurrency: int) -> None:
        self.lister = lister
        self.meta = lister.meta
        self.reader = reader
        self.cache = reader.cache
        self.concurrency = concurrency
        self.progress = Progress()
        self.idle = trio.Event()
        self.idle.set()
        self._jobs_send, self._jobs_recv = trio.open_memory_channel[Job](64)

    def submit(self, paths: list[str], ordered: bool = False) -> None:
        """Queue a job (raises trio.WouldBlock if 64 jobs are already waiting)."""
        self._jobs_send.send_nowait(Job(paths, ordered))
        self.progress.jobs_queued += 1
        self.idle = trio.Event()

    async def run(self) -> None:
        async for job in self._jobs_recv:
            self.progress.jobs_queued -= 1
            try:
                await self._run_job(job)
            except Exception:
                log.exception("prefetch job failed")
            if self.progress.jobs_queued == 0:
                self.idle.set()

    def _files(self, job: Job) -> Iterator[Record]:
        meta = self.meta
        for path in job.paths:
            rec = meta.resolve(path)
            if rec is None:
                log.warning("prefetch: %r is not in the bucket listing", path)
                continue
            if rec.is_dir:
                yield from (r for r in meta.iter_files(rec.ino) if not r.local)
            elif not rec.local:  # written here and not uploaded yet: nothing to fetch
                yield rec

    async def _run_job(self, job: Job) -> None:
        p = self.progress
        p.files_total = p.files_done = p.files_failed = p.bytes_total = p.bytes_done = 0
        p.started, p.finished, p.running, p.stopped_full = time.time(), 0.0, True, False
        if not job.ordered:
            # List first (in parallel), so the walk below sees every file.
            for path in job.paths:
                rec = self.meta.resolve(path)
                if rec is not None and rec.is_dir:
                    await self.lister.walk(rec.ino)
        for rec in self._files(job):
            p.files_total += 1
            p.bytes_total += rec.size
            if p.files_total % COUNT_CHECKPOINT == 0:
                await trio.sleep(0)  # millions of files: let FUSE requests in
        metrics.prefetch_objects.labels("queued").inc(p.files_total)
        metrics.prefetch_bytes.labels("queued").inc(p.bytes_total)
        metrics.prefetch_pending.set(p.files_total)
        log.info("prefetch: %d files, %d bytes", p.files_total, p.bytes_total)

        send, recv = trio.open_memory_channel[tuple[Record, int, list[int]]](QUEUE_DEPTH)
        async with trio.open_nursery() as nursery:
            for _ in range(self.concurrency):
                nursery.start_soon(self._worker, recv.clone())
            async with send:
                for rec in self._files(job):
                    if p.stopped_full:
                        break
                    nblocks = block_count(rec.size)
                    remaining = [nblocks]  # blocks of this file still to do (shared counter)
                    for block in range(nblocks):
                        await send.send((rec, block, remaining))
            await recv.aclose()
        p.running = False
        p.finished = time.time()
        metrics.prefetch_pending.set(0)
        log.info("prefetch finished: %d files done, %d failed%s", p.files_done, p.files_failed,
                 " (cache full: stopped)" if p.stopped_full else "")

    async def _worker(self, recv: trio.MemoryReceiveChannel[tuple[Record, int, list[int]]]) -> None:
        p = self.progress
        async with recv:
            async for rec, block, remaining in recv:
                if p.stopped_full:
                    continue
                ref = block_ref(rec.ino, rec.etag, rec.size, block, rec.mtime_ns)
                ok = True
                cache = self.cache
                if not cache.contains(ref) and cache.used + ref.size > cache.capacity:
                    p.stopped_full = True  # no room without evicting: stop before downloading
                    continue
                if not cache.contains(ref):
                    try:
                        await self.reader.fetch(ref, self.lister.key(rec), evict=False)
                    except BackendError as exc:
                        ok = False
                        log.warning("prefetch of %r failed: %s", rec.rel, exc)
                    if ok and ref.size and not cache.contains(ref):
                        p.stopped_full = True  # not admitted: the cache is full
                        continue
                p.bytes_done += ref.size
                metrics.prefetch_bytes.labels("done" if ok else "failed").inc(ref.size)
                remaining[0] -= 1
                if not ok and remaining[0] >= 0:
                    remaining[0] = -1  # count the file as failed once
                    p.files_failed += 1
                    metrics.prefetch_objects.labels("failed").inc()
                elif remaining[0] == 0:
                    p.files_done += 1
                    metrics.prefetch_objects.labels("done").inc()
                metrics.prefetch_pending.set(max(0, p.files_total - p.files_done - p.files_failed))
