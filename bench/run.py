"""Side-by-side benchmark: native disk, cachefs (without / with prefetch), s3fs and rclone.

One command sets everything up on this machine and runs every filesystem through the same
workload in one run, so that the ratios between them mean something on a shared, noisy host:

    .venv/bin/python bench/run.py                  # defaults below; writes bench/RESULTS.md
    .venv/bin/python bench/run.py --smoke          # a few hundred files, no peers (CI runs this)

Setup: SeaweedFS (``weed mini``) on loopback; a latency proxy in front of it (+``--rtt-ms`` per
round trip, every chunk delayed in each direction, bandwidth not capped) through which every
filesystem talks to the store; an ImageFolder-style dataset (``--files`` files with log-normal
sizes averaging ``--mean-kb`` KB in ``--classes`` class folders) plus one large file.

Workload, as a PyTorch DataLoader over an ImageFolder does it: (a) index: ``os.walk`` + ``stat``
of every file, on a fresh mount (cold) and again (warm); (b) epochs: every file read in a new
shuffled order by ``--readers`` processes, epoch 1 cold, then warm ones; (c) one sequential read of
the large file. Every file's hash is checked; a mismatch fails the run. The page cache is dropped
before each cold phase (``/proc/sys/vm/drop_caches``) and every filesystem starts with an empty
cache. The daemon's CPU time and RSS come from ``/proc``.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cachefs.testing.proxy import LatencyProxy  # noqa: E402
from cachefs.testing.servers import Server, seaweed_server  # noqa: E402

BUCKET = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MOUNT_TIMEOUT = 60.0


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
    sigma = 0.6
    mu = 0  # scale below so that the mean is mean_kb
    scale = mean_kb * 1000 / (2.718281828 ** (sigma * sigma / 2))
    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for i in range(n):
        rel = f"train/n{i % classes:05d}/img_{i:07d}.JPEG"
        size = max(1, int(rng.lognormvariate(mu, sigma) * scale))
        data = rng.randbytes(size)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = hashlib.blake2b(data).hexdigest()
        sizes[rel] = size
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
    server.create_bucket(BUCKET)
    client = server.s3_client()
    from concurrent.futures import ThreadPoolExecutor

    def put(rel: str) -> None:
        client.put_object(Bucket=BUCKET, Key=rel, Body=(root / rel).read_bytes())

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, ds.files))
    from boto3.s3.transfer import TransferConfig

    client.upload_file(str(root / ds.large), BUCKET, ds.large,
                       Config=TransferConfig(multipart_chunksize=64 << 20, max_concurrency=8))


# -- measuring --------------------------------------------------------------------------------

def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def proc_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def proc_rss(pids: list[int]) -> tuple[int, int]:
    """(peak, current) resident memory in bytes, summed over pids."""
    peak = cur = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak += int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    cur += int(line.split()[1]) * 1024
    return peak, cur


def _read_one(path: str) -> tuple[str, str, int]:
    with open(path, "rb") as f:
        data = f.read()
    return path, hashlib.blake2b(data).hexdigest(), len(data)


def epoch(mnt: Path, ds: Dataset, readers: int, seed: int) -> tuple[float, int]:
    order = list(ds.files)
    random.Random(seed).shuffle(order)
    start = time.perf_counter()
    total = 0
    with multiprocessing.get_context("fork").Pool(readers) as pool:
        for path, digest, size in pool.imap_unordered(_read_one, [str(mnt / r) for r in order], chunksize=8):
            rel = os.path.relpath(path, mnt)
            if digest != ds.files[rel]:
                raise SystemExit(f"CONTENT MISMATCH: {rel} read through {mnt}")
            total += size
    return time.perf_counter() - start, total


def index(mnt: Path, ds: Dataset) -> float:
    start = time.perf_counter()
    seen = 0
    for d, _, names in os.walk(mnt / "train"):
        for n in names:
            os.stat(os.path.join(d, n))
            seen += 1
    elapsed = time.perf_counter() - start
    if seen != len(ds.files):
        raise SystemExit(f"index of {mnt} found {seen} files, expected {len(ds.files)}")
    return elapsed


def sequential(mnt: Path, ds: Dataset) -> float:
    h = hashlib.blake2b()
    start = time.perf_counter()
    with open(mnt / ds.large, "rb", buffering=0) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    elapsed = time.perf_counter() - start
    if h.hexdigest() != ds.large_hash:
        raise SystemExit(f"CONTENT MISMATCH: {ds.large} read through {mnt}")
    return elapsed


@dataclass
class Phase:
    name: str
    seconds: float
    files: int = 0
    nbytes: int = 0
    cpu: float | None = None  # daemon CPU seconds

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
    note: str = ""


# -- filesystems ------------------------------------------------------------------------------

def wait_mounted(mnt: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if os.path.ismount(mnt):
            return
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"mount of {mnt} exited with {proc.returncode}")
        time.sleep(0.1)
    raise SystemExit(f"{mnt} was not mounted within {MOUNT_TIMEOUT:.0f} s")


def unmount(mnt: Path) -> None:
    if os.path.ismount(mnt) or _stale(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
        if os.path.ismount(mnt) or _stale(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False, capture_output=True)


def _stale(mnt: Path) -> bool:
    try:
        os.stat(mnt)
    except OSError:
        return True
    return False


def cachefs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cachefs.cli", *args]


Mounted = Iterator[tuple[Path, list[int], str]]  # mountpoint, daemon pids, a note for the report


@contextlib.contextmanager
def mount_cachefs(work: Path, endpoint: str, env: dict[str, str], prefetch: bool) -> Mounted:
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    args = ["mount", f"s3://{BUCKET}", str(mnt), "--endpoint-url", endpoint, "--cache-dir", str(cache),
            "--cache-size", "100G"]
    subprocess.run(cachefs_cmd(*args), env=env, check=True)
    try:
        status = json.loads(subprocess.run(cachefs_cmd("status", "--json", str(mnt)), env=env, check=True,
                                           capture_output=True, text=True).stdout)
        note = ""
        if prefetch:
            start = time.perf_counter()
            subprocess.run(cachefs_cmd("prefetch", str(mnt), "--wait", "--no-progress"), env=env, check=True,
                           capture_output=True)
            note = f"prefetch of the whole bucket took {time.perf_counter() - start:.1f} s before the cold epoch"
        yield mnt, [int(status["pid"])], note
    finally:
        subprocess.run(cachefs_cmd("unmount", str(mnt)), env=env, check=False)
        unmount(mnt)


@contextlib.contextmanager
def mount_s3fs(work: Path, endpoint: str, env: dict[str, str]) -> Mounted:
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    cache.mkdir()
    passwd = work / "passwd"
    passwd.write_text(f"{env['AWS_ACCESS_KEY_ID']}:{env['AWS_SECRET_ACCESS_KEY']}\n")
    passwd.chmod(0o600)
    opts = [f"url={endpoint}", "use_path_request_style", f"passwd_file={passwd}", f"use_cache={cache}",
            "parallel_count=16", "multireq_max=32", "stat_cache_expire=3600", "max_stat_cache_size=200000",
            "enable_noobj_cache", "readwrite_timeout=60", "connect_timeout=10", "ro", "allow_other"]
    proc = subprocess.Popen(["s3fs", BUCKET, str(mnt), "-f", "-o", ",".join(opts)],
                            stdout=subprocess.DEVNULL, stderr=open(work / "s3fs.log", "wb"))  # noqa: SIM115
    try:
        wait_mounted(mnt, proc)
        yield mnt, [proc.pid], ""
    finally:
        unmount(mnt)
        _stop(proc)


@contextlib.contextmanager
def mount_rclone(work: Path, endpoint: str, env: dict[str, str]) -> Mounted:
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    renv = {k: v for k, v in env.items() if k != "AWS_CA_BUNDLE"}  # rclone refuses an unusable CA file
    renv.update({"RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                 "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
                 "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
                 "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
                 "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true", "RCLONE_CONFIG": str(work / "none.conf")})
    cmd = ["rclone", "mount", f"bench:{BUCKET}", str(mnt), "--read-only", "--vfs-cache-mode", "full",
           "--cache-dir", str(cache), "--vfs-cache-max-size", "100G", "--transfers", "32", "--checkers", "32",
           "--buffer-size", "16M", "--dir-cache-time", "1h", "--attr-timeout", "1h",
           "--vfs-read-chunk-size", "4M", "--vfs-read-ahead", "32M", "--no-modtime"]
    proc = subprocess.Popen(cmd, env=renv, stdout=subprocess.DEVNULL, stderr=open(work / "rclone.log", "wb"))  # noqa: SIM115
    try:
        wait_mounted(mnt, proc)
        yield mnt, [proc.pid], ""
    finally:
        unmount(mnt)
        _stop(proc)


@contextlib.contextmanager
def native(root: Path) -> Mounted:
    yield root, [], ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


TUNING = {
    "native": "the dataset on the local disk",
    "cachefs": "defaults (--cache-size 100G)",
    "cachefs+prefetch": "defaults; `cachefs prefetch MNT --wait` before the cold epoch (timed separately)",
    "s3fs": "use_cache, parallel_count=16, multireq_max=32, stat_cache_expire=3600, max_stat_cache_size=200000, "
            "enable_noobj_cache, use_path_request_style",
    "rclone": "--vfs-cache-mode full, --transfers 32, --checkers 32, --buffer-size 16M, --dir-cache-time 1h, "
              "--attr-timeout 1h, --vfs-read-chunk-size 4M, --vfs-read-ahead 32M, --no-modtime",
}


def run_fs(name: str, mount: Callable[[], contextlib.AbstractContextManager[tuple[Path, list[int], str]]],
           ds: Dataset, args: argparse.Namespace) -> Result:
    print(f"== {name}", flush=True)
    res = Result(name, TUNING[name])
    drop_caches()
    with mount() as (mnt, pids, note):
        res.note = note

        def timed(phase: str, fn: Callable[[], tuple[float, int, int]]) -> None:
            c0 = proc_cpu(pids)
            secs, files, nbytes = fn()
            res.phases[phase] = Phase(phase, secs, files, nbytes, proc_cpu(pids) - c0 if pids else None)
            p = res.phases[phase]
            print(f"   {phase:<14} {secs:8.2f} s {p.files_per_s():10.0f} files/s {p.mb_per_s():9.1f} MB/s", flush=True)

        timed("index cold", lambda: (index(mnt, ds), len(ds.files), 0))
        timed("index warm", lambda: (index(mnt, ds), len(ds.files), 0))
        drop_caches()
        def one_epoch(seed: int) -> tuple[float, int, int]:
            secs, nbytes = epoch(mnt, ds, args.readers, seed)
            return secs, len(ds.files), nbytes

        for e in range(1, args.epochs + 1):
            timed("epoch 1 (cold)" if e == 1 else f"epoch {e} (warm)", lambda e=e: one_epoch(e))
        timed("large seq (cold)", lambda: (sequential(mnt, ds), 1, ds.large_size))
        res.rss_peak, res.rss_end = proc_rss(pids)
    return res


# -- report -----------------------------------------------------------------------------------

def report(results: list[Result], args: argparse.Namespace, ds: Dataset, setup: str) -> str:
    by = {r.fs: r for r in results}
    peers = [p for p in ("s3fs", "rclone") if p in by]
    phases = list(results[0].phases)
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    mean_kb = ds.total_bytes / len(ds.files) / 1000
    lines = ["# cachefs benchmark results", "",
             f"Command: `{' '.join(['.venv/bin/python', 'bench/run.py', *sys.argv[1:]])}`  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
             f"Machine: {os.cpu_count()} cores, {ram_gib:.0f} GiB RAM, "
             f"Linux {platform.release()}, Python {platform.python_version()}  ",
             f"Setup: {setup}", "",
             f"Dataset: {len(ds.files)} files in {args.classes} class folders, mean {mean_kb:.0f} KB "
             f"({ds.total_bytes / 1e9:.2f} GB), plus one {ds.large_size >> 20} MiB file; "
             f"{args.readers} reader processes; "
             "every file's blake2b checked on every read.", ""]
    header = "| phase | " + " | ".join(r.fs for r in results) + " |"
    lines += ["## Throughput (files/s; MB/s for the large file; index: seconds)", "", header,
              "|" + "---|" * (len(results) + 1)]
    for ph in phases:
        cells = []
        for r in results:
            p = r.phases.get(ph)
            if p is None:
                cells.append("—")
            elif ph.startswith("index"):
                cells.append(f"{p.seconds:.2f} s")
            elif ph.startswith("large"):
                cells.append(f"{p.mb_per_s():.0f} MB/s")
            else:
                cells.append(f"{p.files_per_s():.0f} ({p.mb_per_s():.0f} MB/s)")
        lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    lines += ["", "## Daemon CPU seconds per phase and memory", "", header, "|" + "---|" * (len(results) + 1)]
    for ph in phases:
        lines.append(f"| {ph} | " + " | ".join(
            "—" if r.phases.get(ph) is None or r.phases[ph].cpu is None else f"{r.phases[ph].cpu:.1f}"
            for r in results) + " |")
    lines.append("| RSS peak / end (MB) | " + " | ".join(
        "—" if not r.rss_peak else f"{r.rss_peak / 1e6:.0f} / {r.rss_end / 1e6:.0f}" for r in results) + " |")

    def speed(r: Result, ph: str) -> float:
        p = r.phases[ph]
        if ph.startswith("index"):
            return 1 / p.seconds
        return p.mb_per_s() if ph.startswith("large") else p.files_per_s()

    lines += ["", "## Ratios (speed of the row's filesystem / the column's; index uses 1/time)", ""]
    others = [r for r in results]
    for r in results:
        if not r.fs.startswith("cachefs"):
            continue
        lines += [f"### {r.fs}", "", "| phase | " + " | ".join(f"vs {o.fs}" for o in others if o is not r) + " |",
                  "|" + "---|" * len(others)]
        for ph in phases:
            cells = [f"{speed(r, ph) / speed(o, ph):.2f}x" for o in others if o is not r]
            lines.append(f"| {ph} | " + " | ".join(cells) + " |")
        lines.append("")
    if peers and "cachefs" in by and "cachefs+prefetch" in by and "native" in by:
        best = {ph: max(speed(by[p], ph) for p in peers) for ph in phases}
        cp, c, nat = by["cachefs+prefetch"], by["cachefs"], by["native"]
        cold = "epoch 1 (cold)"
        warm = [ph for ph in phases if "warm)" in ph]
        checks = [
            ("cold epoch with prefetch >= 10x s3fs", speed(cp, cold) / speed(by["s3fs"], cold), 10)
            if "s3fs" in by else None,
            ("cold epoch with prefetch >= 3x rclone", speed(cp, cold) / speed(by["rclone"], cold), 3)
            if "rclone" in by else None,
            ("cold epoch without prefetch >= better peer", speed(c, "epoch 1 (cold)") / best["epoch 1 (cold)"], 1),
            *[(f"{ph} (cachefs) >= 2x better peer", speed(c, ph) / best[ph], 2) for ph in warm],
            *[(f"{ph} (cachefs) >= 0.5x native", speed(c, ph) / speed(nat, ph), 0.5) for ph in warm],
            ("index warm time <= 2x native", speed(c, "index warm") / speed(nat, "index warm"), 0.5),
            ("index cold >= 5x faster than better peer", speed(c, "index cold") / best["index cold"], 5),
            ("large sequential cold >= 2x better peer", speed(c, "large seq (cold)") / best["large seq (cold)"], 2),
        ]
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        for chk in checks:
            if chk:
                lines.append(f"| {chk[0]} | {chk[1]:.2f}x | {'yes' if chk[1] >= chk[2] else '**no**'} |")
        lines.append("")
    notes = [f"- {r.fs}: {r.tuning}" + (f"; {r.note}" if r.note else "") for r in results]
    lines += ["## How each filesystem was run", "", *notes, ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--mean-kb", type=float, default=110)
    ap.add_argument("--large-mb", type=int, default=1024)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--only", default="native,cachefs,cachefs+prefetch,s3fs,rclone",
                    help="comma-separated filesystems to run")
    ap.add_argument("--smoke", action="store_true", help="300 files, 16 MiB large file, 2 ms RTT, no peers")
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--work", default=None, help="work directory (default: a new temp dir, removed after)")
    args = ap.parse_args()
    if args.smoke:
        args.files, args.classes, args.large_mb, args.rtt_ms, args.epochs = 300, 10, 16, 2.0, 2
        args.only = "native,cachefs,cachefs+prefetch"
    chosen = args.only.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="cachefs-bench-"))
    try:
        print(f"generating {args.files} files + {args.large_mb} MiB in {work}", flush=True)
        ds = make_dataset(work / "native", args.files, args.classes, args.mean_kb, args.large_mb)
        with seaweed_server() as server:
            t0 = time.perf_counter()
            upload(server, work / "native", ds)
            print(f"uploaded {ds.total_bytes / 1e9:.2f} GB + the large file in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            port = int(server.endpoint_url.rsplit(":", 1)[1])
            with LatencyProxy(("127.0.0.1", port), latency=args.rtt_ms / 2000) as proxy:
                env = dict(os.environ, **server.env)
                mounts: dict[str, Callable[[], Any]] = {
                    "native": lambda: native(work / "native"),
                    "cachefs": lambda: mount_cachefs(work / "fs-cachefs", proxy.url, env, prefetch=False),
                    "cachefs+prefetch": lambda: mount_cachefs(work / "fs-cachefs-p", proxy.url, env, prefetch=True),
                    "s3fs": lambda: mount_s3fs(work / "fs-s3fs", proxy.url, env),
                    "rclone": lambda: mount_rclone(work / "fs-rclone", proxy.url, env),
                }
                results = [run_fs(name, mounts[name], ds, args) for name in chosen]
        setup = (f"SeaweedFS `weed mini` on 127.0.0.1 behind a latency proxy adding {args.rtt_ms:g} ms per round trip "
                 "(cachefs.testing.proxy); page cache dropped before each cold phase")
        text = report(results, args, ds, setup)
        print(text)
        Path(args.out).write_text(text + "\n")
    finally:
        for mnt in Path(work).glob("fs-*/mnt"):
            unmount(mnt)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
