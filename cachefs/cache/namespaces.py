"""Reclaiming the disk of cache namespaces nobody uses any more.

Each source URL has its own namespace directory under the cache dir. When a DaemonSet moves to
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
