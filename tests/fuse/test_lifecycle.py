"""Daemon life cycle through the real command: SIGTERM, kill -9 and stale mountpoints."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from .mounts import cachefs, fuse_mounts, mounted, wait_daemon_gone
from .stores import Bucket

pytestmark = pytest.mark.timeout(300)


def daemon_pid(mnt: Path, env: dict[str, str]) -> int:
    return int(json.loads(cachefs("status", "--json", str(mnt), env=env, check=True).stdout)["pid"])


def test_sigterm_unmounts_cleanly(any_bucket: Bucket, tmp_path: Path) -> None:
    any_bucket.put("life/a.txt", b"hello")
    mnt = tmp_path / "mnt"
    with mounted(any_bucket.source, mnt, tmp_path / "cache", any_bucket.mount_env, *any_bucket.mount_args):
        assert (mnt / "life/a.txt").read_bytes() == b"hello"
        pid = daemon_pid(mnt, any_bucket.mount_env)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while str(mnt) in fuse_mounts() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert str(mnt) not in fuse_mounts()
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}"), "the daemon did not exit after SIGTERM"


def test_killed_daemon_leaves_stale_mount_that_is_cleaned_up(any_bucket: Bucket, tmp_path: Path) -> None:
    any_bucket.put("life/b.txt", b"still here")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    env = any_bucket.mount_env
    with mounted(any_bucket.source, mnt, cache, env, *any_bucket.mount_args):
        assert (mnt / "life/b.txt").read_bytes() == b"still here"
        os.kill(daemon_pid(mnt, env), signal.SIGKILL)
        wait_daemon_gone(cache)
        with pytest.raises(OSError) as info:
            os.stat(mnt / "not-in-the-kernel-cache")
        assert info.value.errno == 107  # ENOTCONN: "Transport endpoint is not connected"
        # mount again on the stale mountpoint: it is cleaned up first, and the cache is reused
        cachefs("mount", any_bucket.source, str(mnt), "--cache-dir", str(cache), *any_bucket.mount_args,
                env=env, check=True)
        assert (mnt / "life/b.txt").read_bytes() == b"still here"
        status = json.loads(cachefs("status", "--json", str(mnt), env=env, check=True).stdout)
        assert status["backend"]["by_operation"]["get"] == 0
        os.kill(status["pid"], signal.SIGKILL)
        wait_daemon_gone(cache)
        res = cachefs("unmount", str(mnt), env=env)
        assert res.returncode == 0, res.stderr
        assert str(mnt) not in fuse_mounts()
        assert os.listdir(mnt) == []
