"""Read-write logic without FUSE: the core, writer and local-directory backend inside trio."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import trio

from cachefs.cache.writer import PART_SIZE
from cachefs.fs.core import CoreFS, FsError
from cachefs.metadata import ROOT_INODE

from .test_core import backend_gets, make_tree, read_all, run_core


async def write_file(core: CoreFS, parent: int, name: str, data: bytes, chunk: int = 128 * 1024) -> int:
    fh, rec = await core.create(parent, name.encode())
    for off in range(0, len(data), chunk):
        assert await core.write(fh, off, data[off:off + chunk]) == len(data[off:off + chunk])
    await core.flush(fh)
    await core.release(fh)
    return rec.ino


def run_rw(tmp: Path, body, **kw) -> None:  # type: ignore[no-untyped-def]
    (tmp / "src").mkdir(exist_ok=True)
    run_core(tmp, body, read_write=True, **kw)


def test_create_write_close_is_in_the_bucket_and_reads_back_cached(tmp_path: Path) -> None:
    data = os.urandom(300_000)

    async def body(core: CoreFS) -> None:
        await write_file(core, ROOT_INODE, "ckpt.bin", data)
        assert (tmp_path / "src" / "ckpt.bin").read_bytes() == data
        rec = core.meta.resolve("ckpt.bin")
        assert rec is not None and not rec.local and rec.size == len(data)
        await trio.sleep(0.1)
        before = backend_gets()
        assert await read_all(core, "ckpt.bin") == data
        assert backend_gets() == before  # the written data became cached data

    run_rw(tmp_path, body)


def test_large_sequential_write_uploads_parts_before_close(tmp_path: Path) -> None:
    data = os.urandom(3 * PART_SIZE + 12345)

    async def body(core: CoreFS) -> None:
        fh, rec = await core.create(ROOT_INODE, b"big")
        chunk = 1 << 20
        for off in range(0, len(data), chunk):
            await core.write(fh, off, data[off:off + chunk])
        await trio.sleep(0.5)
        staged = core.writer.files[rec.ino]  # type: ignore[union-attr]
        assert len(staged.parts) >= 2, "parts behind the writer were uploaded while it wrote"
        await core.flush(fh)
        await core.release(fh)
        got = (tmp_path / "src" / "big").read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()

    run_rw(tmp_path, body)


def test_rename_over_existing_unlink_and_directories(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"ckpt": b"old checkpoint", "d/x": b"x", "d/y": b"y"})

    async def body(core: CoreFS) -> None:
        await core.walk()
        await write_file(core, ROOT_INODE, "ckpt.tmp", b"new checkpoint")
        await core.rename(ROOT_INODE, b"ckpt.tmp", ROOT_INODE, b"ckpt", 0)
        assert (tmp_path / "src" / "ckpt").read_bytes() == b"new checkpoint"
        assert not (tmp_path / "src" / "ckpt.tmp").exists()
        assert await read_all(core, "ckpt") == b"new checkpoint"

        d = await core.lookup(ROOT_INODE, b"d")
        await core.rename(ROOT_INODE, b"d", ROOT_INODE, b"e", 0)
        assert sorted(os.listdir(tmp_path / "src" / "e")) == ["x", "y"]
        assert not (tmp_path / "src" / "d").exists()
        assert await read_all(core, "e/y") == b"y"
        assert (await core.lookup(ROOT_INODE, b"e")).ino == d.ino

        await core.unlink(d.ino, b"x")
        assert not (tmp_path / "src" / "e" / "x").exists()
        with pytest.raises(FsError) as info:
            await core.rmdir(ROOT_INODE, b"e")
        assert info.value.errno == errno.ENOTEMPTY
        await core.unlink(d.ino, b"y")
        await core.rmdir(ROOT_INODE, b"e")
        with pytest.raises(FsError):
            await core.lookup(ROOT_INODE, b"e")

        new = await core.mkdir(ROOT_INODE, b"runs")
        assert (tmp_path / "src" / "runs").is_dir()
        await write_file(core, new.ino, "log.txt", b"epoch 1\n")
        assert (tmp_path / "src" / "runs" / "log.txt").read_bytes() == b"epoch 1\n"

    run_rw(tmp_path, body)


def test_directory_rename_over_the_limit_is_exdev(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {f"many/f{i}": b"." for i in range(5)})

    async def body(core: CoreFS) -> None:
        core.settings.rename_dir_limit = 4
        await core.walk()
        with pytest.raises(FsError) as info:
            await core.rename(ROOT_INODE, b"many", ROOT_INODE, b"other", 0)
        assert info.value.errno == errno.EXDEV
        assert len(os.listdir(tmp_path / "src" / "many")) == 5

    run_rw(tmp_path, body)


def test_truncate_and_append_to_an_existing_object(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"log": b"line 1\n"})

    async def body(core: CoreFS) -> None:
        rec = await core.lookup(ROOT_INODE, b"log")
        fh = await core.open_write(rec.ino, truncate=False)
        await core.write(fh, rec.size, b"line 2\n")
        await core.flush(fh)
        await core.release(fh)
        assert (tmp_path / "src" / "log").read_bytes() == b"line 1\nline 2\n"
        await core.truncate(rec.ino, 4, None)
        assert (tmp_path / "src" / "log").read_bytes() == b"line"
        await core.truncate(rec.ino, 10, None)
        assert (tmp_path / "src" / "log").read_bytes() == b"line" + b"\0" * 6
        assert core.record(rec.ino).size == 10

    run_rw(tmp_path, body)


def test_read_only_core_refuses_writes(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"f": b"data"})

    async def body(core: CoreFS) -> None:
        rec = await core.lookup(ROOT_INODE, b"f")
        for call in (core.open_write(rec.ino, False), core.mkdir(ROOT_INODE, b"d"),
                     core.unlink(ROOT_INODE, b"f")):
            with pytest.raises(FsError) as info:
                await call
            assert info.value.errno == errno.EROFS

    run_core(tmp_path, body)


def test_staged_data_is_recovered_after_a_crash(tmp_path: Path) -> None:
    data = os.urandom(200_000)

    async def writes_without_close(core: CoreFS) -> None:
        fh, _ = await core.create(ROOT_INODE, b"partial")
        await core.write(fh, 0, data)
        # the daemon dies here: no flush, no release

    async def restarted(core: CoreFS) -> None:
        assert core.writer is not None
        assert core.writer.recover() == ["partial"]
        for _ in range(50):
            if (tmp_path / "src" / "partial").exists() and not core.writer.pending():
                break
            await trio.sleep(0.1)
        assert (tmp_path / "src" / "partial").read_bytes() == data
        assert [r["state"] for r in core.writer.recovered][-1] == "recovered"

    run_rw(tmp_path, writes_without_close)
    assert not (tmp_path / "src" / "partial").exists()
    run_rw(tmp_path, restarted)
