"""The FUSE kernel path's ceiling: a bare read-only pyfuse3 filesystem over a local directory.

    .venv/bin/python bench/barefs.py SOURCE_DIR MOUNTPOINT      # foreground; unmount to stop

It does what cachefs does for warm reads and nothing else: the kernel's no-open and no-opendir
modes (``open``/``opendir`` answer ENOSYS; the patched pyfuse3 passes the inode to ``read`` and
``readdir``), entry and attribute timeouts of a day, no ``flush``. ``bench/run.py`` runs it as
"bare-fuse" beside cachefs, so that cachefs's warm epochs are compared with what a FUSE
filesystem can reach on this machine at all. Not a product: no error handling beyond ENOENT.
"""

from __future__ import annotations

import errno
import os
import sys

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileHandleT, InodeT

DAY = 86400.0


class BareFS(pyfuse3.Operations):
    supports_dot_lookup = False
    inode_as_fh = True

    def __init__(self, root: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: root}
        self.inodes: dict[str, int] = {root: pyfuse3.ROOT_INODE}
        self.fds: dict[int, int] = {}

    def _ino(self, path: str) -> int:
        ino = self.inodes.get(path)
        if ino is None:
            ino = self.inodes[path] = len(self.paths) + pyfuse3.ROOT_INODE
            self.paths[ino] = path
        return ino

    def _attr(self, path: str) -> EntryAttributes:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        attr = EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns",
                     "st_ctime_ns"):
            setattr(attr, name, getattr(st, name))
        attr.st_ino = InodeT(self._ino(path))
        attr.st_blksize, attr.st_blocks = 128 * 1024, st.st_blocks
        attr.entry_timeout = attr.attr_timeout = DAY
        return attr

    async def lookup(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> EntryAttributes:
        return self._attr(os.path.join(self.paths[parent_inode], os.fsdecode(name)))

    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext | None = None) -> EntryAttributes:
        return self._attr(self.paths[inode])

    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(os.scandir(self.paths[fh]), key=lambda e: e.name)
        for i in range(start_id, len(entries)):
            if not pyfuse3.readdir_reply(token, os.fsencode(entries[i].name), self._attr(entries[i].path), i + 1):
                return

    async def open(self, inode: InodeT, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        fd = self.fds.get(fh)
        if fd is None:
            fd = self.fds[fh] = os.open(self.paths[fh], os.O_RDONLY)
        return os.pread(fd, size, off)


def main() -> None:
    root, mnt = os.path.abspath(sys.argv[1]), sys.argv[2]
    pyfuse3.init(BareFS(root), mnt, {"fsname=barefs", "subtype=barefs", "ro", "noatime"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
