"""Helpers for tests that mount with the real ``cachefs`` command against real servers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CACHEFS = [sys.executable, "-m", "cachefs.cli"]


def cachefs(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*CACHEFS, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"cachefs {' '.join(args)} failed ({res.returncode}): {res.stderr}")
    return res


def scrape(port: int) -> dict[str, float]:
    """A daemon's /metrics as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def fuse_mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2].startswith("fuse")]


@dataclass
class Mount:
    path: Path
    cache_dir: Path
    env: dict[str, str]
    args: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        return json.loads(cachefs("status", "--json", str(self.path), env=self.env, check=True).stdout)

    def gets(self) -> float:
        return float(self.status()["backend"]["by_operation"]["get"])

    def unmount(self) -> None:
        if str(self.path) in fuse_mounts():
            cachefs("unmount", str(self.path), env=self.env, check=True)


@contextlib.contextmanager
def mounted(source: str, mnt: Path, cache_dir: Path, env: dict[str, str], *extra: str) -> Iterator[Mount]:
    mnt.mkdir(parents=True, exist_ok=True)
    args = ["mount", source, str(mnt), "--cache-dir", str(cache_dir), *extra]
    cachefs(*args, env=env, check=True)
    m = Mount(mnt, cache_dir, env, args)
    try:
        yield m
    finally:
        with contextlib.suppress(Exception):
            m.unmount()
        if str(mnt) in fuse_mounts():
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        wait_daemon_gone(cache_dir)


def wait_daemon_gone(cache_dir: Path, timeout: float = 30) -> None:
    """Wait until no daemon holds a namespace lock under cache_dir."""
    import fcntl

    deadline = time.monotonic() + timeout
    for lock in cache_dir.glob("*/lock"):
        while time.monotonic() < deadline:
            fd = os.open(lock, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
            finally:
                os.close(fd)
