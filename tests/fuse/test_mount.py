"""Real FUSE mounts made by the ``cachefs`` command, against moto, SeaweedFS and Azurite.

Each test asserts what a user of the mount observes: the tree, the bytes, errno values, and (from
``cachefs status``) whether the backend was asked again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import time
from pathlib import Path

import pytest

from .mounts import cachefs, fuse_mounts, mounted
from .stores import Bucket

pytestmark = pytest.mark.timeout(600)

RNG = random.Random(42)
LARGE = 64 * 1024 * 1024 + 12345  # crosses many 4 MiB blocks, not block-aligned
WIDE = 2600  # more entries than one list page (1000) and than Azure's page (5000 / 2 pages of walk)

SMALL = {
    "train/cat/001.jpg": RNG.randbytes(110_000),
    "train/cat/002.jpg": RNG.randbytes(90_000),
    "train/dog/deep/er/003.jpg": RNG.randbytes(5_000),
    "val/with space/and ünïcødé ✓.txt": b"names with spaces and unicode\n",
    "empty.bin": b"",
    "markers/": b"",  # a directory marker object
    "markers/inside/": b"",
    "prefix-only/x/y.txt": b"a prefix with no markers\n",
}


def expected_tree(keys: list[str]) -> tuple[set[str], set[str]]:
    """(dirs, files) relative paths that the documented rules give for these keys."""
    dirs: set[str] = set()
    files: set[str] = set()
    for key in keys:
        parts = key.rstrip("/").split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
        (dirs if key.endswith("/") else files).add(key.rstrip("/"))
    return dirs, files


def walk(root: Path) -> tuple[set[str], set[str]]:
    dirs: set[str] = set()
    files: set[str] = set()
    for d, dnames, fnames in os.walk(root):
        rel = os.path.relpath(d, root)
        for n in dnames:
            dirs.add(os.path.normpath(os.path.join(rel, n)))
        for n in fnames:
            files.add(os.path.normpath(os.path.join(rel, n)))
    return dirs, files


@pytest.fixture(scope="module")
def dataset(any_bucket: Bucket) -> dict[str, bytes]:
    objects = dict(SMALL)
    objects.update({f"wide/f{i:05d}": str(i).encode() for i in range(WIDE)})
    objects["large/blob.bin"] = RNG.randbytes(LARGE)
    any_bucket.put_many(objects)
    return objects


def test_tree_and_contents_match_the_bucket(any_bucket: Bucket, dataset: dict[str, bytes], tmp_path: Path) -> None:
    with mounted(any_bucket.source, tmp_path / "mnt", tmp_path / "cache", any_bucket.mount_env,
                 *any_bucket.mount_args) as m:
        assert walk(m.path) == expected_tree(list(dataset))
        assert len(os.listdir(m.path / "wide")) == WIDE
        for key, data in dataset.items():
            if key.endswith("/"):
                assert (m.path / key).is_dir()
                continue
            st = os.stat(m.path / key)
            assert st.st_size == len(data)
            with open(m.path / key, "rb") as f:
                got = f.read()
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), key
        # random offsets and lengths in the large object
        blob = dataset["large/blob.bin"]
        with open(m.path / "large/blob.bin", "rb") as f:
            for _ in range(200):
                off = RNG.randrange(len(blob))
                n = RNG.randrange(1, 3_000_000)
                f.seek(off)
                assert f.read(n) == blob[off:off + n]
        st = os.statvfs(m.path)
        assert st.f_files == len([k for k in dataset if not k.endswith("/")])


def test_cache_serves_second_reads_and_survives_remount(any_bucket: Bucket, dataset: dict[str, bytes],
                                                         tmp_path: Path) -> None:
    keys = ["train/cat/001.jpg", "train/cat/002.jpg", "train/dog/deep/er/003.jpg"]
    cache = tmp_path / "cache"
    with mounted(any_bucket.source, tmp_path / "mnt", cache, any_bucket.mount_env, *any_bucket.mount_args) as m:
        for k in keys:
            assert (m.path / k).read_bytes() == dataset[k]
        gets = m.gets()
        assert gets >= len(keys)
        for k in keys:
            assert (m.path / k).read_bytes() == dataset[k]
        assert m.gets() == gets
        inode = os.stat(m.path / keys[0]).st_ino
    with mounted(any_bucket.source, tmp_path / "mnt", cache, any_bucket.mount_env, *any_bucket.mount_args) as m:
        for k in keys:
            assert (m.path / k).read_bytes() == dataset[k]
        assert m.gets() == 0
        assert os.stat(m.path / keys[0]).st_ino == inode


def test_overwritten_object_is_served_fresh_after_ttl(any_bucket: Bucket, tmp_path: Path) -> None:
    old = RNG.randbytes(6 * 1024 * 1024)  # two blocks: a mix of versions would show
    new = RNG.randbytes(5 * 1024 * 1024 + 7)
    any_bucket.put("fresh/obj.bin", old)
    any_bucket.put("fresh/small.txt", b"version one")
    with mounted(any_bucket.source, tmp_path / "mnt", tmp_path / "cache", any_bucket.mount_env,
                 *any_bucket.mount_args, "--metadata-ttl", "1") as m:
        assert (m.path / "fresh/obj.bin").read_bytes() == old
        assert (m.path / "fresh/small.txt").read_bytes() == b"version one"
        any_bucket.put("fresh/obj.bin", new)
        any_bucket.put("fresh/small.txt", b"version two, longer")
        time.sleep(1.5)
        # Past the TTL, a lookup answers from the listing at once and relists in the background
        # (stale-while-revalidate): each read is the old version whole, until it is the new one.
        for path, versions in (("fresh/obj.bin", (old, new)), ("fresh/small.txt",
                                                              (b"version one", b"version two, longer"))):
            deadline = time.monotonic() + 20
            while (got := (m.path / path).read_bytes()) != versions[1]:
                assert got == versions[0], f"{path}: neither version"
                assert time.monotonic() < deadline, f"{path}: still the old version"
                time.sleep(0.2)
        any_bucket.delete("fresh/small.txt")
        time.sleep(1.5)
        deadline = time.monotonic() + 20
        while (m.path / "fresh/small.txt").exists():
            assert time.monotonic() < deadline, "a deleted object is still listed"
            time.sleep(0.2)


def test_read_only_and_missing(any_bucket: Bucket, dataset: dict[str, bytes], tmp_path: Path) -> None:
    with mounted(any_bucket.source, tmp_path / "mnt", tmp_path / "cache", any_bucket.mount_env,
                 *any_bucket.mount_args) as m:
        for action in (lambda: os.open(m.path / "new.txt", os.O_WRONLY | os.O_CREAT),
                       lambda: os.open(m.path / "train/cat/001.jpg", os.O_RDWR),
                       lambda: os.mkdir(m.path / "newdir"),
                       lambda: os.unlink(m.path / "empty.bin"),
                       lambda: os.rename(m.path / "empty.bin", m.path / "e2")):
            with pytest.raises(OSError) as info:
                action()
            assert info.value.errno == errno.EROFS
        with pytest.raises(FileNotFoundError):
            os.stat(m.path / "no/such/file")
        with pytest.raises(FileNotFoundError):
            os.open(m.path / "train/nope.jpg", os.O_RDONLY)


def test_bad_input_one_line_nonzero_no_mount(any_bucket: Bucket, tmp_path: Path) -> None:
    env = any_bucket.mount_env
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    nonempty = tmp_path / "full"
    nonempty.mkdir()
    (nonempty / "x").write_text("x")
    afile = tmp_path / "file"
    afile.write_text("x")
    ro_cache = tmp_path / "ro"
    ro_cache.mkdir()
    ro_cache.chmod(0o500)
    missing_bucket = "s3://no-such-bucket-zz" if any_bucket.kind == "s3" else "az://no-such-container-zz"
    cases = [
        (["mount", "gopher://x", str(mnt)], "unknown source scheme"),
        (["mount", missing_bucket, str(mnt), *any_bucket.mount_args], "does not exist"),
        (["mount", any_bucket.source, str(tmp_path / "absent"), *any_bucket.mount_args], "does not exist"),
        (["mount", any_bucket.source, str(afile), *any_bucket.mount_args], "not a directory"),
        (["mount", any_bucket.source, str(nonempty), *any_bucket.mount_args], "not empty"),
        (["mount", any_bucket.source, str(mnt), "--cache-dir", str(ro_cache / "sub"), *any_bucket.mount_args]
         if os.geteuid() != 0 else ["mount", any_bucket.source, str(mnt), "--cache-dir", str(afile / "sub"),
                                    *any_bucket.mount_args], "cache dir"),
        (["mount", any_bucket.source, str(mnt), "--cache-size", "huge"], "cache-size"),
        (["mount", any_bucket.source, str(mnt), "--no-such-flag"], "unrecognized arguments"),
    ]
    if any_bucket.kind == "s3":
        denied = dict(env, AWS_SECRET_ACCESS_KEY="wrong-secret", AWS_ACCESS_KEY_ID="wrong-key")
        res = cachefs("mount", any_bucket.source, str(mnt), "--cache-dir", str(tmp_path / "c0"),
                      *any_bucket.mount_args, env=denied)
        # moto accepts any credentials; SeaweedFS checks them
        if res.returncode != 0:
            assert res.returncode == 3 and len(res.stderr.strip().splitlines()) == 1, res.stderr
            assert "wrong-secret" not in res.stderr
        else:
            cachefs("unmount", str(mnt), env=env, check=True)
    # an endpoint nobody listens on
    if any_bucket.kind == "s3":
        cases.append((["mount", any_bucket.source, str(mnt), "--endpoint-url", "http://127.0.0.1:9"], "cannot reach"))
    else:
        dead = env["AZURE_STORAGE_CONNECTION_STRING"].split("BlobEndpoint=")[0] + \
            "BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;"
        res = cachefs("mount", any_bucket.source, str(mnt), "--cache-dir", str(tmp_path / "c1"),
                      env=dict(env, AZURE_STORAGE_CONNECTION_STRING=dead), timeout=60)
        assert res.returncode == 3 and "cannot reach" in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
        assert "AccountKey" not in res.stderr
    for args, needle in cases:
        if "--cache-dir" not in args:
            args = [*args, "--cache-dir", str(tmp_path / "cache")]
        res = cachefs(*args, env=env, timeout=60)
        assert res.returncode != 0, args
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, (args, res.stderr)
        assert needle in lines[0], (args, lines[0])
        assert "Traceback" not in res.stderr
        assert str(mnt) not in fuse_mounts()
    # already mounted
    with mounted(any_bucket.source, mnt, tmp_path / "cache", env, *any_bucket.mount_args):
        res = cachefs("mount", any_bucket.source, str(mnt), "--cache-dir", str(tmp_path / "c2"),
                      *any_bucket.mount_args, env=env)
        assert res.returncode == 4 and "already mounted" in res.stderr
        other = tmp_path / "mnt2"
        other.mkdir()
        # A second read-only daemon on the cache namespace takes a private one (tests/fuse/
        # test_shared_cache.py); a read-write one is refused.
        res = cachefs("mount", any_bucket.source, str(other), "--cache-dir", str(tmp_path / "cache"),
                      "--read-write", *any_bucket.mount_args, env=env)
        assert res.returncode == 4 and "another cachefs daemon" in res.stderr, res.stderr
        assert "read-write" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert str(other) not in fuse_mounts()
