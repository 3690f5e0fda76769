"""Object keys that cannot be file names, through a real mount (README, "Keys that are not file
names"): nothing escapes the mountpoint, nothing crashes, and the tree is exactly what the
documented rules give. The rules are written out again here (``expected``), independently of
``cachefs/metadata/names.py``, and a property-based test checks random key sets against them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs.testing.servers import Server
from tests.fuse.mounts import mounted
from tests.fuse.stores import Bucket

from .helpers import Faulty

pytestmark = pytest.mark.timeout(600)

NAME_MAX = 255
LONG_OK = "L" * NAME_MAX  # exactly NAME_MAX bytes: shown
LONG_BAD = "L" * (NAME_MAX + 1)  # one byte over: hidden
WIDE_OK = "é" * 127 + "e"  # 255 bytes in UTF-8 (128 characters)
WIDE_BAD = "é" * 128  # 256 bytes in UTF-8 (128 characters): hidden


def _valid(segment: str) -> bool:
    return segment not in ("", ".", "..") and "\0" not in segment and len(segment.encode()) <= NAME_MAX


def expected(keys: list[str]) -> tuple[set[str], dict[str, str]]:
    """(directories, {file: key}) that the README's rules give for ``keys``:
    - a key is shown only if every segment is a valid name (not empty, ".", "..", NUL, > 255 bytes);
    - a key ending in "/" is a directory marker (the directory; its content is not shown);
    - every leading part of a key whose segments are all valid is a prefix in the bucket, so it is
      a directory, even when the rest of the key is hidden;
    - a key that is both an object and a prefix is the directory."""
    dirs: set[str] = set()
    files: dict[str, str] = {}
    for key in keys:
        marker = key.endswith("/")
        segments = (key[:-1] if marker else key).split("/")
        if segments == [""] and marker:
            continue  # "/" : the root's own marker
        for i in range(1, len(segments)):
            if not all(_valid(s) for s in segments[:i]):
                break
            dirs.add("/".join(segments[:i]))
        if all(_valid(s) for s in segments):
            if marker:
                dirs.add("/".join(segments))
            else:
                files["/".join(segments)] = key
    return dirs, {f: k for f, k in files.items() if f not in dirs}


def observed(root: Path) -> tuple[set[str], set[str]]:
    """(directories, files) under root, checking on the way that nothing leads out of it."""
    real_root = os.path.realpath(root)
    dirs: set[str] = set()
    files: set[str] = set()
    for d, dnames, fnames in os.walk(root):
        for n in dnames + fnames:
            assert n not in (".", "..", "") and "/" not in n, repr(n)
            p = os.path.join(d, n)
            assert os.path.realpath(p).startswith(real_root + os.sep), p
            assert not os.path.islink(p), p
        rel = os.path.relpath(d, root)
        dirs.update(os.path.normpath(os.path.join(rel, n)) for n in dnames)
        files.update(os.path.normpath(os.path.join(rel, n)) for n in fnames)
    return dirs, files


def body(key: str) -> bytes:
    """Each object holds its own key, so a file shows which object it was read from."""
    return b"key:" + key.encode()


def check_mount(bucket: Bucket, keys: list[str], work: Path) -> None:
    bucket.put_many({k: body(k) for k in keys})
    want_dirs, want_files = expected(keys)
    with mounted(bucket.source, work / "mnt", work / "cache", bucket.mount_env, *bucket.mount_args,
                 "--backend-timeout", "5") as m:
        got_dirs, got_files = observed(m.path)
        assert (got_dirs, got_files) == (want_dirs, set(want_files)), keys
        for rel, key in want_files.items():
            assert (m.path / rel).read_bytes() == body(key), (rel, key)
        for rel in want_dirs:
            assert (m.path / rel).is_dir()
        # ".." of the root is the mountpoint's parent (the kernel's, not the bucket's)
        assert os.path.realpath(m.path / "..") == os.path.realpath(work)
        assert m.status()["pid"]  # the daemon is still there


HOSTILE = [
    "..", ".", "../escape", "../../etc/passwd", "x/../y", "x/./y", "x/..", "a//b", "//double", "/lead",
    "trail/", "withcontent/",  # markers (one with a body)
    "both", "both/child",  # an object and a prefix
    "deep/both", "deep/both/x/y",
    f"{LONG_OK}/ok", f"{LONG_BAD}/hidden", f"d/{LONG_BAD}", WIDE_OK, WIDE_BAD,
    "sp ace/fi le", "ünï/cødé ✓", "tab\tname", "cr\rname", "pct%41", "plus+eq=", "q?x#y", "til~de",
    "brack[0]{1}", "semi;colon:", "quote\"'`", "back\\slash",
]


def test_hostile_keys_s3(moto: Server, tmp_path: Path) -> None:
    name = f"h-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    bucket = Bucket("s3", name, moto.endpoint_url, moto.env, moto.s3_client())
    check_mount(bucket, HOSTILE, tmp_path)


def test_hostile_keys_azure(faulty_azurite: Faulty, tmp_path: Path) -> None:
    # Azure itself refuses "." and ".." segments and turns "\" into "/"; newlines it stores.
    keys = [k for k in HOSTILE if "\\" not in k and "." not in k.split("/") and ".." not in k.split("/")]
    keys += ["new\nline", "dir\nname/file"]
    check_mount(faulty_azurite.bucket, keys, tmp_path)


def test_file_source_with_names_that_are_not_utf8(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    names = {b"caf\xe9.bin": b"latin-1 name", b"sub/\xff\xfe.bin": b"not utf-8 at all",
             "ok ✓.txt".encode(): b"utf-8 name"}
    for name, data in names.items():
        with open(os.path.join(os.fsencode(src), name), "wb") as f:
            f.write(data)
    with mounted(f"file://{src}", tmp_path / "mnt", tmp_path / "cache", dict(os.environ)) as m:
        root = os.fsencode(m.path)
        assert sorted(os.listdir(root)) == sorted([b"caf\xe9.bin", "ok ✓.txt".encode(), b"sub"])
        assert os.listdir(os.path.join(root, b"sub")) == [b"\xff\xfe.bin"]
        for name, data in names.items():
            with open(os.path.join(root, name), "rb") as f:
                assert f.read() == data
        with pytest.raises(FileNotFoundError):
            os.stat(os.path.join(root, "café.bin".encode()))  # the UTF-8 spelling is another name


# -- property: random key sets against the model --------------------------------------------

SEGMENTS = ["", ".", "..", "a", "b", "c", "data", "x y", "ü", "✓", "t\tab", "%2F", "~", "#", "q?", "é",
            LONG_OK, LONG_BAD, WIDE_OK, WIDE_BAD]
key_strategy = st.builds(
    lambda segs, marker: "/".join(segs) + ("/" if marker else ""),
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4),
    st.booleans() | st.just(False),
).filter(lambda k: 0 < len(k.encode()) <= 1024)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(keys=st.lists(key_strategy, min_size=1, max_size=12, unique=True))
def test_random_key_sets_match_the_documented_rules(moto: Server, keys: list[str]) -> None:
    name = f"p-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    bucket = Bucket("s3", name, moto.endpoint_url, moto.env, moto.s3_client())
    work = Path(tempfile.mkdtemp(prefix="cachefs-prop-"))
    try:
        check_mount(bucket, keys, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_model_examples() -> None:
    """The model itself, on the README's table."""
    dirs, files = expected(["a//b", "/a", "a/./b", "a/../b", f"{LONG_BAD}/x", "dir/", "dir/f", "p", "p/q"])
    assert dirs == {"a", "dir", "p"} and set(files) == {"dir/f", "p/q"}


def test_file_source_symlinks_lead_nowhere(tmp_path: Path) -> None:
    """A symbolic link in a file:// source (to a file or a directory outside it, or inside it)
    is not shown and cannot be read through the mount: the mount shows what is in the directory,
    never what a link points at (as root with --allow-other that could be /etc/shadow)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside the source\n")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "real.txt").write_text("inside\n")
    (src / "to-file").symlink_to(outside / "secret.txt")
    (src / "to-dir").symlink_to(outside)
    (src / "to-inside").symlink_to(src / "d" / "real.txt")
    (src / "d" / "up").symlink_to("..")
    with mounted(f"file://{src}", tmp_path / "mnt", tmp_path / "cache", dict(os.environ)) as m:
        dirs, files = observed(m.path)
        assert (dirs, files) == ({"d"}, {"d/real.txt"})
        for name in ("to-file", "to-dir/secret.txt", "to-inside", "d/up/d/real.txt"):
            with pytest.raises(FileNotFoundError):
                (m.path / name).read_bytes()
        assert (m.path / "d/real.txt").read_text() == "inside\n"
