"""``cachefs demo``: the whole product in one minute, with no cloud account.

Starts moto's S3 server on 127.0.0.1, uploads a generated ImageFolder-style training set
(class folders of JPEG-sized files), mounts it with ``cachefs mount`` (the real command, as a
user would run it), reads every file twice in shuffled order with several reader threads — cold,
then warm — checks every byte, prints throughput, the cache hit ratio and the backend requests of
each pass, then unmounts and stops the server.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

BUCKET = "demo-dataset"
READERS = 8  # like DataLoader(num_workers=8)


def _dataset(files: int, size_kb: int, seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    classes = 20
    out = {}
    for i in range(files):
        size = max(1, int(rng.lognormvariate(0, 0.5) * size_kb * 1000 / 1.13))  # mean ~ size_kb
        out[f"train/class_{i % classes:02d}/img_{i:06d}.jpg"] = rng.randbytes(size)
    return out


def _counters(mnt: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "cachefs.cli", "status", "--json", mnt],
                         capture_output=True, text=True, check=True).stdout
    import json

    return json.loads(out)


def _epoch(mnt: str, paths: list[str], digests: dict[str, str], seed: int) -> tuple[float, int]:
    order = list(paths)
    random.Random(seed).shuffle(order)

    def read(rel: str) -> int:
        with open(os.path.join(mnt, rel), "rb") as f:
            data = f.read()
        if hashlib.blake2b(data).hexdigest() != digests[rel]:
            raise RuntimeError(f"content mismatch in {rel}")
        return len(data)

    start = time.perf_counter()
    with ThreadPoolExecutor(READERS) as pool:
        total = sum(pool.map(read, order, chunksize=16))
    return time.perf_counter() - start, total


def run_demo(files: int = 2000, size_kb: int = 100, keep: bool = False) -> int:
    from .testing.servers import moto_server

    work = tempfile.mkdtemp(prefix="cachefs-demo-")
    mnt, cache = os.path.join(work, "mnt"), os.path.join(work, "cache")
    os.makedirs(mnt)
    print(f"cachefs demo: {files} files of ~{size_kb} KB in 20 classes, served by moto on 127.0.0.1")
    data = _dataset(files, size_kb)
    digests = {k: hashlib.blake2b(v).hexdigest() for k, v in data.items()}
    mounted = False
    try:
        with moto_server() as server:
            server.create_bucket(BUCKET)
            t0 = time.perf_counter()
            server.upload(BUCKET, data)
            print(f"  uploaded {sum(map(len, data.values())) / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s")
            env = dict(os.environ, **server.env)
            cmd = [sys.executable, "-m", "cachefs.cli", "mount", f"s3://{BUCKET}", mnt,
                   "--endpoint-url", server.endpoint_url, "--cache-dir", cache, "--cache-size", "2G"]
            print("  $ " + " ".join(["cachefs", *cmd[3:]]))
            subprocess.run(cmd, env=env, check=True)
            mounted = True
            paths = sorted(data)
            prev = _counters(mnt)
            print(f"  {'pass':<6}{'files/s':>10}{'MB/s':>9}{'hit ratio':>11}{'GETs':>7}{'LISTs':>7}")
            for name, seed in (("cold", 1), ("warm", 2)):
                secs, nbytes = _epoch(mnt, paths, digests, seed)
                now = _counters(mnt)
                gets = _backend(now, "get") - _backend(prev, "get")
                # files not fetched from the bucket: from the disk cache or the kernel's page cache
                ratio = max(0.0, 1 - gets / len(paths))
                lists = _backend(now, "list") - _backend(prev, "list")
                print(f"  {name:<6}{len(paths) / secs:>10.0f}{nbytes / secs / 1e6:>9.1f}{ratio:>10.0%}"
                      f"{gets:>7.0f}{lists:>7.0f}")
                prev = now
            print(f"  every file's content checked ({len(paths)} files x 2 passes)")
            subprocess.run([sys.executable, "-m", "cachefs.cli", "unmount", mnt], check=True)
            mounted = False
        print("cachefs demo: ok")
        return 0
    finally:
        if mounted:
            subprocess.run([sys.executable, "-m", "cachefs.cli", "unmount", mnt], check=False)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _backend(status: dict[str, Any], op: str) -> float:
    return float(status["backend"].get("by_operation", {}).get(op, 0))
