"""The pyfuse3 adapter: converts types and maps exceptions to errno, in one place.

Every handler runs through ``_op``: an ``FsError`` becomes its errno, an unexpected exception is
logged with its traceback and becomes EIO, and nothing else escapes. Inodes are persistent (they
live in LMDB and are never reused), so lookup counts need no bookkeeping and ``forget`` is a
no-op.

Kernel caching: entries and attributes are cached for the metadata TTL, and the kernel runs in
its no-opendir mode (``opendir`` answers ENOSYS): it sends no OPENDIR or RELEASEDIR, caches each
directory's entries, and asks again only once the daemon drops its copy (a relist that added or
removed entries) or local changes do. Read-only mounts also run in no-open mode (``open``
answers ENOSYS): no OPEN, RELEASE or FLUSH, and file pages stay cached across opens, so a warm
open + read + close costs the daemon no request. Both need the patched pyfuse3
(``third_party/``): with ``inode_as_fh``, ``read`` and ``readdir`` get the inode where the kernel
has no handle to give. Read-write mounts open files with handles (writes need them), with
``keep_cache``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Sequence

import pyfuse3
from pyfuse3 import EntryAttributes, FileHandleT, FileInfo, InodeT, StatvfsData

from .. import metrics
from ..metadata import Record
from ..metadata.names import encode_name
from ..metadata.store import CORRUPTION
from .core import CoreFS, FsError

log = logging.getLogger(__name__)

CONTROL_XATTR = b"user.cachefs.control"
BLKSIZE = 128 * 1024  # what stat reports as the preferred I/O size: one FUSE read request
READDIR_BATCH = 64  # entries decoded per step; one kernel readdir buffer (4 KiB) holds ~25-30
STATFS_BLOCK = 4096
DIR_OFFSETS_KEPT = 16384  # readdir offsets whose names are remembered (see ``_resume_after``)
ENTRY_OFFSET = 2  # readdir offsets: 1 after ".", 2 after "..", entry inode + ENTRY_OFFSET after an entry


class CachefsOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    # Where the kernel has no handle to give (no-open and no-opendir modes), handlers get the
    # inode instead (patched pyfuse3). Handles handed out by ``open`` start at 1, never 0.
    inode_as_fh = True

    def __init__(self, core: CoreFS, control_path: str) -> None:
        super().__init__()
        self.core = core
        self.control_path = control_path.encode()
        self.no_open = not core.writable
        #: (directory, readdir offset) -> entry name, for offsets whose entry has left meanwhile
        self._offsets: collections.OrderedDict[tuple[int, int], bytes] = collections.OrderedDict()

    @contextlib.asynccontextmanager
    async def _op(self, name: str) -> AsyncIterator[None]:
        start = time.monotonic()
        metrics.fuse_operations.labels(name).inc()
        try:
            yield
        except FsError as exc:
            metrics.fuse_errors.labels(name, metrics.errno_name(exc.errno)).inc()
            if exc.errno not in (errno.ENOENT, errno.ENODATA):
                log.debug("%s: %s", name, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except pyfuse3.FUSEError as exc:
            metrics.fuse_errors.labels(name, metrics.errno_name(exc.errno)).inc()
            raise
        except CORRUPTION as exc:  # the LMDB index is damaged: noted, rebuilt at the next start
            metrics.fuse_errors.labels(name, "EIO").inc()
            self.core.meta.note_damage(exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            metrics.fuse_errors.labels(name, "EIO").inc()
            log.exception("unexpected error in %s", name)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            metrics.fuse_duration.labels(name).observe(time.monotonic() - start)

    def _attr(self, rec: Record) -> EntryAttributes:
        s = self.core.settings
        attr = EntryAttributes()
        attr.st_ino = InodeT(rec.ino)
        attr.generation = 0
        ttl = s.metadata_ttl
        attr.entry_timeout = ttl
        attr.attr_timeout = ttl
        if rec.is_dir:
            attr.st_mode = stat.S_IFDIR | s.dir_mode
            attr.st_nlink = 2
            attr.st_size = 0
        else:
            attr.st_mode = stat.S_IFREG | s.file_mode
            attr.st_nlink = 1
            attr.st_size = rec.size
        attr.st_uid = s.uid
        attr.st_gid = s.gid
        attr.st_blksize = BLKSIZE
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = rec.mtime_ns or s.dir_mtime_ns
        return attr

    async def lookup(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> EntryAttributes:
        async with self._op("lookup"):
            if name == b".":
                return self._attr(self.core.record(parent_inode))
            if name == b"..":
                return self._attr(self.core.record(self.core.record(parent_inode).parent))
            return self._attr(await self.core.lookup(parent_inode, name))
        raise AssertionError("unreachable")

    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext | None = None) -> EntryAttributes:
        async with self._op("getattr"):
            return self._attr(self.core.attributes(inode))
        raise AssertionError("unreachable")

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        return None

    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        # The kernel's no-opendir mode, from this first call on: directory entries cached.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # ``fh`` is the directory's inode (no-opendir mode). Offsets: 0 the start, 1 after ".",
        # 2 after "..", then an entry's inode + 2 after that entry. Entries are in name order,
        # so a listing resumes after that entry's name, even if it was removed meanwhile.
        async with self._op("readdir"):
            ino = int(fh)
            rec = self.core.record(ino)
            if start_id == 0:
                if not pyfuse3.readdir_reply(token, b".", self._attr(rec), 1):
                    return
                start_id = 1
            if start_id == 1:
                parent = self.core.record(rec.parent)
                if not pyfuse3.readdir_reply(token, b"..", self._attr(parent), 2):
                    return
                start_id = 2
            after = None if start_id == 2 else self._resume_after(ino, start_id)
            while True:
                batch = await self.core.readdir(ino, after, READDIR_BATCH)
                if not batch:
                    return
                for name, child in batch:
                    offset = child.ino + ENTRY_OFFSET
                    self._offsets[(ino, offset)] = name
                    if len(self._offsets) > DIR_OFFSETS_KEPT:
                        self._offsets.popitem(last=False)
                    if not pyfuse3.readdir_reply(token, name, self._attr(child), offset):
                        return
                after = batch[-1][0]

    def _resume_after(self, ino: int, offset: int) -> bytes:
        """The name of the entry a readdir offset follows: the entry's own record while it is
        still in the directory, else the name remembered when the offset was handed out."""
        child = self.core.meta.get(offset - ENTRY_OFFSET)
        if child is not None and child.parent == ino:
            return encode_name(child.name)
        name = self._offsets.get((ino, offset))
        if name is None:
            raise FsError(errno.EINVAL, "readdir offset no longer known (seekdir too far back?)")
        return name

    async def open(self, inode: InodeT, flags: int, ctx: pyfuse3.RequestContext) -> FileInfo:
        if self.no_open:
            # The kernel's no-open mode, from this first call on: no OPEN, RELEASE or FLUSH,
            # pages kept across opens; reads come with the inode (``inode_as_fh``).
            raise pyfuse3.FUSEError(errno.ENOSYS)
        async with self._op("open"):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                fh = await self.core.open_write(inode, truncate=bool(flags & os.O_TRUNC))
            else:
                fh = self.core.open(inode)
            return FileInfo(fh=FileHandleT(fh), keep_cache=True)
        raise AssertionError("unreachable")

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        async with self._op("read"):
            if self.no_open:
                return await self.core.read_inode(int(fh), off, size)  # fh is the inode
            return await self.core.read(fh, off, size)
        raise AssertionError("unreachable")

    async def release(self, fh: FileHandleT) -> None:
        async with self._op("release"):
            await self.core.release(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> StatvfsData:
        async with self._op("statfs"):
            total, free, files, ffree = self.core.statfs()
            st = StatvfsData()
            st.f_bsize = STATFS_BLOCK
            st.f_frsize = STATFS_BLOCK
            st.f_blocks = (total + STATFS_BLOCK - 1) // STATFS_BLOCK
            st.f_bfree = st.f_bavail = free // STATFS_BLOCK
            st.f_files = files + ffree
            st.f_ffree = st.f_favail = ffree
            st.f_namemax = 255
            return st
        raise AssertionError("unreachable")

    async def getxattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        async with self._op("getxattr"):
            if inode == pyfuse3.ROOT_INODE and name == CONTROL_XATTR:
                return self.control_path
            raise FsError(errno.ENODATA)
        raise AssertionError("unreachable")

    async def listxattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return [CONTROL_XATTR] if inode == pyfuse3.ROOT_INODE else []

    # -- writes: the core answers EROFS on a read-only mount (which the kernel mostly refuses
    # itself, as the mount is "ro") ----------------------------------------------------------

    async def create(self, parent_inode: InodeT, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[FileInfo, EntryAttributes]:
        async with self._op("create"):
            if not stat.S_ISREG(mode):
                raise FsError(errno.EPERM, "only regular files can be created")
            fh, rec = await self.core.create(parent_inode, name)
            return FileInfo(fh=FileHandleT(fh), keep_cache=True), self._attr(rec)
        raise AssertionError("unreachable")

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        async with self._op("write"):
            return await self.core.write(fh, off, buf)
        raise AssertionError("unreachable")

    async def flush(self, fh: FileHandleT) -> None:
        async with self._op("flush"):
            if not self.core.writable:
                # ENOSYS: the kernel stops sending FLUSH at every close of a read-only mount
                raise pyfuse3.FUSEError(errno.ENOSYS)
            await self.core.flush(fh)

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        async with self._op("fsync"):
            if self.core.writable:
                await self.core.fsync(fh)

    async def setattr(self, inode: InodeT, attr: EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: FileHandleT | None, ctx: pyfuse3.RequestContext) -> EntryAttributes:
        async with self._op("setattr"):
            if not self.core.writable:
                raise FsError(errno.EROFS)
            if fields.update_size:
                return self._attr(await self.core.truncate(inode, attr.st_size, fh))
            # chmod, chown and utimens succeed without effect (an object has no owner or
            # mode, and its time is when it was uploaded): cp -p, rsync -a and tar x work.
            return self._attr(self.core.record(inode))
        raise AssertionError("unreachable")

    async def mkdir(self, parent_inode: InodeT, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> EntryAttributes:
        async with self._op("mkdir"):
            return self._attr(await self.core.mkdir(parent_inode, name))
        raise AssertionError("unreachable")

    async def rmdir(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        async with self._op("rmdir"):
            await self.core.rmdir(parent_inode, name)

    async def unlink(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        async with self._op("unlink"):
            await self.core.unlink(parent_inode, name)

    async def rename(self, parent_inode_old: InodeT, name_old: bytes, parent_inode_new: InodeT,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        async with self._op("rename"):
            await self.core.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # Objects have no links, devices or symbolic links.
    async def _eperm(self, name: str) -> None:
        async with self._op(name):
            raise FsError(errno.EROFS if not self.core.writable else errno.EPERM)

    async def link(self, *args: object, **kwargs: object) -> EntryAttributes:
        await self._eperm("link")
        raise AssertionError("unreachable")

    async def symlink(self, *args: object, **kwargs: object) -> EntryAttributes:
        await self._eperm("symlink")
        raise AssertionError("unreachable")

    async def mknod(self, *args: object, **kwargs: object) -> EntryAttributes:
        await self._eperm("mknod")
        raise AssertionError("unreachable")
