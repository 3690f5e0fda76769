"""mount(8), fstab and umount(8) through the real tools: `mount -t fuse.cachefs` with options,
`mount -T FSTAB`, fuse3's `mount.fuse3` path, `umount`, and bad options.

mount(8) runs ``/sbin/mount.fuse.cachefs`` (``install.sh`` links the package's script there); the
``helper`` fixture points that path at the tree under test for the module and puts back what was
there before. Credentials reach the daemon only through ``credentials=FILE``: the environment of
every mount here has no AWS variables.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.testing.servers import Server

from .mounts import cachefs, fuse_mounts, wait_daemon_gone

pytestmark = pytest.mark.timeout(300)

HELPERS = {Path("/sbin/mount.fuse.cachefs"): "main"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def helper() -> Iterator[None]:
    """/sbin/mount.fuse.cachefs running this tree's cachefs, for the module (one session at a
    time: a lock serialises sessions that would swap it under each other); what was there before
    is put back."""
    if os.geteuid() != 0:
        pytest.fail("mount(8) tests need root (mount -t fuse.cachefs installs nothing for users)")
    lock = os.open("/run/lock/cachefs-mount-helper.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    saved: dict[Path, str | bytes | None] = {}
    for path in HELPERS:
        saved[path] = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.exists() else None
    try:
        for path, func in HELPERS.items():
            path.unlink(missing_ok=True)
            path.write_text(f"#!/bin/sh\nPYTHONPATH='{REPO}' exec '{sys.executable}' -c "
                            f"'import sys; from cachefs.mounthelper import {func}; sys.exit({func}())' \"$@\"\n")
            path.chmod(0o755)
        yield
    finally:
        for path, old in saved.items():
            path.unlink(missing_ok=True)
            if isinstance(old, str):
                path.symlink_to(old)
            elif isinstance(old, bytes):
                path.write_bytes(old)
                path.chmod(0o755)
        os.close(lock)


@pytest.fixture
def bucket(moto: Server) -> str:
    name = f"fs-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    return name


def clean_env() -> dict[str, str]:
    """The environment of mount(8) at boot: nothing that names a credential or a cachefs option."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CACHEFS_", "IBM_", "AZURE_"))}


def credentials_file(tmp_path: Path, server: Server) -> Path:
    path = tmp_path / "creds.env"
    path.write_text("# moto's keys\n" + "".join(f"{k}={v}\n" for k, v in server.env.items()))
    path.chmod(0o600)
    return path


def run(*cmd: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), env=env if env is not None else clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def mount_entry(mnt: Path) -> tuple[str, str, set[str]]:
    """(source, type, options) of mnt in /proc/mounts."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if parts[1] == str(mnt):
                return parts[0], parts[2], set(parts[3].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def daemon_pid(mnt: Path) -> int:
    import json

    return int(json.loads(cachefs("status", "--json", str(mnt), check=True).stdout)["pid"])


def gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def cleanup(mnt: Path, cache: Path) -> Iterator[None]:
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        if str(mnt) in fuse_mounts():
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        if cache.exists():
            wait_daemon_gone(cache)


def test_mount_t_with_options_then_umount(helper: None, moto: Server, bucket: str, tmp_path: Path) -> None:
    files = {f"train/{i:03d}.bin": os.urandom(3000 + i) for i in range(20)}
    moto.upload(bucket, files)
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    creds = credentials_file(tmp_path, moto)
    options = ",".join([
        "ro", "defaults", "_netdev", "nofail", "noauto", "x-systemd.automount", "x-systemd.idle-timeout=60",
        "comment=dataset", "users", "exec", "nosuid", "nodev", "noatime",  # mount(8)'s own and fixed ones
        f"credentials={creds}", f"endpoint_url={moto.endpoint_url}", f"cache_dir={cache}", "cache_size=50M",
        "cache_policy=lru", "metadata-ttl=60", "prefetch", "prefetch_concurrency=8", "log_level=debug",
        "allow_other", "uid=1234", "gid=5678", "file_mode=0440", "dir_mode=0550", "noexec",
    ])
    with cleanup(mnt, cache):
        res = run("mount", "-t", "fuse.cachefs", f"s3://{bucket}/train", str(mnt), "-o", options)
        assert res.returncode == 0, res.stderr
        assert res.stdout + res.stderr == ""
        source, fstype, opts = mount_entry(mnt)
        assert (source, fstype) == (f"s3://{bucket}/train", "fuse.cachefs")
        assert {"ro", "allow_other", "default_permissions", "noexec", "nosuid", "nodev"} <= opts
        for i in range(20):
            assert (mnt / f"{i:03d}.bin").read_bytes() == files[f"train/{i:03d}.bin"]
        st = os.stat(mnt / "000.bin")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o440)
        assert stat.S_IMODE(os.stat(mnt).st_mode) == 0o550
        with pytest.raises(OSError):
            (mnt / "new.txt").write_bytes(b"x")  # ro
        status = cachefs("status", "--json", str(mnt), check=True).stdout
        assert str(cache) in status and '"policy": "lru"' in status
        assert '"capacity_bytes": 52428800' in status
        pid = daemon_pid(mnt)
        # umount(8), not cachefs unmount: the daemon notices and exits cleanly.
        res = run("umount", str(mnt))
        assert res.returncode == 0, res.stderr
        assert str(mnt) not in fuse_mounts()
        assert gone(pid), "the daemon did not exit after umount"
        log = next(cache.glob("cachefs.log")).read_text()
        assert f"unmounted {mnt}" in log and "Traceback" not in log


def test_rw_is_a_read_write_mount_and_data_reaches_the_bucket(helper: None, moto: Server, bucket: str,
                                                               tmp_path: Path) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    creds = credentials_file(tmp_path, moto)
    with cleanup(mnt, cache):
        # No ro: mount(8) passes rw, and a mount(8) user gets a writable filesystem.
        res = run("mount", "-t", "fuse.cachefs", f"s3://{bucket}", str(mnt), "-o",
                  f"credentials={creds},endpoint_url={moto.endpoint_url},cache_dir={cache}")
        assert res.returncode == 0, res.stderr
        assert "rw" in mount_entry(mnt)[2]
        data = os.urandom(100_000)
        (mnt / "out").mkdir()
        (mnt / "out/ckpt.bin").write_bytes(data)  # close returns once it is in the bucket
        assert moto.get(bucket, "out/ckpt.bin") == data
        pid = daemon_pid(mnt)
        assert run("umount", str(mnt)).returncode == 0
        assert str(mnt) not in fuse_mounts() and gone(pid)
    assert moto.get(bucket, "out/ckpt.bin") == data


def test_fstab_line_with_mount_T(helper: None, moto: Server, bucket: str, tmp_path: Path) -> None:
    files = {f"d/{i}.txt": f"line {i}\n".encode() for i in range(5)}
    moto.upload(bucket, files)
    mnt, cache = tmp_path / "data", tmp_path / "cache"
    creds = credentials_file(tmp_path, moto)
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# a test fstab\n"
        f"s3://{bucket}/d  {mnt}  fuse.cachefs  ro,_netdev,nofail,x-systemd.after=network-online.target,"
        f"credentials={creds},endpoint_url={moto.endpoint_url},cache_dir={cache},cache_size=20M  0  0\n")
    with cleanup(mnt, cache):
        res = run("mount", "-T", str(fstab), str(mnt))
        assert res.returncode == 0, res.stderr
        assert sorted(os.listdir(mnt)) == [f"{i}.txt" for i in range(5)]
        assert (mnt / "3.txt").read_bytes() == b"line 3\n"
        assert "ro" in mount_entry(mnt)[2]
        pid = daemon_pid(mnt)
        assert run("umount", str(mnt)).returncode == 0
        assert gone(pid)
        # `mount -a` over the same file mounts it too, and a second `mount -a` leaves it be.
        res = run("mount", "-T", str(fstab), "-a", "-t", "fuse.cachefs")
        assert res.returncode == 0, res.stderr
        assert (mnt / "0.txt").read_bytes() == b"line 0\n"
        res = run("mount", "-T", str(fstab), "-a", "-t", "fuse.cachefs")
        assert res.returncode == 0, res.stderr
        assert run("umount", str(mnt)).returncode == 0


def test_fuse3_mount_helper_runs_cachefs_from_path(moto: Server, bucket: str, tmp_path: Path) -> None:
    """Without /sbin/mount.fuse.cachefs, mount(8) runs fuse3's mount.fuse, which runs
    `cachefs SOURCE MOUNTPOINT -o OPTIONS` from PATH: that form mounts too."""
    moto.upload(bucket, {"a.txt": b"via mount.fuse3\n"})
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    creds = credentials_file(tmp_path, moto)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "cachefs").write_text(f"#!/bin/sh\nPYTHONPATH='{REPO}' exec '{sys.executable}' -m cachefs.cli \"$@\"\n")
    (bindir / "cachefs").chmod(0o755)
    env = dict(clean_env(), PATH=f"{bindir}:{os.environ['PATH']}")
    with cleanup(mnt, cache):
        res = run("mount.fuse3", f"s3://{bucket}", str(mnt), "-t", "fuse.cachefs", "-o",
                  f"ro,nofail,_netdev,credentials={creds},endpoint_url={moto.endpoint_url},cache_dir={cache}",
                  env=env)
        assert res.returncode == 0, res.stderr
        assert (mnt / "a.txt").read_bytes() == b"via mount.fuse3\n"
        assert run("umount", str(mnt)).returncode == 0


def test_sloppy_and_fake(helper: None, moto: Server, bucket: str, tmp_path: Path) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    creds = credentials_file(tmp_path, moto)
    base = f"ro,credentials={creds},endpoint_url={moto.endpoint_url},cache_dir={cache}"
    with cleanup(mnt, cache):
        # -f: everything checked, nothing mounted.
        res = run("mount", "-f", "-t", "fuse.cachefs", f"s3://{bucket}", str(mnt), "-o", base)
        assert res.returncode == 0 and str(mnt) not in fuse_mounts(), res.stderr
        res = run("mount", "-f", "-t", "fuse.cachefs", f"s3://{bucket}", str(mnt), "-o", base + ",cache_size=x")
        assert res.returncode == 2 and "cache_size" in res.stderr
        # -s: an option cachefs does not know is ignored instead of refused.
        res = run("mount", "-s", "-t", "fuse.cachefs", f"s3://{bucket}", str(mnt), "-o", base + ",some_fs_option=1")
        assert res.returncode == 0, res.stderr
        assert str(mnt) in fuse_mounts()
        assert run("umount", str(mnt)).returncode == 0


BAD = [
    ("cache_size=lots", 2, "-o cache_size=lots: not a size"),
    ("colour=blue", 2, "unknown mount option 'colour'"),
    ("cache_dir", 2, "-o cache_dir needs a value"),
    ("prefetch=maybe", 2, "-o prefetch=maybe: not a boolean"),
    ("cache_policy=fifo", 2, "must be one of stable, lru"),
    ("uid=-1", 2, "must not be negative"),
    ("credentials=/nonexistent/creds", 2, "credentials file /nonexistent/creds does not exist"),
    ("WORLD_READABLE", 2, "is readable by other users"),
    ("NO_CREDENTIALS", 3, "no AWS credentials found"),
    ("MISSING_BUCKET", 3, "does not exist"),
]


@pytest.mark.parametrize(("option", "code", "message"), BAD, ids=[b[0].split("=")[0].lower() for b in BAD])
def test_bad_options_one_line_and_nonzero(helper: None, moto: Server, bucket: str, tmp_path: Path,
                                          option: str, code: int, message: str) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    creds = credentials_file(tmp_path, moto)
    source = f"s3://{bucket}"
    if option == "WORLD_READABLE":
        creds.chmod(0o644)
        option = f"credentials={creds}"
    elif option == "NO_CREDENTIALS":
        option, creds = "ro", tmp_path / "empty.env"  # moto takes any key, but a key it needs
        creds.write_text("AWS_EC2_METADATA_DISABLED=true\n")
        creds.chmod(0o600)
    elif option == "MISSING_BUCKET":
        option, source = "ro", "s3://no-such-bucket-fstab"
    opts = f"{option},credentials={creds},endpoint_url={moto.endpoint_url},cache_dir={cache}"
    if option.startswith("credentials="):
        opts = f"{option},endpoint_url={moto.endpoint_url},cache_dir={cache}"
    with cleanup(mnt, cache):
        res = run("mount", "-t", "fuse.cachefs", source, str(mnt), "-o", opts, timeout=60)
        assert res.returncode == code, res.stderr
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("cachefs: "), res.stderr
        assert message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and res.stdout == ""
        assert str(mnt) not in fuse_mounts()
