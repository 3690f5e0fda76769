"""The writer: data written through a read-write mount, staged on disk, uploaded, then cached.

A file being written has a staging file ``STAGING/<ino>`` on the cache disk (never in memory, so
RSS does not grow with file size) and an entry in the LMDB write journal (``staged``) from its
first write until its data is in the bucket. Staged bytes count against ``--cache-size`` and
are never evicted: they are not in the block index that eviction reads.

Uploads:
- ``commit`` (on ``close``/``flush``, ``fsync``, and every ``writeback_interval`` for files
  kept open) makes the bucket hold exactly the staged bytes, or raises: a file up to
  ``PART_SIZE`` is one PUT; a larger one is a multipart upload (S3 parts / Azure blocks).
- A sequential writer does not wait at ``close`` for the whole file: once it has written past
  the end of a part, that part is uploaded in the background while it writes on. ``commit`` then
  uploads only the parts that were not uploaded yet or were written again since, and completes.
- After the last writer closes and the data is uploaded, the staging file becomes ordinary
  cached blocks (keyed by the new ETag): reading a checkpoint back does not download it.

Concurrency protocol (what may interleave at an ``await``):
- ``Staged.lock`` is held by every write, truncate and commit of one file, so a commit uploads
  one consistent version and writes wait for it. Background part uploads do not hold it; a
  part records the write generation it read, and counts as uploaded only if the part has not
  been written since. A commit first waits for the part uploads in flight, so none of them
  can land after the commit's own upload of the same part.
- The key an upload goes to is read from the inode's record when the commit starts; a rename
  holds the file's lock (see ``core``), so an upload never lands under a name the file left.

Crash safety: the staging file and the journal survive ``kill -9`` (both are in the page cache
of the OS). At start, ``recover`` uploads every journaled file from its staging file, logs it,
and lists it as "recovered" in ``cachefs status``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import metrics
from ..backends import Backend, ObjectInfo
from ..errors import BackendError, ObjectChanged, TemporaryFailure
from ..metadata import MetadataStore, Record
from ..metadata.names import decode_name, encode_name
from .reader import BlockReader, block_count, block_ref
from .store import BLOCK_SIZE, DataCache

log = logging.getLogger(__name__)

PART_SIZE = 8 << 20  # 8 MiB: above S3's 5 MiB minimum; the unit of background part uploads
MAX_PARTS = 10_000  # S3's limit: files up to 10,000 x 8 MiB (78 GiB); larger writes get EFBIG
PARTS_IN_FLIGHT = 8  # part uploads at once, all files together (memory: 8 x 8 MiB)
RETRY_INTERVAL = 10.0  # seconds between attempts to upload a closed file whose upload failed
TICK = 1.0  # how often the background loop looks for due writebacks and retries
RECOVERED_SHOWN = 100  # recovered files `cachefs status` remembers


class NoSpace(Exception):
    """The staging disk or the cache capacity cannot take more written data (ENOSPC)."""


class TooLarge(Exception):
    """A write beyond the largest object a multipart upload can make (EFBIG)."""


@dataclass
class Staged:
    """One file with data written through the mount."""

    ino: int
    path: str
    size: int
    fd: int = -1  # the staging file, once materialized
    reserved: int = 0  # bytes charged against the cache capacity
    dirty: bool = False  # staged bytes differ from the bucket's
    writers: int = 0  # open handles that may write
    deleted: bool = False  # unlinked: never upload
    recovered: bool = False  # found in the journal at start
    error: str = ""  # the last upload failure, for `cachefs status`
    lock: trio.Lock = field(default_factory=trio.Lock)
    gen: int = 0  # write generation, incremented by every write and truncate
    part_gen: dict[int, int] = field(default_factory=dict)  # part -> generation of its last write
    upload_id: str | None = None  # the open multipart upload
    part_error: BackendError | None = None  # a background part upload failed (after retries)
    session: trio.Lock = field(default_factory=trio.Lock)  # serializes starting the upload
    parts: dict[int, tuple[int, int, str]] = field(default_factory=dict)  # part -> (gen, length, token)
    inflight: dict[int, trio.Event] = field(default_factory=dict)  # background part uploads
    committed_at: float = field(default_factory=time.monotonic)
    retry_at: float = 0.0

    @property
    def materialized(self) -> bool:
        return self.fd >= 0


class Writer:
    def __init__(self, meta: MetadataStore, cache: DataCache, reader: BlockReader, backend: Backend,
                 staging_dir: str, *, writeback_interval: float) -> None:
        self.meta = meta
        self.cache = cache
        self.reader = reader
        self.backend = backend
        self.prefix = backend.source.prefix
        self.dir = staging_dir
        self.writeback_interval = writeback_interval
        self.files: dict[int, Staged] = {}
        self.recovered: deque[dict[str, Any]] = deque(maxlen=RECOVERED_SHOWN)
        self._parts = trio.CapacityLimiter(PARTS_IN_FLIGHT)
        self.nursery: trio.Nursery | None = None  # set by run()
        self._orphans: list[tuple[str, str]] = []  # multipart uploads left by a crashed daemon
        #: called with an inode whose old cached data and kernel pages are no longer the file's
        self.on_replaced: Callable[[int], None] = lambda ino: None
        os.makedirs(staging_dir, mode=0o700, exist_ok=True)

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def staged_bytes(self) -> int:
        return sum(st.reserved for st in self.files.values())

    def size_of(self, ino: int) -> int | None:
        """The size of a file as written here, if it differs from its record's."""
        st = self.files.get(ino)
        return st.size if st is not None and st.materialized else None

    def _name(self, ino: int) -> str:
        rec = self.meta.get(ino)
        return rec.rel if rec is not None else f"inode {ino}"

    def _key(self, ino: int) -> str | None:
        rec = self.meta.get(ino)
        return None if rec is None else self.prefix + rec.rel

    def _update_gauges(self) -> None:
        metrics.write_staged_bytes.set(self.staged_bytes)

    async def _charge(self, st: Staged, new_size: int) -> None:
        """Grow (or shrink) the capacity charged for a staged file to ``new_size``."""
        delta = new_size - st.reserved
        if delta > 0:
            if not await self.cache.reserve(delta, evict=True, urgent=True):
                raise NoSpace(f"cache capacity ({self.cache.capacity} bytes) is taken by data "
                              "not yet uploaded")
        elif delta < 0:
            self.cache.unreserve(-delta)
        st.reserved = new_size
        self._update_gauges()

    # -- opening ----------------------------------------------------------------------------

    def create(self, rec: Record) -> Staged:
        """A new empty file (its record is local), open for writing: it is uploaded (empty or
        not) at its close."""
        st = self._new(rec.ino, 0)
        st.fd = os.open(st.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        st.dirty = True
        st.writers = 1
        self._journal(rec.ino)
        return st

    def _journal(self, ino: int, upload_id: str = "") -> None:
        """Record that ``ino`` has staged data not in the bucket. Beside the LMDB entry, the
        file's key goes to ``STAGING/<ino>.key``: if LMDB is ever lost (damaged and rebuilt),
        the staged data can still be uploaded where it belongs."""
        self.meta.journal_put(ino, upload_id)
        self._write_key(ino)

    def _write_key(self, ino: int) -> None:
        rec = self.meta.get(ino)
        if rec is None:
            return
        tmp = os.path.join(self.dir, f"{ino}.key.tmp")
        with open(tmp, "wb") as f:
            f.write(encode_name(rec.rel))
        os.replace(tmp, os.path.join(self.dir, f"{ino}.key"))

    def _unjournal(self, ino: int) -> None:
        self.meta.journal_delete(ino)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.dir, f"{ino}.key"))

    def renamed(self) -> None:
        """Names changed (a rename): the keys of files not yet uploaded follow."""
        for st in self.files.values():
            if st.dirty and not st.deleted:
                self._write_key(st.ino)

    def _new(self, ino: int, size: int) -> Staged:
        st = Staged(ino, os.path.join(self.dir, str(ino)), size)
        self.files[ino] = st
        return st

    async def open_write(self, rec: Record, truncate: bool) -> Staged:
        """Open an existing file for writing. Its current data is copied to the staging file
        only at the first write that needs it (an ``O_TRUNC`` open needs none)."""
        st = self.files.get(rec.ino)
        if st is None:
            st = self._new(rec.ino, rec.size)
        st.writers += 1
        if truncate:
            try:
                await self.truncate(st, rec, 0)
            except BaseException:
                await self.release(st)
                raise
        return st

    async def _materialize(self, st: Staged, rec: Record) -> None:
        """Copy the bucket's version of the file into its staging file (append or rewrite of
        an existing object), through the block reader: cached blocks cost no download."""
        if st.materialized:
            return
        await self._charge(st, rec.size)
        fd = os.open(st.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        key = self.prefix + rec.rel
        try:
            for block in range(block_count(rec.size) if rec.size else 0):
                ref = block_ref(rec.ino, rec.etag, rec.size, block, rec.mtime_ns)
                data = await self.reader.read(ref, key, 0, ref.size, count=False)
                await self._pwrite(fd, data, block * BLOCK_SIZE)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(st.path)
            await self._charge(st, 0)
            raise
        st.fd = fd
        st.size = rec.size

    async def _pwrite(self, fd: int, data: bytes, offset: int) -> None:
        def write() -> None:
            view = memoryview(data)
            pos = offset
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n

        try:
            await trio.to_thread.run_sync(write, limiter=self.cache.disk_limiter)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"staging disk full ({exc.strerror})") from None
            raise

    # -- writing ----------------------------------------------------------------------------

    async def write(self, st: Staged, rec: Record, offset: int, data: bytes) -> int:
        end = offset + len(data)
        if end > MAX_PARTS * PART_SIZE:
            raise TooLarge(f"files written through cachefs are limited to {MAX_PARTS * PART_SIZE} bytes")
        async with st.lock:
            await self._materialize(st, rec)
            if end > st.size:
                await self._charge(st, max(end, st.reserved))
            await self._pwrite(st.fd, data, offset)
            if end > st.size:
                st.size = end
            self._touch(st, offset, end)
        metrics.write_bytes.inc(len(data))
        self._upload_behind(st, offset)
        return len(data)

    def _touch(self, st: Staged, start: int, end: int) -> None:
        """Mark the parts of [start, end) written (a new generation). The first change after
        an upload journals the file and makes its record local, so that no listing replaces
        or removes it before its upload."""
        st.gen += 1
        if not st.dirty:
            self._journal(st.ino, st.upload_id or "")
            self.meta.set_file(st.ino, size=st.size, local=True)
            st.dirty = True
        for part in range(start // PART_SIZE, max(start, end - 1) // PART_SIZE + 1):
            st.part_gen[part] = st.gen

    async def truncate(self, st: Staged, rec: Record, size: int) -> None:
        if size > MAX_PARTS * PART_SIZE:
            raise TooLarge(f"files written through cachefs are limited to {MAX_PARTS * PART_SIZE} bytes")
        async with st.lock:
            if not st.materialized and size == 0:
                st.fd = os.open(st.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                st.size = 0
            else:
                await self._materialize(st, rec)
            if size > st.reserved:
                await self._charge(st, size)
            await trio.to_thread.run_sync(os.ftruncate, st.fd, size, limiter=self.cache.disk_limiter)
            old = st.size
            st.size = size
            if size < st.reserved:
                await self._charge(st, size)
            self._touch(st, min(old, size), max(old, size))

    def _upload_behind(self, st: Staged, offset: int) -> None:
        """Start the background upload of the part a sequential writer has just moved past
        (a write at ``offset`` starts the part after it). Parts written out of order are left
        to the commit: they may well be written again."""
        part = offset // PART_SIZE - 1
        if self.nursery is None or part < 0 or part in st.inflight or st.deleted:
            return
        gen = st.part_gen.get(part)
        done = st.parts.get(part)
        if gen is None or (done is not None and done[0] == gen):
            return
        st.inflight[part] = trio.Event()
        self.nursery.start_soon(self._background_part, st, part)

    async def _background_part(self, st: Staged, part: int) -> None:
        try:
            key = self._key(st.ino)
            if key is not None and not st.deleted:
                await self._upload_part(st, key, part)
        except Exception as exc:  # the next commit reports it (and starts the upload afresh)
            log.debug("background upload of part %d failed: %s", part + 1, exc)
            if isinstance(exc, BackendError):
                st.part_error = exc
        finally:
            st.inflight.pop(part).set()

    async def _upload_part(self, st: Staged, key: str, part: int) -> None:
        async with self._parts:
            async with st.session:
                if st.upload_id is None:
                    st.upload_id = await self.backend.start_upload(key)
                    self._journal(st.ino, st.upload_id)
            upload_id = st.upload_id
            gen = st.part_gen.get(part, 0)
            start = part * PART_SIZE
            length = min(PART_SIZE, st.size - start)
            if length <= 0:
                return
            data = await trio.to_thread.run_sync(os.pread, st.fd, length, start,
                                                 limiter=self.cache.disk_limiter)
            metrics.uploads_in_flight.inc()
            try:
                token = await self.backend.upload_part(key, upload_id, part + 1, data)
            finally:
                metrics.uploads_in_flight.dec()
            metrics.upload_bytes.inc(len(data))
            if st.upload_id == upload_id:
                st.parts[part] = (gen, len(data), token)

    # -- uploading --------------------------------------------------------------------------

    async def commit(self, st: Staged) -> None:
        """Make the bucket hold the staged bytes, within one ``--backend-timeout`` in all.
        Raises BackendError (or NoSpace/OSError from reading the staging file); the file then
        stays staged and dirty, and the error is kept for ``cachefs status``."""
        async with st.lock:
            timeout = self.backend.timeout
            try:
                with trio.move_on_after(timeout) as scope:
                    info = await self._commit(st)
                if scope.cancelled_caught:
                    raise TemporaryFailure(f"upload: no answer within {timeout:g} s")
            except BaseException as exc:
                if isinstance(exc, Exception):
                    st.error = str(exc) or type(exc).__name__
                    metrics.upload_failures.labels(_errno_label(exc)).inc()
                    log.warning("upload of %r failed: %s", self._name(st.ino), st.error)
                self._drop_session(st)
                raise
            if info is None:
                return
            st.dirty = False
            st.error = ""
            st.committed_at = time.monotonic()
            self.meta.set_file(st.ino, size=info.size, etag=info.etag, mtime=info.mtime, local=False,
                               seen=time.time())
            self._unjournal(st.ino)
            self.cache.drop_inodes([st.ino])  # the previous version's blocks
            self.on_replaced(st.ino)
            if st.recovered:
                rec = self.meta.get(st.ino)
                log.warning("recovered %r (%d bytes): uploaded", rec.rel if rec else st.ino, info.size)
                self.recovered.append({"name": rec.rel if rec else "", "size": info.size,
                                       "state": "recovered", "at": time.time()})
                st.recovered = False

    async def _commit(self, st: Staged) -> ObjectInfo | None:
        """The upload part of ``commit`` (None: nothing to upload). A part that failed in the
        background fails the commit at once with its error: uploading it again here would
        let one close take twice the timeout."""
        for ev in list(st.inflight.values()):
            await ev.wait()
        if st.deleted or not st.dirty:
            return None
        key = self._key(st.ino)
        if key is None:
            return None
        if st.part_error is not None:
            error, st.part_error = st.part_error, None
            raise error
        return await self._upload(st, key)

    async def _upload(self, st: Staged, key: str) -> ObjectInfo:
        size = st.size
        metrics.uploads_in_flight.inc()
        try:
            if size <= PART_SIZE:
                data = await trio.to_thread.run_sync(os.pread, st.fd, size, 0,
                                                     limiter=self.cache.disk_limiter) if size else b""
                info = await self.backend.put(key, data)
                metrics.upload_bytes.inc(size)
                self._drop_session(st)
                return info
        finally:
            metrics.uploads_in_flight.dec()
        nparts = (size + PART_SIZE - 1) // PART_SIZE
        try:
            async with trio.open_nursery() as nursery:
                for part in range(nparts):
                    done = st.parts.get(part)
                    length = min(PART_SIZE, size - part * PART_SIZE)
                    if done is None or done[0] != st.part_gen.get(part, 0) or done[1] != length:
                        nursery.start_soon(self._upload_part, st, key, part)
        except BaseExceptionGroup as group:
            raise _one(group) from None
        assert st.upload_id is not None
        parts = [(part + 1, st.parts[part][2]) for part in range(nparts)]
        info = await self.backend.complete_upload(key, st.upload_id, parts, size)
        st.upload_id = None
        st.parts.clear()
        return info

    def _drop_session(self, st: Staged) -> None:
        """Forget the open multipart upload (aborting it in the background)."""
        upload_id, st.upload_id = st.upload_id, None
        st.parts.clear()
        if upload_id is not None and self.nursery is not None:
            key = self._key(st.ino)
            if key is not None:
                self.nursery.start_soon(self._abort, key, upload_id)

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self.backend.abort_upload(key, upload_id)
        except BackendError as exc:
            log.debug("abort of an unfinished upload failed: %s", exc)

    # -- closing ----------------------------------------------------------------------------

    async def release(self, st: Staged) -> None:
        """A handle that could write is closed. The last one uploads what is still dirty
        (normally ``flush`` did already) and turns the staging file into cached blocks."""
        st.writers -= 1
        if st.writers > 0:
            return
        if st.dirty and not st.deleted:
            try:
                await self.commit(st)
            except Exception as exc:
                st.retry_at = time.monotonic() + RETRY_INTERVAL
                log.warning("upload of closed file %r failed (retrying every %.0f s): %s",
                            self._name(st.ino), RETRY_INTERVAL, exc)
                return
        await self._finish(st)

    async def _finish(self, st: Staged) -> None:
        """No writer left and nothing to upload: the staging file becomes cached data."""
        async with st.lock:
            await self._close(st)

    async def _close(self, st: Staged) -> None:
        """``_finish`` for a caller that holds ``st.lock``."""
        if st.writers > 0 or (st.dirty and not st.deleted) or self.files.get(st.ino) is not st:
            return
        del self.files[st.ino]
        if not st.materialized:
            return
        rec = None if st.deleted else self.meta.get(st.ino)
        reserved, st.reserved = st.reserved, 0
        kept = False
        if rec is not None and rec.size == st.size and not rec.local:
            self.cache.unreserve(reserved - st.size)  # the blocks take over the rest
            reserved = st.size
            kept = await trio.to_thread.run_sync(self.cache.adopt, rec.ino, rec.etag, st.fd,
                                                 rec.size, limiter=self.cache.disk_limiter)
        if not kept:
            self.cache.unreserve(reserved)
        os.close(st.fd)
        st.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(st.path)
        if st.deleted:
            self._unjournal(st.ino)
        self._update_gauges()

    async def discard(self, ino: int) -> None:
        """The file was unlinked (or replaced by a rename): never upload it. Open handles
        keep reading and writing the staging file until they close. The caller holds the
        file's lock (``lock_of``)."""
        st = self.files.get(ino)
        if st is None:
            return
        st.deleted = True
        self._drop_session(st)
        self._unjournal(ino)
        await self._close(st)

    def lock_of(self, ino: int) -> trio.Lock | None:
        """The lock a rename or unlink holds so that no upload of the file runs meanwhile."""
        st = self.files.get(ino)
        return None if st is None else st.lock

    # -- changes to names in the bucket ------------------------------------------------------

    async def put_marker(self, key: str) -> None:
        """An empty directory: a zero-byte object whose key ends in "/"."""
        await self.backend.put(key, b"")

    async def delete(self, key: str) -> None:
        await self.backend.delete(key)

    async def copy(self, src: str, dst: str, size: int) -> ObjectInfo:
        return await self.backend.copy(src, dst, size)

    async def keys_below(self, prefix: str, limit: int) -> list[tuple[str, int]]:
        """(key, size) of up to ``limit`` objects whose keys start with ``prefix``."""
        out: list[tuple[str, int]] = []
        token: str | None = None
        while len(out) < limit:
            page = await self.backend.list_page(prefix, None, token)
            out.extend((o.key, o.size) for o in page.objects)
            token = page.token
            if token is None:
                break
        return out[:limit]

    # -- reading what was written -------------------------------------------------------------

    async def read(self, ino: int, offset: int, size: int) -> bytes | None:
        """Bytes of a file from its staging file, or None if it has none."""
        st = self.files.get(ino)
        if st is None or not st.materialized:
            return None
        size = max(0, min(size, st.size - offset))
        if size == 0:
            return b""
        return await trio.to_thread.run_sync(os.pread, st.fd, size, offset,
                                             limiter=self.cache.disk_limiter)

    # -- background: writeback of open files, retries, recovery --------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            for key, upload_id in self._orphans:
                nursery.start_soon(self._abort, key, upload_id)
            self._orphans.clear()
            while True:
                await trio.sleep(TICK)
                now = time.monotonic()
                for st in list(self.files.values()):
                    if st.deleted or st.lock.locked():
                        continue
                    if st.dirty and st.writers > 0:
                        due = self.writeback_interval > 0 and now - st.committed_at >= self.writeback_interval
                    elif st.dirty:
                        due = now >= st.retry_at
                    else:
                        due = st.writers == 0
                    if due:
                        nursery.start_soon(self._background_commit, st)

    async def _background_commit(self, st: Staged) -> None:
        try:
            if st.dirty:
                await self.commit(st)
                log.debug("wrote back inode %d (%d bytes)", st.ino, st.size)
        except Exception as exc:
            st.retry_at = time.monotonic() + RETRY_INTERVAL
            st.committed_at = time.monotonic()  # an open file waits a whole interval again
            log.warning("background upload of %r failed (will retry): %s", self._name(st.ino), exc)
            return
        if st.writers == 0:
            await self._finish(st)

    def recover(self) -> list[str]:
        """Take over the journal left by a daemon that stopped before uploading everything:
        each file with staged data is uploaded by the background loop. Staged files whose
        journal entry was lost with a damaged LMDB are found by their ``.key`` files and
        staged again. Returns the names of the files to upload."""
        self._adopt_orphans()
        names = []
        for ino, upload_id in self.meta.journal():
            path = os.path.join(self.dir, str(ino))
            rec = self.meta.get(ino)
            if rec is None or not os.path.exists(path):
                self._unjournal(ino)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            st = self._new(ino, os.path.getsize(path))
            st.fd = os.open(path, os.O_RDWR)
            st.dirty = st.recovered = True
            st.reserved = st.size
            self.cache.charge(st.size)
            self.meta.set_file(ino, size=st.size, local=True)
            if upload_id:  # its parts are unknown: abort it once the loop runs, start afresh
                self._orphans.append((self.prefix + rec.rel, upload_id))
            names.append(rec.rel)
            log.warning("recovered %r (%d bytes) written before the daemon stopped: uploading",
                        rec.rel, st.size)
            self.recovered.append({"name": rec.rel, "size": st.size, "state": "uploading",
                                   "at": time.time()})
        for name in os.listdir(self.dir):  # staging files (and keys) without a journal entry
            if name.partition(".")[0] not in {str(ino) for ino in self.files}:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir, name))
        self._update_gauges()
        return names

    def _adopt_orphans(self) -> None:
        journaled = {ino for ino, _ in self.meta.journal()}
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".key") or not name[:-4].isdigit() or int(name[:-4]) in journaled:
                continue
            old = int(name[:-4])
            data = os.path.join(self.dir, str(old))
            if not os.path.exists(data):
                continue
            with open(os.path.join(self.dir, name), "rb") as f:
                rel = decode_name(f.read())
            now = time.time()
            self.meta.ingest([(rel, os.path.getsize(data), "", now)], [], now)
            rec = self.meta.resolve(rel)
            if rec is None or rec.is_dir:
                log.error("staged data for %r cannot be shown under that name; kept in %s", rel, data)
                continue
            if rec.ino != old:
                os.replace(data, os.path.join(self.dir, str(rec.ino)))
                os.unlink(os.path.join(self.dir, name))
            self.meta.set_file(rec.ino, size=os.path.getsize(os.path.join(self.dir, str(rec.ino))),
                               local=True)
            self._journal(rec.ino)
            log.warning("staged data of %r found after the cache index was rebuilt: uploading", rel)

    def pending(self) -> list[dict[str, Any]]:
        """Files with data not yet in the bucket, for `cachefs status`."""
        out = []
        for st in self.files.values():
            if not st.dirty or st.deleted:
                continue
            rec = self.meta.get(st.ino)
            state = ("recovered" if st.recovered else "writing" if st.writers else
                     "uploading" if st.lock.locked() else "retrying")
            out.append({"name": rec.rel if rec else "", "size": st.size, "state": state,
                        "error": st.error})
        return out


def _one(group: BaseExceptionGroup) -> BaseException:
    """The error to report for a group of failed part uploads: the first that is ours."""
    errors = list(_leaves(group))
    for exc in errors:
        if isinstance(exc, NoSpace | BackendError):
            return exc
    return errors[0]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _errno_label(exc: BaseException) -> str:
    if isinstance(exc, NoSpace):
        return "ENOSPC"
    if isinstance(exc, ObjectChanged):
        return "ESTALE"
    if isinstance(exc, OSError) and exc.errno:
        return metrics.errno_name(exc.errno)
    return "EIO"
