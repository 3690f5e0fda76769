"""The prefetcher: pull whole prefixes into the cache, or follow announced read orders.

Bulk jobs (``cachefs prefetch [PATH...]``, ``mount --prefetch``) are queued in order; each job's
files are walked lazily from LMDB (after a parallel listing) and their blocks fed through a
bounded channel to ``concurrency`` workers, so memory does not grow with the dataset. A bulk
prefetch never evicts: when the cache is full it stops (``stopped_full``), so it cannot push out
what it fetched a moment ago, nor what readers are using.

Announced orders (``announce``; see ``cache.order``) each get a task that resolves the paths to
inodes in reading order (listing directories not listed yet as it meets them) and fetches
the order a *window* ahead of its reader, ``concurrency`` files in flight. The window is what
the reader consumes in ``LEAD_SECONDS`` plus four backend latencies at its measured rate (at
least ``2 x concurrency`` items, at most half the cache): the reader rarely waits, and a slow
reader does not have the whole dataset fetched under it. Beyond the window the task goes on
only into free room (it evicts nothing there). Within it, when the cache is full, a file is
fetched only if something cached is needed later than it (it then evicts that), so it never
pushes out what is read sooner.

On-demand reads never wait behind the prefetcher: they do not use its queue and the backend
reserves connections for them (see ``mount``).
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import trio

from .. import metrics
from ..errors import BackendError
from ..metadata import ROOT_INODE, Record
from ..metadata.listing import Lister
from ..metadata.names import encode_name
from .order import Order, Planner, Stream
from .reader import BlockReader, block_count, block_ref

log = logging.getLogger(__name__)

COUNT_CHECKPOINT = 1000  # files counted between two yields to the event loop
QUEUE_DEPTH = 1024  # blocks handed to workers ahead of time; bounds memory, not the dataset
RESOLVE_CHUNK = 2048  # paths of an order resolved (and listed) as a group
SLICE = 0.005  # seconds of resolving or walking an order between two yields to the event loop
RESOLVE_LISTINGS = 32  # paths whose directory must be listed first, resolved at once
LEAD_SECONDS = 2.0  # an announced order is fetched this much reading time ahead (plus latency)
LATENCY_SMOOTHING = 0.1  # weight of the newest fetch time in the moving average
RECHECK = 0.5  # seconds between two looks at a stream when nothing woke it


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
    shard: tuple[int, int] | None = None  # (rank, world): only the files of this rank


def in_shard(rel: str, shard: tuple[int, int] | None) -> bool:
    """The rule of ``cachefs prefetch --shard RANK/WORLD``: a file belongs to rank
    ``crc32(path relative to the mount, UTF-8) % WORLD``, the same on every node whatever
    the order of its listing."""
    if shard is None:
        return True
    rank, world = shard
    return zlib.crc32(rel.encode("utf-8", "surrogateescape")) % world == rank


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
        self.planner = Planner(self.cache.holds)
        self.cache.planner = self.planner
        self._streams: dict[str, trio.CancelScope] = {}  # the task of each announced stream
        self._nursery: trio.Nursery | None = None

    def submit(self, paths: list[str], shard: tuple[int, int] | None = None) -> None:
        """Queue a bulk job (raises trio.WouldBlock if 64 jobs are already waiting)."""
        self._jobs_send.send_nowait(Job(paths, shard))
        self.progress.jobs_queued += 1
        self.idle = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
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
                files: Iterator[Record] = (r for r in meta.iter_files(rec.ino) if not r.local)
            elif not rec.local:  # written here and not uploaded yet: nothing to fetch
                files = iter([rec])
            else:
                continue
            yield from (r for r in files if in_shard(r.rel, job.shard))

    async def _run_job(self, job: Job) -> None:
        p = self.progress
        p.files_total = p.files_done = p.files_failed = p.bytes_total = p.bytes_done = 0
        p.started, p.finished, p.running, p.stopped_full = time.time(), 0.0, True, False
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

    # -- announced orders -------------------------------------------------------------------

    def announce(self, name: str, orders: list[list[str]]) -> Stream:
        """Make ``orders`` (paths relative to the mount, epoch after epoch) the orders of stream
        ``name``, replacing what it had; resolving and fetching run in the background."""
        assert self._nursery is not None, "Prefetcher.run is not running"
        old = self._streams.pop(name, None)
        if old is not None:
            old.cancel()
        stream = self.planner.announce(name, [Order(len(paths)) for paths in orders])
        scope = self._streams[name] = trio.CancelScope()
        self._nursery.start_soon(self._follow, stream, orders, scope)
        log.info("order announced for stream %r: %s items", name, "+".join(str(len(o)) for o in orders))
        return stream

    def forget(self, name: str) -> bool:
        scope = self._streams.pop(name, None)
        if scope is not None:
            scope.cancel()
        return self.planner.forget(name)

    async def _follow(self, stream: Stream, paths: list[list[str]], scope: trio.CancelScope) -> None:
        with scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._resolve_all, stream, paths)
                    nursery.start_soon(self._fetch_ahead, stream)
            except Exception:
                log.exception("announced order of stream %r failed", stream.name)

    async def _resolve_all(self, stream: Stream, paths: list[list[str]]) -> None:
        """Fill the orders' inode numbers in reading order, chunk by chunk, so fetching starts
        with the first chunk. A directory never listed is listed when a path first needs it."""
        for order, names in zip(stream.orders, paths, strict=True):
            for start in range(0, len(names), RESOLVE_CHUNK):
                chunk = names[start:start + RESOLVE_CHUNK]
                slow: list[int] = []
                since = time.monotonic()
                for i, path in enumerate(chunk):
                    if time.monotonic() - since > SLICE:
                        await trio.sleep(0)  # a FUSE request waits for one slice at most
                        since = time.monotonic()
                    try:
                        rec = self.meta.resolve(path)
                    except UnicodeError:  # not a name any key can have (a lone surrogate)
                        chunk[i] = ""
                        rec = None
                    if rec is not None and not rec.is_dir:
                        order.inos[start + i] = rec.ino
                    else:
                        slow.append(i)
                if slow:
                    limiter = trio.CapacityLimiter(RESOLVE_LISTINGS)

                    async def resolve(i: int, chunk: list[str] = chunk, start: int = start,
                                      order: Order = order, limiter: trio.CapacityLimiter = limiter) -> None:
                        async with limiter:
                            order.inos[start + i] = await self._resolve(chunk[i])

                    async with trio.open_nursery() as nursery:
                        for i in slow:
                            nursery.start_soon(resolve, i)
                    stream.missing += sum(1 for i in slow if order.inos[start + i] == 0)
                order.resolved = start + len(chunk)
                stream.wake.set()
                await trio.sleep(0)
            await trio.to_thread.run_sync(order.build_index)
            stream.far_cursor = max(stream.far_cursor, stream.resolved_end - 1)
        if stream.missing:
            log.warning("order of stream %r: %d paths are not in the bucket", stream.name, stream.missing)
        paths.clear()  # the names are no longer needed: memory back before the epoch is read

    async def _resolve(self, path: str) -> int:
        """The inode of a file path relative to the mount, listing directories on the way that
        were never listed (0: not in the bucket, or a directory)."""
        rec = self.meta.get(ROOT_INODE)
        if not path:
            return 0
        for part in (p for p in path.split("/") if p):
            if rec is None or not rec.is_dir:
                return 0
            name = encode_name(part)
            child = self.meta.lookup(rec.ino, name)
            if child is None and rec.listed_at == 0:
                try:
                    rec = await self.lister.ensure_listed(rec)
                except BackendError as exc:
                    log.warning("order: cannot list %r: %s", rec.rel, exc)
                    return 0
                child = self.meta.lookup(rec.ino, name)
            rec = child
        return rec.ino if rec is not None and not rec.is_dir and not rec.local else 0

    def _window(self, stream: Stream, latency: float) -> int:
        files, size = self.meta.totals()
        mean = size / files if files else 1.0
        most = max(self.concurrency, int(self.cache.capacity * 0.5 / max(mean, 1.0)))
        want = math.ceil(stream.rate * (LEAD_SECONDS + 4 * latency))
        return min(max(2 * self.concurrency, want), most)

    async def _fetch_ahead(self, stream: Stream) -> None:
        """Fetch a stream's order ahead of its reader, ``concurrency`` files at once."""
        slots = trio.Semaphore(self.concurrency)
        inflight: set[int] = set()
        inflight_bytes = 0
        latency = 0.0
        cache = self.cache

        async def fetch(q: int, rec: Record, evict: bool) -> None:
            nonlocal latency, inflight_bytes
            started = time.monotonic()
            ok = True
            try:
                key = self.lister.key(rec)
                for block in range(block_count(rec.size)):
                    ref = block_ref(rec.ino, rec.etag, rec.size, block)
                    if not self.reader.cached(ref):
                        await self.reader.fetch(ref, key, evict=evict)
            except BackendError as exc:
                ok = False
                log.warning("prefetch of %r failed: %s", rec.rel, exc)
            finally:
                inflight.discard(q)
                inflight_bytes -= rec.size
                slots.release()
                stream.wake.set()
            took = time.monotonic() - started
            latency = took if latency == 0 else (1 - LATENCY_SMOOTHING) * latency + LATENCY_SMOOTHING * took
            metrics.prefetch_objects.labels("done" if ok else "failed").inc()
            metrics.prefetch_bytes.labels("done" if ok else "failed").inc(rec.size)

        async with trio.open_nursery() as nursery:
            while True:
                stream.wake = trio.Event()
                stream.window = self._window(stream, latency)
                stream.issued = max(stream.issued, stream.pos)
                target = stream.pos + stream.window
                state = "caught up"
                since = time.monotonic()
                while stream.issued < stream.end:
                    if time.monotonic() - since > SLICE:
                        await trio.sleep(0)  # a long run of cached items: let FUSE requests in
                        since = time.monotonic()
                        continue
                    q = stream.issued
                    if q >= stream.resolved_end:
                        state = "resolving"
                        break
                    rec = self.meta.get(stream.item(q))
                    if rec is None or rec.is_dir or rec.local or self._cached(rec):
                        stream.issued += 1
                        continue
                    # Downloads in flight count as room taken (most have not reserved it yet).
                    evict = cache.over_high(inflight_bytes + rec.size)
                    if evict:
                        # Full: fetch only within the window, and only what is needed sooner
                        # than the cached item needed latest (which it then evicts).
                        far = self.planner.farthest()
                        if q >= target or far is None or far <= q - stream.pos:
                            state = "cache full" if q < target else "waiting for the reader"
                            break
                    if slots.value == 0:
                        state = "fetching"
                        break
                    await slots.acquire()
                    inflight.add(q)
                    inflight_bytes += rec.size
                    stream.issued += 1
                    nursery.start_soon(fetch, q, rec, evict)
                if inflight and state == "caught up":
                    state = "fetching"
                stream.state = state
                stream.done_until = min(inflight) if inflight else stream.issued
                metrics.order_lead.set(sum(max(0, s.done_until - s.pos) for s in self.planner.streams.values()))
                with trio.move_on_after(RECHECK):
                    await stream.wake.wait()

    def _cached(self, rec: Record) -> bool:
        return all(self.reader.cached(block_ref(rec.ino, rec.etag, rec.size, b))
                   for b in range(block_count(rec.size)))
