"""What the filesystem does, independent of FUSE: names, handles, and errno.

The pyfuse3 adapter (``adapter``) only converts types; everything here can be driven from a
test inside ``trio.run`` without a mount. The core never talks to a backend: listings come from
``metadata.listing.Lister``, bytes from ``cache.reader.BlockReader``, and everything written
(data, directories, renames, deletions) goes through ``cache.writer.Writer``. Exceptions of
those layers become an errno here, in ``_errno`` (the one table), as ``FsError``.

Concurrency protocol (what may interleave at an ``await``):
- A read-write mount hands out a handle per open file, which pins the object's ETag: every
  block it reads is fetched with If-Match on that ETag, so a reader never gets a mix of two
  versions. If the object changed in the bucket, the read fails with ESTALE and the record is
  refreshed so the next open sees the new version. When this mount uploads a new version of a
  file, open handles move to it (they read what was written here, as POSIX says).
- A read-only mount runs in the kernel's no-open mode (see ``fs.adapter``): no handles, reads
  come by inode (``read_inode``). The inode's record as of the read decides the version, with
  If-Match on its ETag as above; a sequential reader that was reading the previous version
  when the record changed gets ESTALE at its next read rather than the new version's bytes.
- Renames, unlinks and truncates of a file with staged data hold its ``Staged.lock``, so no
  upload of it runs meanwhile (an upload never lands under a name the file has left, nor
  resurrects a deleted file). Namespace changes (create, mkdir, rmdir, unlink, rename) are
  serialized by ``_namespace`` so that checks ("is the name free?", "is the directory empty?")
  still hold when the change is made.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import trio

from ..cache.reader import BlockReader, Readahead, block_ref
from ..cache.store import BLOCK_SIZE
from ..cache.writer import NoSpace, Staged, TooLarge, Writer
from ..errors import AccessDenied, BackendError, NotFound, ObjectChanged
from ..metadata import ROOT_INODE, Kind, MetadataStore, Record
from ..metadata.listing import Lister
from ..metadata.names import NAME_MAX, decode_name

log = logging.getLogger(__name__)

# The kernel retries a failed read at once (its readahead failed, then it reads the page itself):
# a block whose download failed for this file less than this long ago gets RETRY_GRACE to succeed
# rather than another --backend-timeout, so one read() fails within the timeout.
FAILED_READ_MEMORY = 1.0
RETRY_GRACE = 0.5  # how long such a block's second attempt may take before it fails
# Read-only mounts: per-inode read state (readahead window, blocks counted, the version being
# read) is kept for the inodes read most recently. Bounded: it is a hint, not a handle.
READ_STATES_KEPT = 4096
RENAME_DIR_LIMIT = 1000  # objects a directory rename may copy (default of --rename-dir-limit)
RENAME_COPIES = 16  # server-side copies in flight during a directory rename
RENAME_NOREPLACE = 1  # renameat2 flags (linux/fs.h)
RENAME_EXCHANGE = 2


class FsError(Exception):
    """An error with an errno, raised by the core for the adapter to pass on."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code


def _errno(exc: BaseException) -> int | None:
    """The errno a caller sees for an exception of a lower layer (None: not ours to map)."""
    if isinstance(exc, NoSpace):
        return errno.ENOSPC
    if isinstance(exc, TooLarge):
        return errno.EFBIG
    if isinstance(exc, ObjectChanged):
        return errno.ESTALE
    if isinstance(exc, NotFound):
        return errno.ENOENT
    if isinstance(exc, AccessDenied):
        return errno.EACCES
    if isinstance(exc, BackendError | OSError):
        return errno.EIO
    return None


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except FsError:
        raise
    except Exception as exc:
        code = _errno(exc)
        if code is None:
            raise
        if code == errno.EIO:
            log.warning("%s", exc)
        raise FsError(code, str(exc)) from exc


@dataclass
class Settings:
    metadata_ttl: float = 86400.0
    uid: int = 0
    gid: int = 0
    file_mode: int = 0o444
    dir_mode: int = 0o555
    #: shown as the time of directories, which object stores do not have
    dir_mtime_ns: int = field(default_factory=lambda: time.time_ns())
    rename_dir_limit: int = RENAME_DIR_LIMIT


@dataclass
class Handle:
    record: Record  # as of open (or of this mount's last upload): reads are pinned to its ETag
    ahead: Readahead = field(default_factory=Readahead)
    counted: set[int] = field(default_factory=set)  # blocks already counted as a hit or a miss
    failed: dict[int, float] = field(default_factory=dict)  # block -> when its download gave EIO
    staged: Staged | None = None  # set for handles that may write


class CoreFS:
    def __init__(self, lister: Lister, reader: BlockReader, writer: Writer | None,
                 settings: Settings) -> None:
        self.lister = lister
        self.meta: MetadataStore = lister.meta
        self.reader = reader
        self.cache = reader.cache
        self.writer = writer
        self.settings = settings
        self.handles: dict[int, Handle] = {}
        self._fh = 0
        self._namespace = trio.Lock()
        self._pinned_stale: set[int] = set()  # changed files whose old data open handles read
        self._reading: collections.OrderedDict[int, Handle] = collections.OrderedDict()  # no-open
        if writer is not None:
            writer.on_replaced = self._replaced

    @property
    def writable(self) -> bool:
        return self.writer is not None

    # -- attributes and names ---------------------------------------------------------------

    def record(self, ino: int) -> Record:
        rec = self.meta.get(ino)
        if rec is None:
            for h in self.handles.values():  # an unlinked file that is still open
                if h.record.ino == ino:
                    rec = h.record
                    break
            else:
                raise FsError(errno.ENOENT)
        return self.current(rec)

    def attributes(self, ino: int) -> Record:
        """The record behind a GETATTR. The kernel caches directory entries, so a directory's
        attributes (here, or by a lookup of its name) are what it asks about a directory it has
        listed: a directory past its TTL is listed again then, in the background, and the
        kernel's copy of its entries is dropped if that relist finds any added or removed."""
        rec = self.record(ino)
        if rec.is_dir:
            self.lister.revalidate(rec)
        return rec

    def current(self, rec: Record) -> Record:
        """The record as readers here see it: with the size of data written and not uploaded."""
        if self.writer is not None and not rec.is_dir:
            size = self.writer.size_of(rec.ino)
            if size is not None:
                rec.size = size
        return rec

    async def listed(self, ino: int) -> Record:
        """A directory's record, with a complete, fresh listing."""
        rec = self.record(ino)
        if not rec.is_dir:
            raise FsError(errno.ENOTDIR)
        with _errors():
            return await self.lister.ensure_listed(rec)

    async def lookup(self, parent: int, name: bytes) -> Record:
        if name.startswith(b".cachefs-health"):
            raise FsError(errno.ENOENT)  # health probe: answered without touching the bucket
        prec = self.record(parent)
        if not prec.is_dir:
            raise FsError(errno.ENOTDIR)
        with _errors():
            rec = await self.lister.lookup(prec, name)
        if rec is None:
            raise FsError(errno.ENOENT)
        if rec.is_dir:
            self.lister.revalidate(rec)  # the kernel may hold its entries: see ``attributes``
        return self.current(rec)

    async def readdir(self, ino: int, after: bytes | None, limit: int) -> list[tuple[bytes, Record]]:
        if after is None:
            await self.listed(ino)
        elif not self.record(ino).is_dir:
            raise FsError(errno.ENOTDIR)
        return [(e.name, self.current(e.record)) for e in self.meta.children(ino, after, limit)]

    async def walk(self, top: int = ROOT_INODE) -> None:
        await self.lister.walk(top)

    # -- reading ----------------------------------------------------------------------------

    def _new_handle(self, handle: Handle) -> int:
        self._fh += 1
        self.handles[self._fh] = handle
        return self._fh

    def open(self, ino: int) -> int:
        """Open for reading."""
        rec = self.record(ino)
        if rec.is_dir:
            raise FsError(errno.EISDIR)
        return self._new_handle(Handle(rec))

    def _handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return await self._read(self._handle(fh), offset, size)

    async def read_inode(self, ino: int, offset: int, size: int) -> bytes:
        """A read without an open handle (the kernel's no-open mode, read-only mounts): the
        inode's current record decides the version. A reader that was reading the previous
        version sequentially, and now asks for the bytes that follow, gets ESTALE instead of
        the new version's (a reader starting anew, at 0 or elsewhere, reads the new one)."""
        rec = self.record(ino)
        if rec.is_dir:
            raise FsError(errno.EISDIR)
        state = self._reading.get(ino)
        if state is None or state.record.etag != rec.etag:
            if state is not None and 0 < offset == state.ahead.next_offset:
                # kept as it is: the same reader's next attempt fails too, until a new pass
                raise FsError(errno.ESTALE, "object changed in the bucket while being read")
            state = self._reading[ino] = Handle(rec)
            if len(self._reading) > READ_STATES_KEPT:
                self._reading.popitem(last=False)
        else:
            self._reading.move_to_end(ino)
            state.record = rec
            if offset == 0:
                state.counted.clear()  # a new pass over the file (its pages left the kernel)
        return await self._read(state, offset, size)

    async def _read(self, handle: Handle, offset: int, size: int) -> bytes:
        rec = handle.record
        if self.writer is not None:
            with _errors():
                data = await self.writer.read(rec.ino, offset, size)
            if data is not None:
                return data
        end = min(offset + size, rec.size)
        if offset >= end:
            return b""
        key = self.lister.key(rec)
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        self.reader.readahead(handle.ahead, rec.ino, rec.etag, rec.size, rec.mtime_ns, key, offset, last)
        parts = []
        for block in range(first, last + 1):
            bstart = block * BLOCK_SIZE
            lo, hi = max(offset, bstart) - bstart, min(end, bstart + BLOCK_SIZE) - bstart
            parts.append(await self._read_block(handle, key, block, lo, hi - lo))
        handle.ahead.next_offset = end
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_block(self, handle: Handle, key: str, block: int, lo: int, length: int) -> bytes:
        """Bytes [lo, lo+length) of one block. Hits and misses are counted once per block per
        open file, so a 110 KB file read in two requests is one miss, not a miss and a hit."""
        rec = handle.record
        ref = block_ref(rec.ino, rec.etag, rec.size, block, rec.mtime_ns)
        count = block not in handle.counted
        handle.counted.add(block)
        failed_at = handle.failed.get(block)
        retried = failed_at is not None and time.monotonic() - failed_at < FAILED_READ_MEMORY \
            and not self.reader.cached(ref)
        try:
            if not retried:
                return await self.reader.read(ref, key, lo, length, count=count)
            # The kernel's retry, or a reader coming back just after: the store gets a moment to
            # answer (it may be back), not another --backend-timeout. The download goes on in
            # the background either way.
            with trio.move_on_after(RETRY_GRACE):
                return await self.reader.read(ref, key, lo, length, count=count)
            raise FsError(errno.EIO, "the backend failed this read a moment ago")
        except ObjectChanged:
            with _errors():
                await self.lister.refresh(rec.ino)
            raise FsError(errno.ESTALE, "object changed in the bucket") from None
        except BackendError as exc:
            handle.failed[block] = time.monotonic()
            raise FsError(errno.EIO, str(exc)) from None

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        ino = handle.record.ino
        if ino in self._pinned_stale and not any(h.record.ino == ino for h in self.handles.values()):
            self._pinned_stale.discard(ino)
            rec = self.meta.get(ino)
            self.cache.drop_inodes([ino], keep={ino: rec.etag} if rec is not None else None)
        if handle.staged is not None and self.writer is not None:
            with _errors():
                await self.writer.release(handle.staged)

    def stale(self, inos: list[int]) -> None:
        """These files changed or vanished in the bucket: drop their cached data, except where
        an open handle still reads the old version (it is dropped when the last one closes):
        a file opened just before a relist noticed the change reads the old version whole
        instead of failing with ESTALE."""
        open_inos = {h.record.ino for h in self.handles.values()}
        now = [ino for ino in inos if ino not in open_inos]
        self._pinned_stale.update(ino for ino in inos if ino in open_inos)
        self.cache.drop_inodes(now)
        for ino in inos:
            self.reader.forget(ino)

    def _replaced(self, ino: int) -> None:
        """This mount uploaded a new version of ``ino``: open handles read that one now."""
        rec = self.meta.get(ino)
        self.reader.forget(ino)
        if rec is None:
            return
        for h in self.handles.values():
            if h.record.ino == ino:
                h.record = rec
                h.counted.clear()

    # -- writing (read-write mounts) ----------------------------------------------------------

    def _writer(self) -> Writer:
        if self.writer is None:
            raise FsError(errno.EROFS)
        return self.writer

    async def open_write(self, ino: int, truncate: bool) -> int:
        writer = self._writer()
        rec = self.record(ino)
        if rec.is_dir:
            raise FsError(errno.EISDIR)
        with _errors():
            staged = await writer.open_write(rec, truncate)
        return self._new_handle(Handle(self.record(ino), staged=staged))

    async def create(self, parent: int, name: bytes) -> tuple[int, Record]:
        writer = self._writer()
        _check_name(name)
        async with self._namespace:
            await self.listed(parent)
            if self.meta.lookup(parent, name) is not None:
                raise FsError(errno.EEXIST)
            rec = self.meta.create(parent, decode_name(name), Kind.FILE, local=True, now=time.time())
            try:
                staged = writer.create(rec)
            except OSError:
                self.meta.remove(rec.ino)
                raise
        return self._new_handle(Handle(rec, staged=staged)), rec

    def _staged(self, fh: int) -> tuple[Handle, Staged]:
        handle = self._handle(fh)
        if handle.staged is None:
            raise FsError(errno.EBADF)
        return handle, handle.staged

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle, staged = self._staged(fh)
        with _errors():
            return await self._writer().write(staged, self.record(handle.record.ino), offset, data)

    async def flush(self, fh: int) -> None:
        """``close()`` of a descriptor: what it wrote is in the bucket when this returns."""
        handle = self._handle(fh)
        if handle.staged is not None and handle.staged.dirty:
            with _errors():
                await self._writer().commit(handle.staged)

    fsync = flush

    async def truncate(self, ino: int, size: int, fh: int | None) -> Record:
        writer = self._writer()
        rec = self.record(ino)
        if rec.is_dir:
            raise FsError(errno.EISDIR)
        handle = self.handles.get(fh) if fh is not None else None
        with _errors():
            if handle is not None and handle.staged is not None:
                await writer.truncate(handle.staged, rec, size)  # uploaded at its close
            else:
                staged = await writer.open_write(rec, truncate=False)  # truncate(2): now
                try:
                    await writer.truncate(staged, rec, size)
                    await writer.commit(staged)
                finally:
                    await writer.release(staged)
        return self.record(ino)

    async def mkdir(self, parent: int, name: bytes) -> Record:
        writer = self._writer()
        _check_name(name)
        async with self._namespace:
            prec = await self.listed(parent)
            if self.meta.lookup(parent, name) is not None:
                raise FsError(errno.EEXIST)
            rel = prec.rel + decode_name(name) + "/"
            with _errors():
                await writer.put_marker(self.lister.prefix + rel)
            return self.meta.create(parent, decode_name(name), Kind.DIR, local=False, now=time.time())

    async def rmdir(self, parent: int, name: bytes) -> None:
        writer = self._writer()
        async with self._namespace:
            rec = await self.lookup(parent, name)
            if not rec.is_dir:
                raise FsError(errno.ENOTDIR)
            await self.listed(rec.ino)
            if self.meta.children(rec.ino, None, 1):
                raise FsError(errno.ENOTEMPTY)
            with _errors():
                await writer.delete(self.lister.key(rec))  # the marker, if there is one
            self.meta.remove(rec.ino)

    async def unlink(self, parent: int, name: bytes) -> None:
        writer = self._writer()
        async with self._namespace:
            rec = await self.lookup(parent, name)
            if rec.is_dir:
                raise FsError(errno.EISDIR)
            async with self._file_lock(rec.ino):
                with _errors():
                    await self._remove_file(rec, writer)
                self.meta.remove(rec.ino)

    async def _remove_file(self, rec: Record, writer: Writer) -> None:
        """Delete a file's object (if it has one) and its staged and cached data."""
        for h in self.handles.values():
            if h.record.ino == rec.ino:
                h.record = rec  # still readable through open descriptors (from the staging file)
        await writer.discard(rec.ino)
        if not rec.local:
            await writer.delete(self.lister.key(rec))
        self.cache.drop_inodes([rec.ino])
        self.reader.forget(rec.ino)

    @contextlib.asynccontextmanager
    async def _file_lock(self, ino: int | None) -> AsyncIterator[None]:
        lock = self.writer.lock_of(ino) if self.writer is not None and ino is not None else None
        if lock is None:
            yield
        else:
            async with lock:
                yield

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
                     flags: int) -> None:
        writer = self._writer()
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        _check_name(name_new)
        async with self._namespace:
            src = await self.lookup(parent_old, name_old)
            dparent = await self.listed(parent_new)
            dst = self.meta.lookup(parent_new, name_new)
            if dst is not None and dst.ino == src.ino:
                return
            if dst is not None and flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            new_rel = dparent.rel + decode_name(name_new) + ("/" if src.is_dir else "")
            if src.is_dir:
                if dst is not None:
                    if not dst.is_dir:
                        raise FsError(errno.ENOTDIR)
                    await self.listed(dst.ino)
                    if self.meta.children(dst.ino, None, 1):
                        raise FsError(errno.ENOTEMPTY)
                if new_rel.startswith(src.rel):
                    raise FsError(errno.EINVAL, "cannot move a directory into itself")
                copies = await self._rename_dir(src, new_rel, writer)
            else:
                if dst is not None and dst.is_dir:
                    raise FsError(errno.EISDIR)
                await self._rename_file(src, dst, new_rel, writer)
            self.meta.move(src.ino, parent_new, decode_name(name_new))
            if src.is_dir:  # a copy may have a new ETag (Azure, multipart S3 objects, file://)
                for rec in self.meta.iter_subtree(src.ino):
                    copied = copies.get(rec.rel)
                    if copied is not None and not rec.is_dir and not rec.local and copied[1] != rec.etag:
                        size, etag, mtime = copied
                        self.cache.retag(rec.ino, rec.etag, etag)
                        self.meta.set_file(rec.ino, size=size, etag=etag, mtime=mtime)
            for h in self.handles.values():  # open files read from their new names
                moved = self.meta.get(h.record.ino)
                if moved is not None:
                    h.record.rel = moved.rel
            writer.renamed()

    async def _rename_file(self, src: Record, dst: Record | None, new_rel: str, writer: Writer) -> None:
        prefix = self.lister.prefix
        async with self._file_lock(src.ino), self._file_lock(dst.ino if dst else None):
            staged = writer.files.get(src.ino)
            with _errors():
                if dst is not None:
                    await writer.discard(dst.ino)
                    self.cache.drop_inodes([dst.ino])
                if staged is not None and staged.dirty:
                    # Not in the bucket as it is here: its next upload goes to the new name.
                    if not src.local:
                        await writer.delete(prefix + src.rel)
                elif not src.local:
                    info = await writer.copy(prefix + src.rel, prefix + new_rel, src.size)
                    await writer.delete(prefix + src.rel)
                    if info.etag != src.etag:
                        self.cache.retag(src.ino, src.etag, info.etag)
                    self.meta.set_file(src.ino, size=info.size, etag=info.etag, mtime=info.mtime)
                    self._replaced(src.ino)

    async def _rename_dir(self, src: Record, new_rel: str, writer: Writer) -> dict[str, tuple[int, str, float]]:
        """Copy every object below the directory to the new name, then delete the old ones.
        Not atomic for other mounts (an object store has no directories); limited to
        ``rename_dir_limit`` objects so that a mistaken ``mv`` cannot start copying a dataset.
        Returns what each copy became, by its new path relative to the mount root."""
        prefix = self.lister.prefix
        limit = self.settings.rename_dir_limit
        with _errors():
            keys = await writer.keys_below(prefix + src.rel, limit + 1)
        if len(keys) > limit:
            log.warning("rename of directory %r refused: more than %d objects (--rename-dir-limit); "
                        "mv copies it instead", src.rel, limit)
            raise FsError(errno.EXDEV)
        staged = [st for st in (writer.files.get(r.ino) for r in self.meta.iter_subtree(src.ino))
                  if st is not None]
        async with contextlib.AsyncExitStack() as stack:
            for st in staged:
                await stack.enter_async_context(st.lock)
            old, new = prefix + src.rel, prefix + new_rel
            copies: dict[str, tuple[int, str, float]] = {}  # new path -> (size, etag, mtime)
            with _errors():
                limiter = trio.CapacityLimiter(RENAME_COPIES)

                async def move(key: str, size: int) -> None:
                    async with limiter:
                        dst = new + key[len(old):]
                        if key.endswith("/"):  # a directory marker: some stores cannot copy one
                            await writer.put_marker(dst)
                        else:
                            info = await writer.copy(key, dst, size)
                            copies[dst[len(prefix):]] = (info.size, info.etag, info.mtime)

                async with trio.open_nursery() as nursery:
                    for key, size in keys:
                        nursery.start_soon(move, key, size)
                async with trio.open_nursery() as nursery:
                    for key, _ in keys:
                        nursery.start_soon(writer.delete, key)
                # Directory markers, deepest first (a local directory must be empty to go).
                dirs = [r.rel for r in self.meta.iter_subtree(src.ino) if r.is_dir] + [src.rel]
                for rel in sorted(set(dirs) - {k[len(prefix):] for k, _ in keys}, key=len, reverse=True):
                    await writer.delete(prefix + rel)
        return copies

    # -- setattr and statfs -----------------------------------------------------------------

    def statfs(self) -> tuple[int, int, int, int]:
        """(total bytes, free bytes, files, free files) for ``df``. A read-only mount is full;
        a read-write mount has room for what the staging disk and the cache capacity can take."""
        files, size = self.meta.totals()
        if self.writer is None:
            return size, 0, files, 0
        cache = self.cache
        disk = os.statvfs(cache.root)
        disk_free = disk.f_bavail * disk.f_frsize
        room = max(0, cache.capacity - self.writer.staged_bytes)
        return cache.capacity, min(disk_free, room), files, disk.f_favail


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if b"/" in name or b"\0" in name or name in (b"", b".", b".."):
        raise FsError(errno.EINVAL)
