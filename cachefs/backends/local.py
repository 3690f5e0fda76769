"""A local directory as the backend (``file:///DIR``): trials, tests, NFS staging.

Keys are paths relative to DIR with "/" separators. The ETag is derived from size and mtime,
so rewriting a file changes it. Listings are produced in key order with continuation, like S3.
Symbolic links are neither listed nor followed: one could lead out of DIR (to /etc/shadow, for a
daemon running as root with --allow-other).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import uuid
from collections.abc import Iterator

from ..errors import AccessDenied, NotFound, ObjectChanged, UsageError
from ..source import Source
from .base import Backend, ListPage, ObjectInfo


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
