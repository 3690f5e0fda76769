"""Cache namespaces: claiming one at start, and reclaiming the disk of those nobody uses any more.

Each source URL has its own namespace directory under the cache dir, locked (``flock`` on its
``lock`` file) by the daemon that uses it; the kernel drops the lock when that daemon dies, even
by ``kill -9``. When another daemon holds it, a read-only daemon falls back to a private sibling
``NAME.2``, ``NAME.3``, ... (the first one free; ``claim``): two pods of one node reading the
same bucket both mount, each with a cache of its own, instead of one of them failing. A sibling
is kept like any namespace, so the next pair of concurrent daemons starts warm in it too. Not
shared, because one namespace has one LMDB writer, one evictor and one byte count; not waited
for, because the holder may be a training Job that runs for days. A read-write daemon is still
refused: a sibling would keep its staged uploads where only a daemon that happens to claim that
sibling again would upload them.

When a DaemonSet moves to
another bucket or endpoint, the old namespace would keep its disk forever. A namespace is
reclaimed (deleted, and logged) only when all of these hold:
- this daemon needs the space: the cache disk cannot hold what its cache may still grow by;
- no daemon uses it: its ``lock`` can be taken (and is held while it is deleted);
- it has not been used for ``max_age`` seconds: a daemon touches its ``lock`` at start and
  every hour (``touch``);
- it holds no written data waiting for upload (its ``staging`` directory is empty).
Oldest first, and only as many as the space needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

TOUCH_INTERVAL = 3600.0  # seconds between two marks of "in use" on the lock file
MAX_SIBLINGS = 64  # private namespaces NAME.2 .. NAME.64; more concurrent daemons are refused


class Busy(Exception):
    """The namespace is locked by another daemon (``pid``, as written in its lock file)."""

    def __init__(self, pid: str) -> None:
        super().__init__(pid)
        self.pid = pid


def lock(ns_dir: str) -> int:
    """Create ``ns_dir`` if needed and lock it for this daemon: the open lock file, which holds
    the lock until it is closed (or the process ends). Raises ``Busy`` if another daemon has it."""
    os.makedirs(ns_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(ns_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise Busy(other or "?") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def claim(cache_dir: str, name: str, private_ok: bool) -> tuple[str, int]:
    """Lock the namespace ``name`` under ``cache_dir``; when another daemon has it and
    ``private_ok``, the first free sibling ``name.N`` instead (logged). Returns its directory and
    the lock's file descriptor. Raises ``Busy`` (of the daemon on ``name``) if none is free."""
    primary = os.path.join(cache_dir, name)
    try:
        return primary, lock(primary)
    except Busy as exc:
        if not private_ok:
            raise
        holder = exc
    for n in range(2, MAX_SIBLINGS + 1):
        path = f"{primary}.{n}"
        try:
            fd = lock(path)
        except Busy:
            continue
        log.warning("cache namespace %s is used by cachefs pid %s; using %s.%d, a cache of this "
                    "daemon's own (the data cached by the other is not shared)", name, holder.pid, name, n)
        return path, fd
    raise holder


@dataclass
class Reclaimed:
    name: str
    size: int
    idle: float  # seconds since last use


def touch(ns_dir: str) -> None:
    with contextlib.suppress(OSError):
        os.utime(os.path.join(ns_dir, "lock"))


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _has_staged(ns_dir: str) -> bool:
    try:
        return bool(os.listdir(os.path.join(ns_dir, "staging")))
    except FileNotFoundError:
        return False


def reclaim(cache_dir: str, own: str, need: int, max_age: float) -> list[Reclaimed]:
    """Delete unused namespaces under ``cache_dir`` (never ``own``), oldest first, until
    ``need`` bytes are free on its disk. Blocking: runs in a thread."""
    if shutil.disk_usage(cache_dir).free >= need:
        return []
    now = time.time()
    candidates: list[tuple[float, str]] = []
    for entry in os.scandir(cache_dir):
        path = entry.path
        lock = os.path.join(path, "lock")
        if not entry.is_dir(follow_symlinks=False) or os.path.realpath(path) == os.path.realpath(own):
            continue
        try:
            mtime = os.stat(lock).st_mtime
        except OSError:
            continue  # not a namespace
        if now - mtime >= max_age:
            candidates.append((mtime, path))
    done: list[Reclaimed] = []
    for mtime, path in sorted(candidates):
        if shutil.disk_usage(cache_dir).free >= need:
            break
        fd = os.open(os.path.join(path, "lock"), os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a daemon uses it
            if _has_staged(path):
                log.warning("namespace %s is unused but holds data not uploaded yet; kept",
                            os.path.basename(path))
                continue
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        idle = now - mtime
        log.warning("reclaimed cache namespace %s (%d bytes, unused for %.1f days) to make room",
                    os.path.basename(path), size, idle / 86400)
        done.append(Reclaimed(os.path.basename(path), size, idle))
    return done
