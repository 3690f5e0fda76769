"""Robustness at scale, through the real command (issue 11): stale mounts whose root the kernel
still caches, relists that fail or remove entries mid-readdir, daemons nobody reaps, `.`/`..`,
and the control socket's fallback directory."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from cachefs.testing.servers import Server
from tests.faults.helpers import faulty_bucket

from .mounts import CACHEFS, cachefs, fuse_mounts, mounted, wait_daemon_gone
from .stores import Bucket

pytestmark = pytest.mark.timeout(300)


def test_stale_mount_with_cached_root_attributes_is_cleaned_up(s3_bucket: Bucket, tmp_path: Path) -> None:
    s3_bucket.put("a.txt", b"alive")
    mnt, cache, env = tmp_path / "mnt", tmp_path / "cache", s3_bucket.mount_env
    with mounted(s3_bucket.source, mnt, cache, env, *s3_bucket.mount_args) as m:
        pid = int(m.status()["pid"])
        os.stat(mnt)  # the kernel now caches the root's attributes (for the metadata TTL)
        os.listdir(mnt)
        os.kill(pid, signal.SIGKILL)
        wait_daemon_gone(cache)
        os.stat(mnt)  # still answered from the attribute cache: stat alone cannot see it is dead
        cachefs("mount", s3_bucket.source, str(mnt), "--cache-dir", str(cache), *s3_bucket.mount_args,
                env=env, check=True)
        assert (mnt / "a.txt").read_bytes() == b"alive"


def test_failed_relist_keeps_serving_the_listing(seaweed: Server, tmp_path: Path) -> None:
    with faulty_bucket(seaweed, f"rl-{uuid.uuid4().hex[:10]}") as fb:
        b = fb.bucket
        files = {f"d/f{i:03d}": os.urandom(1000) for i in range(50)}
        b.put_many(files)
        with mounted(b.source, tmp_path / "mnt", tmp_path / "cache", b.mount_env, *b.mount_args,
                     "--metadata-ttl", "1", "--backend-timeout", "3") as m:
            for rel, data in files.items():
                assert (m.path / rel).read_bytes() == data
            time.sleep(1.5)  # the listing is stale now
            fb.proxy.inject("outage")
            try:
                started = time.monotonic()
                for _ in range(3):  # lookups answer from LMDB at once; relists fail behind them
                    assert sorted(os.listdir(m.path / "d")) == sorted(p.split("/")[1] for p in files)
                    for rel, data in files.items():
                        assert os.stat(m.path / rel).st_size == 1000
                        assert (m.path / rel).read_bytes() == data  # from the cache
                    time.sleep(1.2)
                assert time.monotonic() - started < 15
            finally:
                fb.proxy.clear()
            assert "serving the previous listing" in (tmp_path / "cache" / "cachefs.log").read_text()


def test_readdir_during_relists_that_remove_entries_returns_every_kept_name(s3_bucket: Bucket,
                                                                             tmp_path: Path) -> None:
    names = [f"n{i:05d}" for i in range(1500)]
    s3_bucket.put_many({f"big/{n}": b"x" for n in names})
    doomed = set(names[1::5])  # a fifth of them go, a few at a time, while listings run
    kept = set(names) - doomed
    with mounted(s3_bucket.source, tmp_path / "mnt", tmp_path / "cache", s3_bucket.mount_env,
                 *s3_bucket.mount_args, "--metadata-ttl", "0.3") as m:
        assert len(os.listdir(m.path / "big")) == 1500
        stop = threading.Event()

        def delete() -> None:
            for n in sorted(doomed):
                if stop.is_set():
                    return
                s3_bucket.delete(f"big/{n}")
                time.sleep(0.005)

        deleter = threading.Thread(target=delete)
        deleter.start()
        try:
            rounds = 0
            while deleter.is_alive() or rounds < 5:
                listed = set(os.listdir(m.path / "big"))
                missing = kept - listed
                assert not missing, f"a listing lost {len(missing)} entries that were never removed"
                assert listed <= set(names)
                rounds += 1
        finally:
            stop.set()
            deleter.join()


def test_ls_a_shows_dot_and_dotdot(s3_bucket: Bucket, tmp_path: Path) -> None:
    s3_bucket.put("d/f", b"1")
    with mounted(s3_bucket.source, tmp_path / "mnt", tmp_path / "cache", s3_bucket.mount_env,
                 *s3_bucket.mount_args) as m:
        for path in (m.path, m.path / "d"):
            out = subprocess.run(["ls", "-a", str(path)], capture_output=True, text=True, check=True).stdout.split()
            assert out[:2] == [".", ".."], out
        assert os.listdir(m.path / "d") == ["f"]


def test_unmount_of_a_daemon_nobody_reaps_is_quick(s3_bucket: Bucket, tmp_path: Path) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    proc = subprocess.Popen([*CACHEFS, "mount", "--foreground", s3_bucket.source, str(mnt), "--cache-dir",
                             str(cache), *s3_bucket.mount_args], env=s3_bucket.mount_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while str(mnt) not in fuse_mounts():
            assert time.monotonic() < deadline and proc.poll() is None, "mount did not come up"
            time.sleep(0.1)
        started = time.monotonic()
        res = cachefs("unmount", str(mnt), env=s3_bucket.mount_env)
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - started < 10  # the daemon exits; nobody reaps it until below
    finally:
        proc.wait(timeout=30)


def test_control_socket_of_a_long_cache_path_is_private(s3_bucket: Bucket, tmp_path: Path) -> None:
    cache = tmp_path / ("c" * 60) / ("d" * 60)
    with mounted(s3_bucket.source, tmp_path / "mnt", cache, s3_bucket.mount_env, *s3_bucket.mount_args) as m:
        sock = Path(os.getxattr(m.path, "user.cachefs.control").decode())
        assert not str(sock).startswith(str(cache))  # too long for a socket name
        parent = os.stat(sock.parent)
        assert stat.S_IMODE(parent.st_mode) == 0o700 and parent.st_uid == os.getuid()
        assert sock.parent.name.startswith("cachefs-") and len(sock.parent.name) > len("cachefs-") + 6
        assert m.status()["pid"] > 0
    assert not sock.parent.exists()  # removed at unmount
