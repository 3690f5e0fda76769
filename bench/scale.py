"""cachefs at scale: a million real objects in SeaweedFS, ten million in a generated listing.

Two parts, each runnable alone (``--part``), each storing its figures in ``--state`` (JSON) so
that the markdown section is rendered from whatever parts have run:

real (SeaweedFS ``weed mini`` through ``cachefs.testing.servers.seaweed_server``; mounts through
the real ``cachefs`` command):
  * ``--objects`` objects in one flat prefix (``flat/f0000000``...) and ``--tree-objects`` in an
    ImageNet-like tree (``tree/dNNNN/fNNNNN``, 1,000 folders). Uploaded through the filer's HTTP
    API (no S3 signing: ~6x faster than boto3 here) by several processes. Flat objects are empty
    but for the few that are read (16 bytes); tree objects have 16 bytes each, so that a prefetch
    caches one block per object.
  * for each shape: time from ``cachefs mount`` (command start) to the first successful read of a
    known file in a never-listed folder; full listing time; daemon RSS (VmHWM / VmRSS); LMDB size;
  * flat: ``os.stat`` latency of random known files while a full relist runs in the background
    (mounted with a short ``--metadata-ttl``; listed once; past the TTL one ``stat`` starts the
    relist; the relist has ended when the daemon made as many more LIST requests as it has pages);
  * restart: unmount, mount again on the same cache dir, command start to first read; for the
    tree after ``cachefs prefetch MNT --wait`` ran for ``--prefetch-budget`` seconds (blocks
    cached are counted).

synthetic (in this process's child: ``SyntheticBackend`` generates listing pages of 1,000, and the
daemon's own layers, ``cachefs.stack.build`` over ``MetadataStore`` + ``DataCache``, run
inside trio as tests/fs/test_core.py does, without FUSE):
  * ``--synthetic`` objects in one flat folder, ``--synthetic-tree`` in 1,000 folders;
  * first lookup + read in the never-listed flat folder (from building the stack); full walk;
    RSS; LMDB size; an unchanged relist of the flat folder: its time, ``Lister.writes``,
    /proc/self/io ``wchar`` / ``write_bytes`` and data.mdb growth; lookup latency while it runs;
    reopening the index and reading again (restart).

    .venv/bin/python bench/scale.py --out bench/RESULTS.md            # full size (~30-40 min)
    .venv/bin/python bench/scale.py --objects 2000 --tree-objects 2000 --synthetic 20000 \\
        --synthetic-tree 20000 --out /tmp/r.md                         # smoke (~1 min)

Targets (issue 11) are printed as met / missed. With ``--out`` this script's section of that
file is replaced (or appended; bench/run.py keeps what follows its marker). Every mount is
unmounted and every process started here is stopped by its PID, also on failure.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import fcntl
import http.client
import json
import math
import multiprocessing
import os
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.rss_listing import replace_section  # noqa: E402
from cachefs.backends.base import Backend, ListPage, ObjectInfo  # noqa: E402
from cachefs.errors import NotFound  # noqa: E402

HEADING = "## At scale: a million real objects, ten million listed"
BUCKET = "scalebench"
BODY = b"0123456789abcdef"  # 16 bytes: one block per object, little to upload
TREE_DIRS = 1000  # ImageNet-like: 1,000 class folders
PAGE = 1000  # objects per listing page (S3's maximum)
UPLOAD_PROCS = 4  # processes x threads putting objects through the filer's HTTP API
UPLOAD_THREADS = 8
STAT_NAMES = 2000  # distinct known files stat'ed in a loop during the relist
STAT_PAUSE = 0.002  # seconds between two stats (the relist must get the CPU too)
MIN_STATS = 2000  # stats taken at least, also when the relist ends sooner
TTL = 20.0  # --metadata-ttl of the flat mount: short, so that a relist can be started
MOUNT_TIMEOUT = 120.0
LISTING_TIMEOUT = 1800.0
STOP_TIMEOUT = 20.0
MTIME = 1_700_000_000.0
TARGETS = {  # issue 11
    "mount": 5.0,  # s, mount command start to first read, whatever the cache holds
    "first_read_flat": 2.0,  # s, first read in a never-listed 1M flat directory
    "stat_max": 0.100,  # s, slowest stat of a listed file during a relist
    "rss_mb": 300.0,  # MB at 10M listed objects
    "relist_writes": 0.01,  # fraction of the LMDB size written by an unchanged relist
}


# -- measuring ---------------------------------------------------------------------------------

def memory(pid: int | str) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def io_counters() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def lmdb_size(cache_dir: Path) -> int:
    """Bytes of every data.mdb under the cache dir (one namespace here)."""
    return sum(p.stat().st_size for p in cache_dir.rglob("data.mdb"))


def percentiles(lat: list[float]) -> dict[str, float]:
    if not lat:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "max": math.nan}
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    return {"n": len(lat), "p50": statistics.median(lat), "p99": q[98], "max": max(lat)}


# -- the synthetic listing ---------------------------------------------------------------------

class Names:
    """The sorted names of one generated folder, as a sequence (``bisect`` finds a prefix)."""

    def __init__(self, fmt: str, count: int) -> None:
        self.fmt, self.count = fmt, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self.fmt % i


class SyntheticBackend(Backend):
    """A read-only bucket whose listing is generated: ``flat/f%08d`` (``flat`` objects) and
    ``tree/d%04d/f%05d`` (``tree`` objects in 1,000 folders); every object is 16 bytes."""

    def __init__(self, flat: int, tree: int) -> None:
        from cachefs.source import parse_source

        super().__init__(parse_source("s3://synthetic"), timeout=30.0, max_connections=64)
        self.flat, self.tree = flat, tree
        self.dirs = min(TREE_DIRS, tree) if tree else 0
        self.per_dir = tree // self.dirs if self.dirs else 0

    def folder(self, path: str) -> tuple[Names, bool] | None:
        """(names, are they folders) of the folder ``path`` ("" or ending in "/")."""
        if path == "":
            return _Fixed([n for n, size in (("flat/", self.flat), ("tree/", self.tree)) if size]), True
        if path == "flat/":
            return Names("f%08d", self.flat), False
        if path == "tree/":
            return Names("d%04d/", self.dirs), True
        m = re.fullmatch(r"tree/d(\d{4})/", path)
        if m and int(m.group(1)) < self.dirs:
            return Names("f%05d", self.per_dir), False
        return None

    def _check_sync(self) -> None:
        pass

    def _list_sync(self, prefix: str, delimiter: str | None, token: str | None) -> ListPage:
        path, _, partial = prefix.rpartition("/")
        path = path + "/" if _ else ""
        found = self.folder(path)
        page = ListPage()
        if found is None:
            return page
        names, folders = found
        i = int(token) if token else bisect.bisect_left(names, partial)
        while i < len(names) and len(page.objects) + len(page.prefixes) < PAGE:
            name = names[i]
            if not name.startswith(partial):
                return page
            if folders:
                page.prefixes.append(path + name)
            else:
                page.objects.append(ObjectInfo(path + name, len(BODY), f"e{i:031x}", MTIME))
            i += 1
        if i < len(names) and names[i].startswith(partial):
            page.token = str(i)
        return page

    def _head_sync(self, key: str) -> ObjectInfo:
        path, _, name = key.rpartition("/")
        found = self.folder(path + "/")
        if found is None or found[1]:
            raise NotFound(key)
        names = found[0]
        i = bisect.bisect_left(names, name)
        if i >= len(names) or names[i] != name:
            raise NotFound(key)
        return ObjectInfo(key, len(BODY), f"e{i:031x}", MTIME)

    def _get_sync(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        return BODY[start:start + length]

    def _put_sync(self, key: str, data: bytes) -> ObjectInfo:
        raise NotImplementedError("read-only")

    def _start_upload_sync(self, key: str) -> str:
        raise NotImplementedError("read-only")

    def _upload_part_sync(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        raise NotImplementedError("read-only")

    def _complete_upload_sync(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                              size: int) -> ObjectInfo:
        raise NotImplementedError("read-only")

    def _abort_upload_sync(self, key: str, upload_id: str) -> None:
        raise NotImplementedError("read-only")

    def _delete_sync(self, key: str) -> None:
        raise NotImplementedError("read-only")

    def _copy_sync(self, src: str, dst: str, size: int) -> ObjectInfo:
        raise NotImplementedError("read-only")


class _Fixed(Names):
    def __init__(self, names: list[str]) -> None:
        super().__init__("%s", len(names))
        self.names = names

    def __getitem__(self, i: int) -> str:
        return self.names[i]


def synthetic(flat: int, tree: int, work: str) -> dict[str, Any]:
    """Run the daemon's layers over the generated listing; the figures."""
    import trio

    from cachefs import stack
    from cachefs.cache.store import DataCache
    from cachefs.fs.core import Settings
    from cachefs.metadata import ROOT_INODE, MetadataStore

    root = Path(work) / "cache"
    res: dict[str, Any] = {"flat": flat, "tree": tree}
    rng = random.Random(2)
    known = [f"f{rng.randrange(flat):08d}".encode() for _ in range(STAT_NAMES)]
    target = f"f{flat // 2:08d}".encode()

    async def read(core: Any, parent: int, names: list[bytes]) -> bytes:
        for name in names:
            rec = await core.lookup(parent, name)
            parent = rec.ino
        fh = core.open(rec.ino)
        try:
            return bytes(await core.read(fh, 0, 1 << 20))
        finally:
            await core.release(fh)

    async def session(first: bool) -> None:
        t0 = time.perf_counter()
        backend = SyntheticBackend(flat, tree)
        meta = MetadataStore(str(root / "meta"))
        cache = DataCache(str(root), meta, 100 << 30, "stable", idle_evict=86400)
        layers = stack.build(meta, cache, backend, Settings(metadata_ttl=3600))
        core, lister = layers.core, layers.lister
        try:
            async with trio.open_nursery() as nursery:
                layers.reader.nursery = nursery
                await nursery.start(cache.run)
                lister.nursery = nursery
                assert await read(core, ROOT_INODE, [b"flat", target]) == BODY
                label = "first_read" if first else "restart_read"
                res[label] = time.perf_counter() - t0
                if not first:
                    nursery.cancel_scope.cancel()
                    return
                if tree:
                    t = time.perf_counter()
                    d = f"d{backend.dirs // 2:04d}".encode()
                    assert await read(core, ROOT_INODE, [b"tree", d, f"f{backend.per_dir // 2:05d}".encode()]) == BODY
                    res["first_read_tree"] = time.perf_counter() - t
                t = time.perf_counter()
                await core.walk()
                res["walk"] = time.perf_counter() - t0
                files, _ = meta.totals()
                res["listed"] = files
                res["mem_listed"] = memory("self")
                res["lmdb_listed"] = lmdb_size(root)
                print(f"synthetic: listed {files} in {res['walk']:.0f} s, {res['mem_listed']}", flush=True)

                flat_ino = (await core.lookup(ROOT_INODE, b"flat")).ino
                lister.ttl = 1e-6  # everything is stale now: the relist below is a real one
                writes0, io0, size0 = lister.writes, io_counters(), lmdb_size(root)
                done = trio.Event()
                lat: list[float] = []

                async def relist() -> None:
                    t = time.perf_counter()
                    rec = meta.get(flat_ino)
                    await lister.ensure_listed(rec, complete=True)
                    res["relist"] = time.perf_counter() - t
                    io1 = io_counters()
                    res["relist_records"] = lister.writes - writes0
                    res["relist_wchar"] = io1["wchar"] - io0["wchar"]
                    res["relist_write_bytes"] = io1["write_bytes"] - io0["write_bytes"]
                    res["relist_growth"] = lmdb_size(root) - size0
                    done.set()

                async def stats() -> None:
                    i = 0
                    while not done.is_set():
                        t = time.perf_counter()
                        rec = await core.lookup(flat_ino, known[i % len(known)])
                        core.record(rec.ino)
                        lat.append(time.perf_counter() - t)
                        i += 1
                        await trio.sleep(STAT_PAUSE)

                async with trio.open_nursery() as inner:
                    inner.start_soon(relist)
                    await trio.sleep(0)
                    inner.start_soon(stats)
                res["stat"] = percentiles(lat)
                res["mem_relisted"] = memory("self")
                res["lmdb_relisted"] = lmdb_size(root)
                print(f"synthetic: relist {res['relist']:.0f} s, stat {res['stat']}", flush=True)
                nursery.cancel_scope.cancel()
        finally:
            meta.close()

    trio.run(session, True)
    trio.run(session, False)
    return res


def _synthetic_child(flat: int, tree: int, work: str, out: Any) -> None:
    out.put(synthetic(flat, tree, work))


# -- the real store ----------------------------------------------------------------------------

def flat_key(i: int) -> str:
    return f"flat/f{i:07d}"


def tree_layout(n: int) -> tuple[int, int]:
    dirs = min(TREE_DIRS, n)
    return dirs, n // dirs


def tree_key(d: int, j: int) -> str:
    return f"tree/d{d:04d}/f{j:05d}"


def _put_range(args: tuple[int, str, int, int, int]) -> int:
    """Put keys [start, stop) of one shape through the filer's HTTP API (one process)."""
    port, shape, start, stop, n = args
    local = threading.local()
    per = tree_layout(n)[1] if shape == "tree" else 0
    readme = {n // 2} if shape == "flat" else set()

    def put(i: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        key = flat_key(i) if shape == "flat" else tree_key(i // per, i % per)
        body = BODY if shape == "tree" or i in readme else b""
        for attempt in range(5):
            try:
                conn.request("PUT", f"/buckets/{BUCKET}/{key}", body=body)
                resp = conn.getresponse()
                resp.read()
                if resp.status < 300:
                    return
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            time.sleep(0.1 * (attempt + 1))
        raise RuntimeError(f"could not put {key}")

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        for _ in pool.map(put, range(start, stop), chunksize=256):
            pass
    return stop - start


def upload(server: Any, shape: str, n: int) -> float:
    """Put ``n`` objects of ``shape``; seconds taken."""
    port = int(re.search(r"-filer\.port=(\d+)", " ".join(map(str, server.process.args))).group(1))
    if shape == "tree":
        dirs, per = tree_layout(n)
        n = dirs * per
    t = time.perf_counter()
    step = max(1, math.ceil(n / (UPLOAD_PROCS * 8)))
    jobs = [(port, shape, s, min(n, s + step), n) for s in range(0, n, step)]
    with multiprocessing.get_context("fork").Pool(UPLOAD_PROCS, signal.signal,
                                                 (signal.SIGTERM, signal.SIG_DFL)) as pool:
        done = 0
        for k in pool.imap_unordered(_put_range, jobs):
            done += k
    return time.perf_counter() - t


class Mounts:
    """The mounts and daemons of this run, undone in ``close`` (by PID, never by name)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.active: dict[Path, int | None] = {}

    def cachefs(self, *args: str, timeout: float = MOUNT_TIMEOUT) -> str:
        return subprocess.run([sys.executable, "-m", "cachefs.cli", *args], check=True, capture_output=True,
                              text=True, env=self.env, timeout=timeout).stdout

    def status(self, mnt: Path) -> dict[str, Any]:
        return json.loads(self.cachefs("status", "--json", str(mnt)))

    def mount(self, source: str, mnt: Path, cache: Path, endpoint: str, read: Path,
              *extra: str) -> tuple[float, float]:
        """Mount; (seconds of the mount command, seconds from its start to ``read`` read)."""
        t0 = time.perf_counter()
        self.active[mnt] = None
        self.cachefs("mount", source, str(mnt), "--endpoint-url", endpoint, "--cache-dir", str(cache),
                     "--cache-size", "50G", *extra)
        mounted = time.perf_counter() - t0
        deadline = t0 + MOUNT_TIMEOUT
        while True:
            try:
                with open(read, "rb") as f:
                    if f.read() == BODY:
                        break
            except OSError:
                if time.perf_counter() > deadline:
                    raise
                time.sleep(0.01)
        first = time.perf_counter() - t0
        self.active[mnt] = self.status(mnt)["pid"]
        return mounted, first

    def unmount(self, mnt: Path) -> None:
        pid = self.active.pop(mnt, None)
        subprocess.run([sys.executable, "-m", "cachefs.cli", "unmount", str(mnt)], check=False,
                       capture_output=True, env=self.env, timeout=120)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                deadline = time.monotonic() + STOP_TIMEOUT
                while time.monotonic() < deadline:
                    os.kill(pid, 0)  # ProcessLookupError once it is gone
                    time.sleep(0.05)
                os.kill(pid, signal.SIGTERM)
                time.sleep(2)
                os.kill(pid, signal.SIGKILL)
        with open("/proc/mounts") as f:
            if any(line.split()[1] == str(mnt) for line in f):
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False, capture_output=True)

    def close(self) -> None:
        for mnt in list(self.active):
            self.unmount(mnt)


def wait_listed(m: Mounts, mnt: Path) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    while True:
        st = m.status(mnt)
        if st["listing"]["complete"]:
            return time.perf_counter() - t0, st
        if time.perf_counter() - t0 > LISTING_TIMEOUT:
            raise SystemExit(f"{mnt}: the listing did not finish within {LISTING_TIMEOUT:.0f} s")
        time.sleep(0.5)


def stats_during_relist(m: Mounts, mnt: Path, names: list[str], pages: int) -> tuple[list[float], float, bool]:
    """Start a relist with one stat (the folder is stale) and stat ``names`` until it ended: the
    daemon made ``pages`` more LIST requests. (latencies, relist seconds, relist seen ending)."""
    base = m.status(mnt)["backend"]["by_operation"].get("list", 0)
    ended = threading.Event()
    took: list[float] = []

    def watch() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < LISTING_TIMEOUT:
            with contextlib.suppress(Exception):
                if m.status(mnt)["backend"]["by_operation"].get("list", 0) - base >= pages:
                    took.append(time.perf_counter() - t0)
                    ended.set()
                    return
            time.sleep(0.25)
        ended.set()

    lat: list[float] = []
    os.stat(mnt / names[0])  # stale: this starts the relist in the background
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    i = 1
    while not ended.is_set() or (len(lat) < MIN_STATS and not took):
        t = time.perf_counter()
        os.stat(mnt / names[i % len(names)])
        lat.append(time.perf_counter() - t)
        i += 1
        time.sleep(STAT_PAUSE)
    watcher.join()
    return lat, took[0] if took else math.nan, bool(took)


def real(n_flat: int, n_tree: int, prefetch_budget: float, work: Path) -> dict[str, Any]:
    from cachefs.testing.servers import seaweed_server

    res: dict[str, Any] = {"flat": n_flat, "tree": n_tree}
    with seaweed_server() as server:
        server.create_bucket(BUCKET)
        res["upload_flat"] = upload(server, "flat", n_flat)
        print(f"real: uploaded {n_flat} flat in {res['upload_flat']:.0f} s", flush=True)
        res["upload_tree"] = upload(server, "tree", n_tree)
        print(f"real: uploaded {n_tree} tree in {res['upload_tree']:.0f} s", flush=True)
        env = {**os.environ, **server.env}
        m = Mounts(env)
        try:
            # flat: first read, listing, stats during a relist, restart
            mnt, cache = work / "mnt-flat", work / "cache-flat"
            mnt.mkdir()
            target = mnt / flat_key(n_flat // 2).split("/")[1]
            t_start = time.perf_counter()
            res["flat_mount"], res["flat_first_read"] = m.mount(
                f"s3://{BUCKET}/flat", mnt, cache, server.endpoint_url, target, "--metadata-ttl", str(TTL))
            res["flat_listing"], st = wait_listed(m, mnt)
            res["flat_listed"] = st["listing"]["objects"]
            res["flat_mem_listed"] = memory(st["pid"])
            res["flat_lmdb"] = lmdb_size(cache)
            print(f"real: flat listed {res['flat_listed']} in {res['flat_listing']:.0f} s", flush=True)
            time.sleep(max(0.0, TTL + 1 - (time.perf_counter() - t_start)))
            rng = random.Random(3)
            names = [flat_key(rng.randrange(n_flat)).split("/")[1] for _ in range(STAT_NAMES)]
            lat, res["flat_relist"], res["flat_relist_seen"] = stats_during_relist(
                m, mnt, names, math.ceil(n_flat / PAGE))
            res["flat_stat"] = percentiles(lat)
            res["flat_mem_relisted"] = memory(st["pid"])
            res["flat_lmdb_relisted"] = lmdb_size(cache)
            print(f"real: flat relist {res['flat_relist']:.0f} s, stat {res['flat_stat']}", flush=True)
            m.unmount(mnt)
            res["flat_restart_mount"], res["flat_restart_read"] = m.mount(
                f"s3://{BUCKET}/flat", mnt, cache, server.endpoint_url, target, "--metadata-ttl", str(TTL))
            m.unmount(mnt)

            # tree: first read, listing, prefetch for a budget, restart with those blocks cached
            mnt, cache = work / "mnt-tree", work / "cache-tree"
            mnt.mkdir()
            dirs, per = tree_layout(n_tree)
            target = mnt / tree_key(dirs // 2, per // 2).split("/", 1)[1]
            res["tree_mount"], res["tree_first_read"] = m.mount(
                f"s3://{BUCKET}/tree", mnt, cache, server.endpoint_url, target)
            res["tree_listing"], st = wait_listed(m, mnt)
            res["tree_listed"] = st["listing"]["objects"]
            res["tree_mem_listed"] = memory(st["pid"])
            res["tree_lmdb"] = lmdb_size(cache)
            print(f"real: tree listed {res['tree_listed']} in {res['tree_listing']:.0f} s", flush=True)
            t = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "cachefs.cli", "prefetch", str(mnt), "--wait",
                                     "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=prefetch_budget)
                res["prefetch_complete"] = True
            except subprocess.TimeoutExpired:
                res["prefetch_complete"] = False
                proc.terminate()
                proc.wait()
            res["prefetch_seconds"] = time.perf_counter() - t
            st = m.status(mnt)
            res["prefetch_blocks"] = st["cache"]["used_bytes"] // len(BODY)
            res["tree_mem_prefetched"] = memory(st["pid"])
            res["tree_lmdb_prefetched"] = lmdb_size(cache)
            print(f"real: prefetched {res['prefetch_blocks']} blocks in {res['prefetch_seconds']:.0f} s",
                  flush=True)
            m.unmount(mnt)
            res["tree_restart_mount"], res["tree_restart_read"] = m.mount(
                f"s3://{BUCKET}/tree", mnt, cache, server.endpoint_url, target)
            res["tree_restart_mem"] = memory(m.active[mnt] or 0)
            m.unmount(mnt)
        finally:
            m.close()
    return res


# -- report ------------------------------------------------------------------------------------

def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 10e6 else f"{n / 1e3:.0f} KB"


def ms(s: float) -> str:
    return f"{s * 1000:.1f} ms"


def render(state: dict[str, Any]) -> str:
    lines = [HEADING, ""]
    targets: list[tuple[str, str, bool]] = []
    r = state.get("real")
    if r:
        lines += [f"Command: `{r['command']}` ({r['date']}; {r['host']})", "",
                  f"SeaweedFS `weed mini` on 127.0.0.1 (no latency proxy). Upload through the filer's HTTP "
                  f"API: {r['flat']:,} empty flat objects (16 bytes for the one read) in {r['upload_flat']:.0f} s, "
                  f"{r['tree']:,} tree objects of 16 bytes in {r['upload_tree']:.0f} s. Mounted with the "
                  f"`cachefs` command; the flat mount with `--metadata-ttl {TTL:.0f}`.", "",
                  "| real objects (SeaweedFS) | flat | tree |", "|---|---|---|",
                  f"| objects | {r['flat']:,} in one folder | {r['tree']:,} in {tree_layout(r['tree'])[0]:,} folders |",
                  f"| `cachefs mount` command | {r['flat_mount']:.2f} s | {r['tree_mount']:.2f} s |",
                  f"| mount start to first read (never-listed folder) | {r['flat_first_read']:.2f} s | "
                  f"{r['tree_first_read']:.2f} s |",
                  f"| full listing (after the mount) | {r['flat_listing']:.0f} s | {r['tree_listing']:.0f} s |",
                  f"| daemon RSS listed: VmRSS / VmHWM (anon + file) | {_mem(r['flat_mem_listed'])} | "
                  f"{_mem(r['tree_mem_listed'])} |",
                  f"| LMDB data.mdb | {mb(r['flat_lmdb'])} | {mb(r['tree_lmdb'])} |",
                  f"| relist in the background (unchanged) | {r['flat_relist']:.0f} s"
                  f"{'' if r['flat_relist_seen'] else ' (end not seen)'} | — |",
                  f"| `os.stat` during the relist: n, p50 / p99 / max | {_lat(r['flat_stat'])} | — |",
                  f"| daemon RSS after the relist | {_mem(r['flat_mem_relisted'])} | — |",
                  f"| prefetch (`cachefs prefetch --wait`) | — | {r['prefetch_blocks']:,} blocks in "
                  f"{r['prefetch_seconds']:.0f} s{'' if r['prefetch_complete'] else ' (budget hit; stopped)'} |",
                  f"| LMDB after prefetch | — | {mb(r['tree_lmdb_prefetched'])} |",
                  f"| restart (same cache dir): mount command / to first read | {r['flat_restart_mount']:.2f} s / "
                  f"{r['flat_restart_read']:.2f} s | {r['tree_restart_mount']:.2f} s / "
                  f"{r['tree_restart_read']:.2f} s |",
                  ""]
        worst_mount = max(r["flat_first_read"], r["tree_first_read"], r["flat_restart_read"], r["tree_restart_read"])
        targets += [
            ("mount ready <= 5 s whatever the cache holds (mount start to first read, worst of 4)",
             f"{worst_mount:.2f} s", worst_mount <= TARGETS["mount"]),
            (f"first read in a never-listed {r['flat']:,} flat folder <= 2 s", f"{r['flat_first_read']:.2f} s",
             r["flat_first_read"] <= TARGETS["first_read_flat"]),
            (f"no `stat` slower than 100 ms during a relist ({r['flat']:,} real, through FUSE)",
             f"max {ms(r['flat_stat']['max'])}", r["flat_stat"]["max"] <= TARGETS["stat_max"])]
    s = state.get("synthetic")
    if s:
        lmdb = s["lmdb_listed"]
        lines += [f"Command: `{s['command']}` ({s['date']}; {s['host']})", "",
                  "Generated listing (`SyntheticBackend` in bench/scale.py, pages of 1,000) under the daemon's "
                  "own layers (`cachefs.stack.build`, `MetadataStore`, `DataCache`) in one process, no FUSE; "
                  "a `stat` here is `CoreFS.lookup` + `record` on the same trio loop as the relist.", "",
                  "| synthetic listing | value |", "|---|---|",
                  f"| objects | {s['flat']:,} in one folder + {s['tree']:,} in {min(TREE_DIRS, s['tree']):,} folders |",
                  f"| stack built to first lookup + read, never-listed flat folder | {s['first_read']:.2f} s |",
                  f"| first lookup + read in a never-listed tree folder | {s.get('first_read_tree', math.nan):.2f} s |",
                  f"| full walk (everything listed into LMDB) | {s['walk']:.0f} s ({s['listed']:,} files) |",
                  f"| RSS listed: VmRSS / VmHWM (anon + file) | {_mem(s['mem_listed'])} |",
                  f"| LMDB data.mdb | {mb(lmdb)} |",
                  f"| unchanged relist of the flat folder | {s['relist']:.0f} s |",
                  f"| relist: records written (`Lister.writes`) | {s['relist_records']:,} |",
                  f"| relist: bytes written, `wchar` / `write_bytes` (/proc/self/io) | {mb(s['relist_wchar'])} / "
                  f"{mb(s['relist_write_bytes'])} ({100 * max(s['relist_wchar'], s['relist_write_bytes']) / lmdb:.2f}% "
                  f"of data.mdb) |",
                  f"| relist: data.mdb growth | {mb(s['relist_growth'])} |",
                  f"| lookup during the relist: n, p50 / p99 / max | {_lat(s['stat'])} |",
                  f"| RSS after the relist | {_mem(s['mem_relisted'])} |",
                  f"| restart: index reopened to first lookup + read | {s['restart_read']:.2f} s |", ""]
        written = max(s["relist_wchar"], s["relist_write_bytes"])
        targets += [
            (f"RSS <= 300 MB at {s['listed']:,} listed objects (VmHWM)", f"{s['mem_relisted']['VmHWM']:.0f} MB",
             s["mem_relisted"]["VmHWM"] <= TARGETS["rss_mb"]),
            ("a relist of unchanged objects writes <= 1% of the LMDB size",
             f"{100 * written / lmdb:.2f}% ({mb(written)} of {mb(lmdb)})", written <= TARGETS["relist_writes"] * lmdb),
            (f"first read in a never-listed {s['flat']:,} flat folder <= 2 s (synthetic)",
             f"{s['first_read']:.2f} s", s["first_read"] <= TARGETS["first_read_flat"]),
            ("no lookup slower than 100 ms during a relist (synthetic, in-process)", f"max {ms(s['stat']['max'])}",
             s["stat"]["max"] <= TARGETS["stat_max"])]
    if targets:
        lines += ["Targets (issue 11):", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in targets]
        lines.append("")
    notes = state.get("notes")
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)


def _mem(m: dict[str, float]) -> str:
    return f"{m['VmRSS']:.0f} / {m['VmHWM']:.0f} MB ({m['RssAnon']:.0f} + {m['RssFile']:.0f})"


def _lat(p: dict[str, float]) -> str:
    return f"{p['n']:,}: {ms(p['p50'])} / {ms(p['p99'])} / {ms(p['max'])}"


@contextlib.contextmanager
def locked_state(path: Path) -> Iterator[dict[str, Any]]:
    """The state file, locked (the two parts may run at once), written back on exit."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(path.read_text()) if path.exists() else {}
        yield state
        path.write_text(json.dumps(state, indent=1))


def main() -> None:
    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)  # unwind through the finally blocks

    signal.signal(signal.SIGTERM, terminate)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "real", "synthetic", "report"), default="all")
    ap.add_argument("--objects", type=int, default=1_000_000, help="real objects in the flat prefix")
    ap.add_argument("--tree-objects", type=int, default=None, help="real objects in the tree (default: --objects)")
    ap.add_argument("--synthetic", type=int, default=10_000_000, help="generated objects in one flat folder")
    ap.add_argument("--synthetic-tree", type=int, default=None, help="generated objects in 1,000 folders "
                    "(default: --synthetic)")
    ap.add_argument("--prefetch-budget", type=float, default=300.0, help="seconds the tree prefetch may run")
    ap.add_argument("--state", default=None, help="JSON file the parts' figures are kept in "
                    "(default: a temporary one)")
    ap.add_argument("--notes", default=None, help="a markdown file added below the tables")
    ap.add_argument("--out", default=None, help="write the section into this markdown file")
    args = ap.parse_args()
    tree = args.objects if args.tree_objects is None else args.tree_objects
    syn_tree = args.synthetic if args.synthetic_tree is None else args.synthetic_tree
    work = Path(tempfile.mkdtemp(prefix="cachefs-scale-", dir="/var/tmp"))
    state_path = Path(args.state) if args.state else work / "state.json"
    command = " ".join([".venv/bin/python bench/scale.py", *sys.argv[1:]])
    stamp = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "host": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"}
    try:
        if args.part in ("all", "synthetic"):
            ctx = multiprocessing.get_context("spawn")  # a fresh process: its RSS is the layers' alone
            q = ctx.Queue()
            p = ctx.Process(target=_synthetic_child, args=(args.synthetic, syn_tree, str(work / "syn"), q))
            p.start()
            try:
                while True:
                    with contextlib.suppress(queue.Empty):
                        res = q.get(timeout=1)
                        break
                    if not p.is_alive():
                        raise SystemExit(f"the synthetic part failed (exit code {p.exitcode})")
            finally:
                p.join()
            with locked_state(state_path) as state:
                state["synthetic"] = {**res, **stamp}
        if args.part in ("all", "real"):
            res = real(args.objects, tree, args.prefetch_budget, work)
            with locked_state(state_path) as state:
                state["real"] = {**res, **stamp}
        with locked_state(state_path) as state:
            if args.notes:
                state["notes"] = Path(args.notes).read_text()
            text = render(state)
        print(text)
        if args.out:
            replace_section(Path(args.out), text, HEADING)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
