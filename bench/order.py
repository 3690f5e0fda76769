"""Cold epoch with the read order announced vs ``mount --prefetch`` (issue 10), side by side.

    .venv/bin/python bench/order.py                     # 3,000 files of ~110 KB; writes bench/RESULTS.md
    .venv/bin/python bench/order.py --files 200 --out /tmp/r.md     # smoke size (CI)

SeaweedFS on loopback behind the latency proxy (``--rtt-ms``, default +20 ms per round trip).
An ImageFolder-style dataset (``--classes`` folders, log-normal sizes averaging ``--mean-kb``)
is read once, cold, in a shuffled order by ``--readers`` threads taking the next index in turn
(as a DataLoader's workers do), through a fresh mount with an empty cache for each setup:

- ``--prefetch``: the mount's bulk prefetch starts with the mount, as the epoch does;
- ``announced``: no bulk prefetch; the epoch's order is announced (``cachefs.client.announce``)
  right after the mount, nothing below the root listed yet.

Two scenarios: the whole dataset read by one node, and rank 0 of ``--world`` nodes reading its
``DistributedSampler`` share (every ``--world``-th item of the shuffled order), as each node of
a multi-node job does.

Reported per setup: files/s of the epoch, backend GETs, reads that found their data already
cached (announced only), and the ratio announced / --prefetch. Every file read is compared with
its bytes as generated; a mismatch fails the run. Each setup runs ``--rounds`` times, alternating,
and the median is reported (the host is shared and noisy).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.rss_listing import replace_section  # noqa: E402
from cachefs import client  # noqa: E402
from cachefs.testing.proxy import LatencyProxy  # noqa: E402
from cachefs.testing.servers import Server, seaweed_server  # noqa: E402

HEADING = "## Announced order: cold epoch vs --prefetch"
CACHEFS = [sys.executable, "-m", "cachefs.cli"]


def dataset(files: int, classes: int, mean_kb: int, seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    sigma = 0.5
    mu = __import__("math").log(mean_kb * 1000) - sigma * sigma / 2
    out = {}
    for i in range(files):
        size = max(1000, int(rng.lognormvariate(mu, sigma)))
        out[f"train/n{i % classes:04d}/img{i:06d}.jpg"] = rng.randbytes(size)
    return out


def read_epoch(mnt: Path, order: list[str], data: dict[str, bytes], readers: int) -> float:
    """Seconds to read every file of ``order`` with ``readers`` threads taking indices in turn."""
    counter = itertools.count()
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= len(order):
                return
            key = order[i]
            if (mnt / key).read_bytes() != data[key]:
                raise SystemExit(f"wrong bytes read from {key}")

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(readers) as pool:
        for f in [pool.submit(worker) for _ in range(readers)]:
            f.result()
    return time.monotonic() - start


@contextlib.contextmanager
def mount(server: Server, proxy: LatencyProxy, bucket: str, work: Path, name: str, *extra: str):  # type: ignore[no-untyped-def]
    mnt, cache = work / name / "mnt", work / name / "cache"
    mnt.mkdir(parents=True)
    env = dict(os.environ, **server.env)
    subprocess.run([*CACHEFS, "mount", f"s3://{bucket}", str(mnt), "--cache-dir", str(cache),
                    "--endpoint-url", proxy.url, *extra], env=env, check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run([*CACHEFS, "unmount", str(mnt)], env=env, check=False, capture_output=True)
        with open("/proc/mounts") as f:
            if any(line.split()[1] == str(mnt) for line in f):
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)


def one(server: Server, proxy: LatencyProxy, bucket: str, work: Path, name: str, order: list[str],
        data: dict[str, bytes], readers: int) -> dict[str, float]:
    announced = name.startswith("announced")
    with mount(server, proxy, bucket, work, name, *([] if announced else ["--prefetch"])) as mnt:
        start = time.monotonic()
        if announced:
            client.announce(mnt, order)
        read_epoch(mnt, order, data, readers)
        seconds = time.monotonic() - start  # the announcement counts
        st = client.status(mnt)
        result = {"files_s": len(order) / seconds, "seconds": seconds,
                  "gets": st["backend"]["by_operation"]["get"]}
        if announced:
            result["position"] = st["orders"]["default"]["position"]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--mean-kb", type=int, default=110)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--world", type=int, default=4, help="nodes of the sharded scenario")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = ap.parse_args()

    data = dataset(args.files, args.classes, args.mean_kb)
    order = list(data)
    random.Random(1).shuffle(order)
    scenarios = {"whole dataset, 1 node": order, f"rank 0 of {args.world} nodes": order[0::args.world]}
    results: dict[tuple[str, str], list[dict[str, float]]] = {
        (sc, name): [] for sc in scenarios for name in ("--prefetch", "announced")}
    with seaweed_server() as server, tempfile.TemporaryDirectory(prefix="cachefs-bench-order-") as tmp:
        bucket = f"order-{uuid.uuid4().hex[:8]}"
        server.create_bucket(bucket)
        server.upload(bucket, data)
        with LatencyProxy(server.address, latency=args.rtt_ms / 2000) as proxy:
            run = itertools.count()
            for r in range(args.rounds):
                for sc, reads in scenarios.items():
                    for name in (("--prefetch", "announced") if r % 2 == 0 else ("announced", "--prefetch")):
                        res = one(server, proxy, bucket, Path(tmp), f"{name.strip('-')}-{next(run)}", reads, data,
                                  args.readers)
                        print(sc, name, json.dumps(res), flush=True)
                        results[sc, name].append(res)

    def med(key: tuple[str, str], what: str) -> float:
        return statistics.median(r[what] for r in results[key])

    mb = sum(map(len, data.values())) / 1e6
    cmd = (f"bench/order.py --files {args.files} --classes {args.classes} --mean-kb {args.mean_kb} "
           f"--readers {args.readers} --rtt-ms {args.rtt_ms:g} --rounds {args.rounds} --world {args.world}")
    text = (f"{HEADING}\n\n"
            f"`{cmd}` ({args.files} files, {mb:.0f} MB, in {args.classes} folders; SeaweedFS behind the "
            f"latency proxy, +{args.rtt_ms:g} ms per round trip; {args.readers} reader threads; a fresh "
            f"mount and an empty cache per run; median of {args.rounds} runs each, alternating).\n\n"
            "| scenario | setup | files read | files/s (cold epoch) | seconds | backend GETs "
            "| announced / --prefetch |\n"
            "|---|---|---|---|---|---|---|\n"
            + "".join(f"| {sc} | {name} | {len(scenarios[sc])} | {med((sc, name), 'files_s'):.0f} | "
                      f"{med((sc, name), 'seconds'):.1f} | {med((sc, name), 'gets'):.0f} | "
                      + (f"**{med((sc, name), 'files_s') / med((sc, '--prefetch'), 'files_s'):.2f}x** |\n"
                         if name == "announced" else "|\n")
                      for sc, name in results)
            + "\nTarget: announced >= 1.5x --prefetch. Every byte read was checked against the generated data.\n")
    replace_section(args.out, text, HEADING)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
