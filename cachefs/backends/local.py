"""A local directory as the backend (``file:///DIR``): trials, tests, NFS staging.

Keys are paths relative to DIR with "/" separators. The ETag is derived from size and mtime,
so rewriting a file changes it. Listings are produced in key order with continuation, like S3.
Symbolic links are neither listed nor followed: one could lead out of DIR (to /etc/shadow, for a
daemon running as root with --allow-other).

Writes are staged under DIR/.cachefs-uploads/ (created on the first write; never listed, and no
key may name it) and renamed into place, so a reader sees the old file or the new one, never a
part of one. A multipart upload is a directory there holding one file per uploaded part;
completing it assembles the parts and renames the result into place. Where DIR/.cachefs-uploads
and the destination are on different filesystems (a mount inside DIR), the result is copied to
a ".cachefs-tmp-*" file beside the destination (never listed either) and renamed from there.
A key ending in "/" is a directory: putting it makes the directory (and its parents), deleting
it removes the directory if it is empty. Every new version gets a fresh mtime, so a fresh ETag,
even when it has the size of the one it replaces and comes within the filesystem's timestamp
granularity.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO

from ..errors import AccessDenied, BackendError, NotFound, ObjectChanged, TemporaryFailure, UsageError
from ..source import Source
from .base import Backend, ListPage, ObjectInfo

UPLOADS_DIR = ".cachefs-uploads"  # at the top of DIR: writes in progress
TMP_PREFIX = ".cachefs-tmp-"  # a write in progress beside its destination (other filesystem)
COPY_BUFFER = 1 << 20
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
_TOKEN = re.compile(r"^[0-9a-f]{32}$")
# Errors that the same write will meet again: not worth retrying.
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.ENAMETOOLONG,
                     errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV}


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(key, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}", st.st_mtime)


class LocalBackend(Backend):
    def __init__(self, source: Source, *, timeout: float, max_connections: int) -> None:
        super().__init__(source, timeout=timeout, max_connections=max_connections)
        self.root = source.bucket
        self.real_root = os.path.realpath(self.root)
        # Open listings, by continuation token: walking a directory tree again for every page
        # would make a listing of N keys cost O(N^2).
        self._cursors: dict[str, Iterator[ObjectInfo | str]] = {}

    def _path(self, key: str) -> str:
        path = os.path.normpath(os.path.join(self.root, key))
        if not (path == self.root or path.startswith(self.root.rstrip("/") + "/")):
            raise NotFound(f"{key!r} is outside {self.root}")
        if (os.path.relpath(path, self.root).split("/", 1)[0] == UPLOADS_DIR
                or os.path.basename(path).startswith(TMP_PREFIX)):
            raise NotFound(f"{key!r} is reserved for cachefs's writes in progress")
        inside = os.path.normpath(os.path.join(self.real_root, os.path.relpath(path, self.root)))
        if os.path.realpath(path) != inside:
            raise NotFound(f"{key!r} goes through a symbolic link")
        return path

    def _check_sync(self) -> None:
        if not os.path.isdir(self.root):
            raise NotFound(f"directory {self.root!r} does not exist")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise AccessDenied(f"directory {self.root!r} is not readable")

    def _walk(self, base: str, delimiter: str | None) -> Iterator[ObjectInfo | str]:
        """Entries under directory key ``base`` ("" or ending in "/") in key order."""
        try:
            entries = sorted(os.scandir(self._path(base) if base else self.root),
                             key=lambda e: e.name + ("/" if e.is_dir(follow_symlinks=False) else ""))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if (not base and entry.name == UPLOADS_DIR) or entry.name.startswith(TMP_PREFIX):
                continue  # writes in progress
            key = base + entry.name
            if entry.is_dir(follow_symlinks=False):
                if delimiter:
                    yield key + "/"
                else:
                    yield from self._walk(key + "/", None)
            elif entry.is_file(follow_symlinks=False):
                yield _info(key, entry.stat(follow_symlinks=False))

    def _list_sync(self, prefix: str, delimiter: str | None, token: str | None) -> ListPage:
        if token is not None:
            try:
                it = self._cursors.pop(token)
            except KeyError:
                raise UsageError("listing continuation expired") from None
        else:
            base, _, partial = prefix.rpartition("/")
            base = base + "/" if base else ""
            if base.split("/", 1)[0] == UPLOADS_DIR:
                return ListPage()
            it = (e for e in self._walk(base, delimiter)
                  if (e if isinstance(e, str) else e.key).startswith(prefix) or not partial)
        page = ListPage()
        for entry in itertools.islice(it, self.page_size):
            if isinstance(entry, str):
                page.prefixes.append(entry)
            else:
                page.objects.append(entry)
        if len(page.objects) + len(page.prefixes) == self.page_size:
            page.token = uuid.uuid4().hex
            self._cursors[page.token] = it
        return page

    def _head_sync(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(key), follow_symlinks=False)
        except FileNotFoundError:
            raise NotFound(f"{key!r}: not found") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"{key!r}: not a regular file")
        return _info(key, st)

    def _get_sync(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        try:
            with open(os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
                if etag is not None and _info(key, os.fstat(f.fileno())).etag != etag:
                    raise ObjectChanged(f"{key!r}: object changed")
                return os.pread(f.fileno(), length, start)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{key!r}: not found") from None
        except PermissionError:
            raise AccessDenied(f"{key!r}: permission denied") from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise NotFound(f"{key!r} is a symbolic link") from None

    # -- writes ---------------------------------------------------------------------------------

    def _staging(self) -> str:
        """DIR/.cachefs-uploads, made on first use; a real directory, not a link."""
        path = os.path.join(self.root, UPLOADS_DIR)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise BackendError(f"{path!r} is not a directory")
        return path

    def _target(self, key: str) -> str:
        """The path a write of ``key`` replaces (checked like every path: inside DIR, no link)."""
        path = self._path(key)
        if path == os.path.normpath(self.root):
            raise NotFound(f"{key!r} names the top directory")
        return path

    def _oserror(self, exc: OSError, what: str) -> BackendError:
        if isinstance(exc, PermissionError):
            return AccessDenied(f"{what}: permission denied")
        if exc.errno == errno.ELOOP:
            return NotFound(f"{what}: a symbolic link is in the way")
        if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
            return BackendError(f"{what}: a file or directory is in the way")
        if exc.errno in _PERMANENT_ERRNOS:
            return BackendError(f"{what}: {os.strerror(exc.errno or 0)}")
        return TemporaryFailure(f"{what}: {os.strerror(exc.errno or 0)}")

    def _writing(self, what: str, fn: Callable[[], ObjectInfo]) -> ObjectInfo:
        try:
            return fn()
        except OSError as exc:
            raise self._oserror(exc, what) from exc

    def _write_temp(self, directory: str, fill: Callable[[BinaryIO], object],
                    dest: str | None) -> tuple[str, os.stat_result]:
        """A new file in ``directory`` written by ``fill``, synced, with an mtime (so an ETag)
        that the file at ``dest`` has not; its path and stat."""
        tmp = os.path.join(directory, TMP_PREFIX + uuid.uuid4().hex)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            with open(fd, "wb", closefd=False) as f:
                fill(f)
            if dest is not None:
                _stamp(fd, dest)
            os.fsync(fd)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp, st

    def _publish(self, tmp: str, dest: str, st: os.stat_result) -> os.stat_result:
        """Rename ``tmp`` to ``dest`` (making its parent directories); the stat ``dest`` has."""
        parent = os.path.dirname(dest)
        try:
            try:
                os.makedirs(parent, exist_ok=True)
                self._path(os.path.relpath(parent, self.root))  # no link crept into the new path
                os.replace(tmp, dest)
                return st
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            # Another filesystem: a copy beside the destination, renamed from there.
            with open(tmp, "rb") as src:
                near, st = self._write_temp(parent, lambda f: shutil.copyfileobj(src, f, COPY_BUFFER), dest)
            try:
                os.replace(near, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(near)
                raise
            return st
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # still there if anything failed

    def _put_file(self, key: str, fill: Callable[[BinaryIO], object]) -> ObjectInfo:
        dest = self._target(key)
        tmp, st = self._write_temp(self._staging(), fill, dest)
        return _info(key, self._publish(tmp, dest, st))

    def _put_sync(self, key: str, data: bytes) -> ObjectInfo:
        what = f"put {key!r}"
        path = self._target(key)
        if key.endswith("/"):
            if data:
                raise BackendError(f"{what}: a directory cannot have contents")

            def mkdir() -> ObjectInfo:
                os.makedirs(path, exist_ok=True)
                self._path(key)  # no link crept into the new path
                st = os.stat(path, follow_symlinks=False)
                return ObjectInfo(key, 0, f"{st.st_mtime_ns:x}-0", st.st_mtime)

            return self._writing(what, mkdir)
        return self._writing(what, lambda: self._put_file(key, lambda f: f.write(data)))

    def _upload_dir(self, upload_id: str, key: str, what: str) -> str:
        if not _UPLOAD_ID.match(upload_id):
            raise NotFound(f"{what}: no such upload")
        path = os.path.join(self.root, UPLOADS_DIR, upload_id)
        try:
            with open(os.path.join(path, "key"), encoding="utf-8", errors="surrogateescape") as f:
                if f.read() != key:
                    raise NotFound(f"{what}: no such upload")
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{what}: no such upload") from None
        return path

    def _start_upload_sync(self, key: str) -> str:
        what = f"start upload of {key!r}"
        if key.endswith("/"):
            raise BackendError(f"{what}: a directory cannot have contents")
        self._target(key)
        upload_id = uuid.uuid4().hex
        try:
            path = os.path.join(self._staging(), upload_id)
            os.mkdir(path, 0o700)
            with open(os.path.join(path, "key"), "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(key)
        except OSError as exc:
            raise self._oserror(exc, what) from exc
        return upload_id

    def _upload_part_sync(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        # Each upload of a part is a file of its own, named by its token; completing takes the
        # ones named and drops the rest.
        what = f"upload part {number} of {key!r}"
        path = self._upload_dir(upload_id, key, what)
        token = uuid.uuid4().hex
        try:
            tmp, _ = self._write_temp(path, lambda f: f.write(data), None)
            os.replace(tmp, os.path.join(path, f"{number:06d}-{token}"))
        except FileNotFoundError:
            raise NotFound(f"{what}: no such upload") from None
        except OSError as exc:
            raise self._oserror(exc, what) from exc
        return token

    def _complete_upload_sync(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                              size: int) -> ObjectInfo:
        what = f"complete upload of {key!r}"
        try:
            path = self._upload_dir(upload_id, key, what)
        except NotFound as exc:
            return self._completed_before(key, size, what, exc)
        files = []
        for number, token in parts:
            part = os.path.join(path, f"{number:06d}-{token}")
            if not _TOKEN.match(token) or not os.path.isfile(part):
                raise BackendError(f"{what}: part {number} was not uploaded (or not as {token!r})")
            files.append(part)

        def assemble(f: BinaryIO) -> None:
            for part in files:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, f, COPY_BUFFER)

        def complete() -> ObjectInfo:
            dest = self._target(key)
            tmp, st = self._write_temp(path, assemble, dest)
            if st.st_size != size:
                os.unlink(tmp)
                raise BackendError(f"{what}: the parts make {st.st_size} bytes, not {size}")
            st = self._publish(tmp, dest, st)
            shutil.rmtree(path, ignore_errors=True)
            return _info(key, st)

        return self._writing(what, complete)

    def _completed_before(self, key: str, size: int, what: str, exc: Exception) -> ObjectInfo:
        """The upload is gone: completed by an attempt whose answer was lost, or aborted."""
        try:
            info = self._head_sync(key)
        except NotFound:
            raise BackendError(f"{what}: no such upload") from exc
        if info.size != size:
            raise BackendError(f"{what}: no such upload, and {key!r} is not its result") from exc
        return info

    def _abort_upload_sync(self, key: str, upload_id: str) -> None:
        try:
            path = self._upload_dir(upload_id, key, f"abort upload of {key!r}")
        except NotFound:
            return
        shutil.rmtree(path, ignore_errors=True)

    def _delete_sync(self, key: str) -> None:
        what = f"delete {key!r}"
        try:
            path = self._target(key)
        except NotFound:
            return  # nothing a key can name (outside DIR, through a link, reserved)
        try:
            if key.endswith("/"):
                os.rmdir(path)
            else:
                os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass  # missing; or a "file" key that is a directory: like S3, nothing to delete
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # a directory still in use
                raise self._oserror(exc, what) from exc

    def _copy_sync(self, src: str, dst: str, size: int) -> ObjectInfo:
        what = f"copy {src!r} to {dst!r}"
        try:
            fd = os.open(self._path(src), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{what}: not found") from None
        except OSError as exc:
            raise self._oserror(exc, what) from exc
        with open(fd, "rb") as source:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotFound(f"{what}: not a regular file")
            return self._writing(what, lambda: self._put_file(
                dst, lambda f: shutil.copyfileobj(source, f, COPY_BUFFER)))


def _stamp(fd: int, dest: str) -> None:
    """Give the file ``fd`` the current time as mtime, later than that of the file at ``dest``
    (if any): a new version must not get the ETag of the one it replaces."""
    ns = time.time_ns()
    try:
        old: os.stat_result | None = os.stat(dest, follow_symlinks=False)
    except OSError:
        old = None
    if old is not None and old.st_mtime_ns >= ns:
        ns = old.st_mtime_ns + 1
    os.utime(fd, ns=(ns, ns))
    if old is not None and os.fstat(fd).st_mtime_ns <= old.st_mtime_ns:
        # A filesystem that keeps coarse timestamps (whole seconds) dropped the difference.
        ns = old.st_mtime_ns + 1_000_000_000
        os.utime(fd, ns=(ns, ns))
