"""Faults under a read-write mount, through the real ``cachefs`` command against real servers.

What a writer must observe (the durability contract of issue 8, in the README):

- transient store errors (503s, connection resets) during multipart uploads are retried
  invisibly: no write or close fails, and every byte lands in the bucket;
- an outage while a file is closed or fsync'd fails that ``close``/``fsync`` with EIO within
  ``--backend-timeout``; the daemon stays up, lists the file as pending, and its retry loop
  uploads it once the store is back;
- a full staging disk, or a ``--cache-size`` smaller than the file, gives ENOSPC on ``write`` or
  ``close``, and the daemon keeps serving reads;
- after ``kill -9`` in the middle of writes and uploads, a remount on the same cache dir finds
  every closed file whole in the bucket and uploads every file still being written from its
  staged data (a prefix of what was written, at least what ``write`` acknowledged), reporting it
  as recovered; nothing is left half-uploaded.

Every object is checked straight from the server (not through the mount or the proxy).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cachefs.cache.writer import PART_SIZE, RETRY_INTERVAL
from cachefs.testing.servers import Server, free_port
from tests.fuse.mounts import Mount, cachefs, fuse_mounts, mounted, scrape, wait_daemon_gone

from .helpers import Background, Faulty, alive, daemon_log, faulty_bucket, http_status, metric_sum, sha, wait_gone
from .test_resources import tmpfs

pytestmark = pytest.mark.timeout(400)

T = TypeVar("T")
MiB = 1 << 20
GONE = ("ENOTCONN", "ECONNABORTED")  # what a writer gets from a killed daemon
IN_FLIGHT = "cachefs_uploads_in_flight"
PUT_RETRIES = 'cachefs_backend_retries_total{operation="put"}'
PUTS_OK = 'cachefs_backend_requests_total{operation="put",outcome="ok"}'


# -- helpers ----------------------------------------------------------------------------------

def write_all(fd: int, data: bytes | memoryview) -> None:
    """write(2) until all of ``data`` is taken, as a buffered writer does (partial writes)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path: Path, data: bytes, chunk: int = MiB) -> None:
    """Create (or replace) ``path`` with ``data`` in ``chunk``-sized writes, then close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(data), chunk):
            write_all(fd, memoryview(data)[off:off + chunk])
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    os.close(fd)


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something other than None/False; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value is not None and value is not False:
                return value
        except Exception as exc:  # e.g. the object is not there yet
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s" + (f" (last error: {last!r})" if last else ""))
        time.sleep(interval)


def store_get(server: Server, bucket: str, key: str) -> bytes | None:
    """An object's bytes straight from the server, or None if there is none."""
    try:
        return server.get(bucket, key)
    except Exception as exc:
        if type(exc).__name__ in ("NoSuchKey", "ResourceNotFoundError"):  # boto3, azure-storage-blob
            return None
        raise


def open_multipart_uploads(server: Server, bucket: str) -> list[str]:
    """Multipart uploads begun and neither completed nor aborted (S3; Azure has none to list)."""
    if server.kind != "s3":
        return []
    uploads = server.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return sorted(f"{u['Key']} {u['UploadId']}" for u in uploads)


def writes(m: Mount) -> dict[str, Any]:
    """The "writes" section of ``cachefs status --json``."""
    w = m.status()["writes"]
    assert w is not None, "a read-write mount shows no write status"
    return dict(w)


def above(port: int, name: str, value: float) -> bool:
    """Whether the daemon's metric ``name`` is above ``value``."""
    return scrape(port).get(name, 0.0) > value


def errname(exc: BaseException | None) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return repr(exc)


def multipart_request(request_line: str) -> str | None:
    """What a request does in a multipart (block) upload, or None if it is not part of one."""
    for marker, what in (("partNumber=", "part"), ("comp=blocklist", "commit"), ("comp=block", "block"),
                         ("uploadId=", "complete"), ("?uploads", "start")):
        if marker in request_line:
            return what
    return None


def is_multipart(request_line: str) -> bool:
    return multipart_request(request_line) is not None


# -- 1. transient faults during multipart uploads ----------------------------------------------

LARGE_MIN, LARGE_MAX = 20 * MiB, 40 * MiB
SMALL_FILES = 60
MULTIPART_FAULTS = 3  # at least this many faults must hit multipart requests
MAX_BATCHES = 10  # of two large files; ~1.2 multipart faults expected per batch at 10 %


def test_transient_faults_during_multipart_uploads_land_every_byte(faulty_any: Faulty, tmp_path: Path) -> None:
    """10% of requests answered 503 or reset, while large files (20-40 MiB, 1 MiB writes, parts
    uploaded behind the writer) and small files are written: no write or close fails, every
    object in the bucket is byte for byte what was written, nothing is pending, and each fault
    that hit a part upload was retried. Large files are written in batches until at least
    MULTIPART_FAULTS faults have hit multipart requests and both kinds of fault have been drawn
    (at most MAX_BATCHES batches)."""
    b, proxy, server = faulty_any.bucket, faulty_any.proxy, faulty_any.server
    rng = random.Random(11)
    port = free_port()
    args = [*b.mount_args, "--read-write", "--metrics-addr", str(port), "--backend-timeout", "60"]
    digests: dict[str, tuple[int, bytes]] = {}
    lock = threading.Lock()

    def make(key: str, size: int, seed: int) -> bytes:
        data = random.Random(seed).randbytes(size)
        with lock:
            digests[key] = (size, sha(data))
        return data

    def large(root: Path, key: str, size: int, seed: int) -> None:
        write_file(root / key, make(key, size, seed), MiB)

    def smalls(root: Path, seed: int) -> None:
        r = random.Random(seed)
        for i in range(SMALL_FILES):
            key = f"logs/s{i:03d}.bin"
            write_file(root / key, make(key, r.randrange(100, 300_000), seed * 1000 + i), 64 * 1024)

    def multipart_faults() -> int:
        return sum(1 for _, line in list(proxy.stats.faulted) if is_multipart(line))

    batches = 0
    t0 = time.monotonic()
    with mounted(b.source, tmp_path / "mnt", tmp_path / "cache", b.mount_env, *args) as m:
        proxy.inject(("error", "reset"), rate=0.10)
        os.mkdir(m.path / "ckpt")
        os.mkdir(m.path / "logs")
        while batches < MAX_BATCHES and (batches == 0 or multipart_faults() < MULTIPART_FAULTS
                                         or not all(proxy.stats.faults[k] for k in ("error", "reset"))):
            jobs = [Background(large, m.path, f"ckpt/b{batches:02d}-{i}.bin",
                               rng.randrange(LARGE_MIN, LARGE_MAX), rng.randrange(1 << 30)) for i in range(2)]
            if batches == 0:
                jobs.append(Background(smalls, m.path, 5))
            for job in jobs:
                job.result(240)  # an OSError here is an error the writer saw: the test fails
            batches += 1
        took = time.monotonic() - t0
        status = writes(m)
        after = scrape(port)
        proxy.clear()
    log = daemon_log(tmp_path / "cache")
    faults = dict(proxy.stats.faults)
    faulted = list(proxy.stats.faulted)
    on_multipart = collections.Counter(f"{kind} {multipart_request(line)}" for kind, line in faulted
                                       if is_multipart(line))
    print(f"\n{b.kind}: {len(digests)} files ({sum(s for s, _ in digests.values()) / MiB:.0f} MiB, {batches} "
          f"batches of large files) written in {took:.1f} s; proxy saw {proxy.stats.requests} requests, faults "
          f"{faults}, {multipart_faults()} on multipart requests {dict(on_multipart)}; put retries "
          f"{after.get(PUT_RETRIES, 0):.0f}")
    wrong = []
    for key, (size, digest) in sorted(digests.items()):
        got = store_get(server, b.name, key)
        if got is None or sha(got) != digest:
            wrong.append(f"{key}: {'missing' if got is None else f'{len(got)} bytes'}, want {size}")
    assert wrong == [], wrong[:10]
    assert status["pending"] == [], status["pending"]
    assert multipart_faults() >= MULTIPART_FAULTS, faulted
    assert all(faults.get(k, 0) >= 1 for k in ("error", "reset")), faults
    # Every faulted part upload (and every other faulted put) was retried by cachefs.
    assert after.get(PUT_RETRIES, 0) >= multipart_faults(), (after.get(PUT_RETRIES), faulted)
    assert metric_sum(after, "cachefs_upload_failures_total") == 0
    assert "Traceback" not in log


# -- 2. an outage during close and fsync --------------------------------------------------------

TIMEOUT = 5.0  # --backend-timeout
SLACK = 3.0  # what close/fsync may take beyond it (a retry's backoff, FUSE round trips)
RETRY_DEADLINE = RETRY_INTERVAL + TIMEOUT + 30  # for the retry loop to upload after the outage


def timed(fn: Callable[[], object]) -> tuple[float, str]:
    """(seconds, "returned" or the errno name) of one call."""
    start = time.monotonic()
    try:
        fn()
    except OSError as exc:
        return time.monotonic() - start, errname(exc)
    return time.monotonic() - start, "returned"


@pytest.mark.parametrize(("server_name", "kind"), [("moto", "outage"), ("moto", "stall"), ("azurite", "outage")])
def test_outage_during_close_gives_eio_in_bounded_time_then_retry_uploads(
        request: pytest.FixtureRequest, server_name: str, kind: str, tmp_path: Path) -> None:
    """The store refuses every connection (outage) or accepts and never answers (stall) while
    three files are closed or fsync'd at once: small.bin (one PUT) is closed; synced.bin, whose
    finished parts were uploaded before, is fsync'd; fresh.bin, whose second part is still
    uploading, is closed. Each call fails with EIO within --backend-timeout (+ slack); the daemon
    stays up, serves cached data, and ``cachefs status`` lists the three files as pending with
    their error. Once the store is back, closing synced.bin uploads it, and the retry loop
    uploads the two closed files whole; nothing stays pending."""
    server: Server = request.getfixturevalue(server_name)
    with faulty_bucket(server, f"f-{uuid.uuid4().hex[:12]}") as fb:
        outage_during_close(fb, kind, tmp_path)


def outage_during_close(fb: Faulty, kind: str, tmp_path: Path) -> None:
    b, proxy, server = fb.bucket, fb.proxy, fb.server
    rng = random.Random(12)
    existing = rng.randbytes(300_000)
    b.put("old/existing.bin", existing)
    files = {"out/small.bin": rng.randbytes(3 * MiB + 17),
             "out/synced.bin": rng.randbytes(2 * PART_SIZE + 5 * MiB + 3),
             "out/fresh.bin": rng.randbytes(2 * PART_SIZE + 5 * MiB + 11)}
    port = free_port()
    args = [*b.mount_args, "--read-write", "--metrics-addr", str(port), "--backend-timeout", str(TIMEOUT)]
    problems: list[str] = []  # checked last, after the recovery
    with mounted(b.source, tmp_path / "mnt", tmp_path / "cache", b.mount_env, *args) as m:
        pid = int(m.status()["pid"])
        assert (m.path / "old/existing.bin").read_bytes() == existing  # now cached
        os.mkdir(m.path / "out")
        fds = {key: os.open(m.path / key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for key in files}

        def write(key: str, start: int, end: int) -> None:
            for off in range(start, end, MiB):
                write_all(fds[key], memoryview(files[key])[off:min(off + MiB, end)])

        write("out/small.bin", 0, len(files["out/small.bin"]))
        write("out/synced.bin", 0, len(files["out/synced.bin"]))
        # synced.bin's two finished parts are uploaded behind the writer: wait for them.
        wait_for("background part uploads", lambda: not above(port, IN_FLIGHT, 0), 30, 0.05)
        # fresh.bin: its multipart upload begins, then the store holds every answer, so the part
        # uploads that follow are in flight when the outage begins.
        puts = scrape(port)[PUTS_OK]
        write("out/fresh.bin", 0, PART_SIZE + MiB)
        wait_for("fresh.bin's multipart upload begun", functools.partial(above, port, PUTS_OK, puts), 20, 0.01)
        proxy.inject("stall", stall_seconds=600)
        write("out/fresh.bin", PART_SIZE + MiB, len(files["out/fresh.bin"]))
        wait_for("fresh.bin's parts in flight", functools.partial(above, port, IN_FLIGHT, 0), 20, 0.01)
        proxy.inject(kind, stall_seconds=600)

        calls = {"close small.bin": Background(timed, functools.partial(os.close, fds["out/small.bin"])),
                 "fsync synced.bin": Background(timed, functools.partial(os.fsync, fds["out/synced.bin"])),
                 "close fresh.bin": Background(timed, functools.partial(os.close, fds["out/fresh.bin"]))}
        outcomes = {what: call.result(120) for what, call in calls.items()}
        during = writes(m)
        health = http_status(port, "/healthz")
        cached_ok = (m.path / "old/existing.bin").read_bytes() == existing
        daemon_up = alive(pid)
        sample = scrape(port)
        print(f"\n{b.kind} {kind} (--backend-timeout {TIMEOUT:g}): "
              + ", ".join(f"{what}: {res} after {t:.1f} s" for what, (t, res) in outcomes.items()))
        print("pending during the outage:", [(p["name"], p["state"], p["error"][:70]) for p in during["pending"]])
        assert {what: res for what, (_, res) in outcomes.items()} == dict.fromkeys(outcomes, "EIO")
        assert daemon_up and health == 200 and cached_ok
        assert sorted(p["name"] for p in during["pending"]) == sorted(files)
        assert all(p["error"] for p in during["pending"]), during["pending"]
        assert sample.get('cachefs_upload_failures_total{errno="EIO"}', 0) >= 3
        slow = {what: round(t, 1) for what, (t, _) in outcomes.items() if t > TIMEOUT + SLACK}
        if slow:
            problems.append(f"EIO later than --backend-timeout {TIMEOUT:g} s + {SLACK:g} s: {slow}")
        vague = [p["error"] for p in during["pending"] if "sub-exception" in p["error"]]
        if vague:
            problems.append(f"cachefs status shows no store error, only {vague}")

        proxy.clear()
        t_clear = time.monotonic()
        # The still open file: its close uploads it now.
        closed = timed(functools.partial(os.close, fds["out/synced.bin"]))
        assert closed[1] == "returned", closed
        got = store_get(server, b.name, "out/synced.bin")
        assert got is not None and sha(got) == sha(files["out/synced.bin"]), "close returned, object not whole"

        def landed(key: str) -> bool:
            got = store_get(server, b.name, key)
            return got is not None and sha(got) == sha(files[key])

        for key in ("out/small.bin", "out/fresh.bin"):  # closed during the outage: the retry loop
            wait_for(f"{key} uploaded by the retry loop", functools.partial(landed, key), RETRY_DEADLINE, 0.5)
        uploaded_after = time.monotonic() - t_clear
        wait_for("no pending writes", lambda: writes(m)["pending"] == [], 30)
        assert int(m.status()["pid"]) == pid
        for key, data in files.items():  # and through the mount
            assert sha((m.path / key).read_bytes()) == sha(data), key
    print(f"closed files uploaded by the retry loop {uploaded_after:.1f} s after the store came back")
    log = daemon_log(tmp_path / "cache")
    # Each failure the writers saw is in the log too, with the store's error (not only there).
    failures = [line for line in log.splitlines() if " WARNING " in line and "out/" in line]
    assert any("small.bin" in line for line in failures) and any("fresh.bin" in line for line in failures), log
    unexpected = re.findall(r"unexpected error in \w+", log)
    if unexpected:
        problems.append(f"a store failure logged as an unexpected error with a traceback: {sorted(set(unexpected))}")
    assert problems == [], "\n".join(problems)


# -- 3. a full staging disk, a cache smaller than the file -------------------------------------

def write_until_error(path: Path, data: bytes) -> tuple[int, str, str]:
    """Write ``data`` in 1 MiB writes; (bytes acknowledged, errno of the failed write, errno of
    close), "" where it succeeded. Stops writing at the first failed write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    acked, write_err, close_err = 0, "", ""
    try:
        while acked < len(data):
            acked += os.write(fd, memoryview(data)[acked:acked + MiB])
    except OSError as exc:
        write_err = errname(exc)
    try:
        os.close(fd)
    except OSError as exc:
        close_err = errname(exc)
    return acked, write_err, close_err


def read_everything(root: Path, objects: dict[str, bytes]) -> list[str]:
    wrong = []
    for key, data in objects.items():
        try:
            if sha((root / key).read_bytes()) != sha(data):
                wrong.append(f"{key}: wrong bytes")
        except OSError as exc:
            wrong.append(f"{key}: {errname(exc)}")
    return wrong


@pytest.mark.parametrize("limit", ["tmpfs", "cache-size"])
def test_staging_full_gives_enospc_and_reads_go_on(faulty_moto: Faulty, limit: str, tmp_path: Path) -> None:
    """A file larger than the staging room: the cache dir on a 16 MiB tmpfs, or --cache-size 8M
    on a roomy disk. Writing it fails with ENOSPC on a write or on close (never EIO, never
    success for every byte); meanwhile and afterwards the daemon serves every existing object
    (cached or not) byte for byte, and once the failed file is deleted a new file can be
    written and lands in the bucket."""
    b, server = faulty_moto.bucket, faulty_moto.server
    rng = random.Random(13)
    objects = {f"data/f{i:02d}.bin": rng.randbytes(200_000 + i) for i in range(20)}  # ~4 MiB
    b.put_many(objects)
    port = free_port()
    size = 40 * MiB if limit == "tmpfs" else 24 * MiB
    big = rng.randbytes(size)
    args = [*b.mount_args, "--read-write", "--metrics-addr", str(port)]
    cache = tmp_path / "cache"
    with contextlib.ExitStack() as stack:
        if limit == "tmpfs":
            stack.enter_context(tmpfs(cache, "16m"))
        else:
            args += ["--cache-size", "8M"]
        m = stack.enter_context(mounted(b.source, tmp_path / "mnt", cache, b.mount_env, *args))
        pid = int(m.status()["pid"])
        cached = dict(list(objects.items())[:10])
        assert read_everything(m.path, cached) == []
        # Readers keep going while the big file is written.
        stop = threading.Event()
        reader_errors: list[str] = []

        def read_loop() -> int:
            n = 0
            while not stop.is_set():
                reader_errors.extend(read_everything(m.path, objects))
                n += 1
            return n

        readers = Background(read_loop)
        try:
            acked, write_err, close_err = write_until_error(m.path / "big.bin", big)
        finally:
            stop.set()
        rounds = readers.result(120)
        print(f"\n{limit}: {size // MiB} MiB file: {acked / MiB:.1f} MiB acknowledged, write: {write_err or 'ok'}, "
              f"close: {close_err or 'ok'}; {rounds} concurrent full reads, errors {reader_errors[:3]}")
        assert alive(pid)
        assert reader_errors == []
        assert "ENOSPC" in (write_err, close_err), (write_err, close_err)
        assert {write_err, close_err} <= {"", "ENOSPC"}, (write_err, close_err)
        if not close_err:  # close returned: the bucket holds what write() acknowledged
            got = store_get(server, b.name, "big.bin")
            assert got is not None and sha(got) == sha(big[:acked]), (None if got is None else len(got), acked)
        # After the failure: every existing object, cached or not, still reads back whole.
        assert read_everything(m.path, objects) == []
        sample = scrape(port)
        assert sample.get('cachefs_fuse_errors_total{errno="EIO",operation="read"}', 0) == 0
        # Delete the failed file: its room is free again, and a new file is written and uploaded.
        os.unlink(m.path / "big.bin")
        wait_for("no pending writes", lambda: writes(m)["pending"] == [], 30)
        after = rng.randbytes(3 * MiB)
        write_file(m.path / "after.bin", after)
        assert store_get(server, b.name, "after.bin") == after
        assert store_get(server, b.name, "big.bin") is None
        assert http_status(port, "/healthz") == 200 and int(m.status()["pid"]) == pid
        m.unmount()
        wait_daemon_gone(cache)
        assert "Traceback" not in daemon_log(cache)


# -- 4. kill -9 while writing and uploading ----------------------------------------------------

ROUNDS = 12
KINDS = ("small", "parts", "stalled", "closing")  # round r is KINDS[r % 4]
MID_LARGE = 32 * MiB
RECOVERY_DEADLINE = 60.0


@dataclass
class Progress:
    """What one writer got acknowledged before the daemon was killed."""

    key: str
    data: bytes = field(repr=False)
    opened: bool = False
    acked: int = 0  # bytes write() returned for, from offset 0
    synced: int = 0  # bytes covered by an fsync that returned
    closing: threading.Event = field(default_factory=threading.Event)
    closed: bool = False
    error: str = ""
    error_before_kill: bool = False


def write_until_killed(root: Path, prog: Progress, chunk: int, killed: threading.Event,
                       fsync_at: int | None = None, hold_close: threading.Event | None = None) -> None:
    fd = -1
    try:
        fd = os.open(root / prog.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        prog.opened = True
        while prog.acked < len(prog.data):
            end = min(prog.acked + chunk, len(prog.data))
            prog.acked += os.write(fd, memoryview(prog.data)[prog.acked:end])
            if fsync_at is not None and not prog.synced and prog.acked >= fsync_at:
                os.fsync(fd)
                prog.synced = prog.acked
        if hold_close is not None:
            hold_close.wait(60)
        prog.closing.set()
        fd, closing = -1, fd
        os.close(closing)
        prog.closed = True
    except OSError as exc:
        prog.error = errname(exc)
        prog.error_before_kill = not killed.is_set()
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def wait_progress(prog: Progress, at_least: int, timeout: float = 60) -> None:
    """Until the writer has ``at_least`` bytes acknowledged (it must not fail before the kill)."""
    deadline = time.monotonic() + timeout
    while prog.acked < at_least:
        if prog.error:
            pytest.fail(f"{prog.key}: {prog.error} after {prog.acked} bytes, before the kill")
        if time.monotonic() > deadline:
            raise AssertionError(f"{prog.key}: {prog.acked} bytes acknowledged after {timeout:g} s, "
                                 f"want {at_least}")
        time.sleep(0.002)


@contextlib.contextmanager
def crash_bucket(seaweed: Server) -> Iterator[Faulty]:
    with faulty_bucket(seaweed, f"c-{uuid.uuid4().hex[:12]}", latency=0.002) as fb:
        yield fb


def test_kill9_while_writing_and_uploading_then_remount(seaweed: Server, tmp_path: Path) -> None:
    """ROUNDS rounds on one cache dir, SeaweedFS behind the proxy. Each round writes and closes
    a few files (one multipart file every other round) and checks them in the bucket at once;
    then a writer is in the middle of a file when the daemon gets ``kill -9``:
    - small: a 4 MiB file replacing an existing object, 64 KiB writes, fsync'd after 1 MiB;
    - parts: a 32 MiB file in 1 MiB writes, parts uploading behind the writer (proxy latency);
    - stalled: the same with every request held by the proxy: part uploads are in flight;
    - closing: a 20 MiB file fully written, killed while its close uploads (held by the proxy).
    The next mount on the same cache dir (over the stale mountpoint) must upload the file from its
    staged data: the object is a prefix of what was written, at least what write() and fsync()
    acknowledged; it is listed as recovered in ``cachefs status`` and in the log; closed files
    are unchanged; no multipart upload is left open."""
    rng = random.Random(14)
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    truth: dict[str, bytes] = {}  # key -> the bytes the bucket must hold
    checked: dict[str, str] = {}  # key -> ETag of the version found equal to truth
    rounds: list[str] = []
    leaks: list[str] = []
    t_start = time.monotonic()
    with crash_bucket(seaweed) as fb:
        b, proxy, server = fb.bucket, fb.proxy, fb.server
        port = free_port()
        args = ["mount", b.source, str(mnt), "--cache-dir", str(cache), *b.mount_args, "--read-write",
                "--metrics-addr", str(port), "--backend-timeout", "20"]
        env = b.mount_env
        m = Mount(mnt, cache, env, args)
        mid: Progress | None = None
        pid = 0
        try:
            for r in range(ROUNDS + 1):
                t_round = time.monotonic()
                proxy.clear()
                cachefs(*args, env=env, check=True)  # over the stale mountpoint of the last crash
                pid = int(m.status()["pid"])
                if mid is not None:
                    leaks += check_recovery(m, server, b.name, mid, truth, r - 1)
                check_bucket(server, b.name, truth, checked if r < ROUNDS else None)  # at the end: all
                if r == ROUNDS:
                    break
                kind = KINDS[r % len(KINDS)]
                # Files closed before the crash: in the bucket, whole, as soon as close returns.
                os.makedirs(mnt / f"r{r:02d}")
                closed = {f"r{r:02d}/c{i}.bin": rng.randbytes(rng.randrange(1, 256 * 1024)) for i in range(3)}
                if r % 2 == 0:
                    closed[f"r{r:02d}/big.bin"] = rng.randbytes(PART_SIZE + rng.randrange(1, 2 * PART_SIZE))
                for key, data in closed.items():
                    write_file(mnt / key, data)
                    got = store_get(server, b.name, key)
                    assert got is not None and sha(got) == sha(data), f"round {r}: {key} not whole after close"
                truth.update(closed)
                # The writer in the middle of a file.
                killed = threading.Event()
                hold = threading.Event()
                if kind == "small":
                    key = f"r{r - 1:02d}/c0.bin" if r > 0 else f"r{r:02d}/mid.bin"  # replaces an object
                    mid = Progress(key, rng.randbytes(4 * MiB))
                    job = Background(write_until_killed, mnt, mid, 64 * 1024, killed, MiB)
                    wait_progress(mid, rng.randrange(MiB + 1, 4 * MiB - 64 * 1024))
                elif kind in ("parts", "stalled"):
                    mid = Progress(f"r{r:02d}/mid.bin", rng.randbytes(MID_LARGE))
                    job = Background(write_until_killed, mnt, mid, MiB, killed)
                    if kind == "stalled":  # once the upload has begun, hold every answer
                        puts = scrape(port)[PUTS_OK]
                        wait_progress(mid, PART_SIZE + MiB)
                        wait_for("the multipart upload begun", functools.partial(above, port, PUTS_OK, puts),
                                 20, 0.01)
                        proxy.inject("stall", stall_seconds=600)
                    wait_progress(mid, rng.randrange(17 * MiB, MID_LARGE - 4 * MiB))
                    if kind == "stalled":
                        wait_for("part uploads in flight", functools.partial(above, port, IN_FLIGHT, 0), 20, 0.02)
                else:  # closing
                    mid = Progress(f"r{r:02d}/mid.bin", rng.randbytes(2 * PART_SIZE + rng.randrange(1, 4 * MiB)))
                    job = Background(write_until_killed, mnt, mid, MiB, killed, None, hold)
                    wait_progress(mid, len(mid.data))
                    proxy.inject("stall", stall_seconds=600)
                    hold.set()
                    mid.closing.wait(10)
                    wait_for("the close's upload in flight", functools.partial(above, port, IN_FLIGHT, 0), 20, 0.02)
                    time.sleep(rng.uniform(0, 0.3))
                in_flight = scrape(port)[IN_FLIGHT]
                killed.set()
                os.kill(pid, signal.SIGKILL)
                job.result(60)  # the writer is not left hanging on the dead daemon
                assert wait_gone(pid, 10)
                wait_daemon_gone(cache)
                rounds.append(f"{kind}:{mid.acked / MiB:.1f}MiB/{in_flight:.0f}/{time.monotonic() - t_round:.1f}s")
                assert not mid.error_before_kill, f"round {r}: {mid.key}: {mid.error} before the kill"
                assert mid.error in GONE, f"round {r}: {mid.key}: {mid.error}"
                assert mid.opened and not mid.closed
        except BaseException:
            # Do not leave a daemon (or a writer) behind on a failure: kill ours.
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 10)
            raise
        finally:
            proxy.clear()
            if str(mnt) in fuse_mounts():
                cachefs("unmount", str(mnt), env=env)
            if str(mnt) in fuse_mounts():
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
            wait_daemon_gone(cache)
    took = time.monotonic() - t_start
    log = daemon_log(cache)
    stale = log.count("is a stale mount")
    print(f"\n{ROUNDS} kill -9 in {took:.0f} s (kind:acknowledged/uploads in flight at the kill/round time): "
          f"{', '.join(rounds)}; {stale} stale mountpoints cleaned up; {len(truth)} objects in the bucket, "
          "all checked byte by byte at the end")
    assert str(mnt) not in fuse_mounts()
    assert stale == ROUNDS
    assert "Traceback" not in log
    assert sum(1 for x in rounds if x.split("/")[1] != "0") >= ROUNDS // 2, rounds  # uploads in flight
    assert leaks == [], leaks


def check_recovery(m: Mount, server: Server, bucket: str, prog: Progress, truth: dict[str, bytes],
                   r: int) -> list[str]:
    """After the remount: the file being written at the kill is uploaded from its staged data and
    reported as recovered. Returns the multipart uploads still open in the bucket (leaks)."""
    def recovered() -> dict[str, Any] | None:
        w = writes(m)
        done = [e for e in w["recovered"] if e["name"] == prog.key and e["state"] == "recovered"]
        return done[-1] if done and w["pending"] == [] else None

    entry = wait_for(f"round {r}: {prog.key} recovered", recovered, RECOVERY_DEADLINE)
    names = {e["name"] for e in writes(m)["recovered"]}
    assert names == {prog.key}, f"round {r}: recovered {names}, want {{{prog.key!r}}}"
    got = store_get(server, bucket, prog.key)
    assert got is not None, f"round {r}: {prog.key} recovered but not in the bucket"
    # A prefix of what was written, at least every byte write() acknowledged.
    assert prog.acked <= len(got) <= len(prog.data), (r, prog.key, prog.acked, len(got))
    assert got == prog.data[:len(got)], f"round {r}: {prog.key}: {len(got)} bytes, not a prefix of the writes"
    assert entry["size"] == len(got), (r, entry, len(got))
    assert f"recovered {prog.key!r} ({len(got)} bytes)" in daemon_log(m.cache_dir)
    truth[prog.key] = got
    try:
        wait_for(f"round {r}: no open multipart uploads",
                 lambda: open_multipart_uploads(server, bucket) == [], 20, 0.5)
        return []
    except AssertionError:
        return [f"round {r}: {u}" for u in open_multipart_uploads(server, bucket)]


def check_bucket(server: Server, bucket: str, truth: dict[str, bytes], checked: dict[str, str] | None = None) -> None:
    """Every object in ``truth`` is in the bucket with exactly its bytes. With ``checked`` (key:
    ETag of the version compared last time), an object whose ETag has not changed since is not
    downloaded again."""
    listed = {o["Key"]: o["ETag"] for page in server.s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket) for o in page.get("Contents", ())}

    def one(key: str) -> str | None:
        if checked is not None and key in listed and checked.get(key) == listed[key]:
            return None
        got = store_get(server, bucket, key)
        if got is None:
            return f"{key}: missing"
        if sha(got) != sha(truth[key]):
            return f"{key}: {len(got)} bytes, want {len(truth[key])}"
        if checked is not None and key in listed:
            checked[key] = listed[key]
        return None

    with ThreadPoolExecutor(8) as pool:
        wrong = [w for w in pool.map(one, sorted(truth)) if w is not None]
    assert wrong == [], wrong
