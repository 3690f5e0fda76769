"""The cluster-shared cache tier: origin egress and epoch time for N nodes, with and without it.

    .venv/bin/python bench/tier.py --out bench/RESULTS.md          # N = 1, 2, 4 (~5 min)
    .venv/bin/python bench/tier.py --nodes 1 2 --objects 40 --out /tmp/t.md   # smoke (~1 min)

Setup, all on this machine: the origin is SeaweedFS ``weed mini`` (``seaweed_server``) behind the
latency proxy (``cachefs.testing.proxy``, in this process) adding ``--rtt-ms`` per round trip:
the bucket is far away. The tier (``seaweed_tier``: master, two volume servers, filer with its
S3 gateway) remote-mounts the bucket through that proxy and is reached directly: it is in the
cluster. The dataset is ``--objects`` objects of 16 KB - 4 MB (log-uniform).

For each N, without then with the tier: N cachefs mounts (N nodes), each with an empty cache dir
of its own, read the whole dataset at once, each in its own shuffled order with ``--readers``
threads (a cold epoch: what every node does when the dataset does not fit its cache, or a node
is new). The tier is emptied before each run (``remote.uncache``), so each run with it starts
cold too. Reported: the epoch time (until the last node finished), the origin's egress (bytes
through the proxy, as a multiple of the dataset) and the blocks the nodes got from the tier.
Every file read is checked against its SHA-256; a mismatch fails the run. Every mount is
unmounted and every server stopped, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rss_listing import replace_section
from cachefs.testing.proxy import LatencyProxy
from cachefs.testing.servers import free_port, seaweed_server, seaweed_tier

HEADING = "## Cache tier: N nodes, origin egress and epoch time (issue 13)"
BUCKET = "tier-bench"
MOUNT_TIMEOUT = 120
# Without the tier; with it, emptied first; with it, as the previous run left it (new nodes, or
# caches smaller than the dataset, in a cluster whose tier already holds the dataset).
MODES = ("origin", "tier cold", "tier warm")


@dataclass
class Run:
    nodes: int
    mode: str  # "origin", "tier cold" or "tier warm"
    seconds: float
    egress: int  # bytes the origin sent
    from_tier: int  # block bytes the nodes got from the tier
    from_origin: int


def dataset(n: int, seed: int = 13) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"train/{i:05d}.bin": rng.randbytes(int((16 << 10) * 256 ** rng.random())) for i in range(n)}


def cachefs(*args: str, env: dict[str, str]) -> None:
    import subprocess

    res = subprocess.run([sys.executable, "-m", "cachefs.cli", *args], env=env, capture_output=True,
                         text=True, timeout=MOUNT_TIMEOUT)
    if res.returncode != 0:
        raise RuntimeError(f"cachefs {' '.join(args)}: {res.stderr.strip()}")


def scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name))


@contextlib.contextmanager
def mounts(n: int, work: Path, env: dict[str, str], args: list[str]) -> Iterator[list[tuple[Path, int]]]:
    done: list[tuple[Path, int]] = []
    try:
        for i in range(n):
            mnt, cache, port = work / f"mnt{i}", work / f"cache{i}", free_port()
            mnt.mkdir(parents=True)
            cachefs("mount", f"s3://{BUCKET}", str(mnt), "--cache-dir", str(cache), "--cache-size", "2G",
                    "--metrics-addr", f"127.0.0.1:{port}", *args, env=env)
            done.append((mnt, port))
        yield done
    finally:
        for mnt, _ in done:
            with contextlib.suppress(Exception):
                cachefs("unmount", str(mnt), env=env)
        with open("/proc/mounts") as f:
            left = [m for m, _ in done if any(line.split()[1] == str(m) for line in f)]
        if left:
            raise RuntimeError(f"mounts left behind: {left}")


def epoch(mnt: Path, want: dict[str, str], readers: int, seed: int) -> None:
    keys = sorted(want)
    random.Random(seed).shuffle(keys)

    def read(key: str) -> None:
        if hashlib.sha256((mnt / key).read_bytes()).hexdigest() != want[key]:
            raise RuntimeError(f"{mnt / key}: wrong bytes")

    with ThreadPoolExecutor(readers) as pool:
        list(pool.map(read, keys))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--readers", type=int, default=8, help="reader threads per node")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="added to every round trip to the origin")
    ap.add_argument("--out", type=Path, help="markdown file whose section this replaces (or appends)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cachefs-bench-tier"))
    opts = ap.parse_args()

    data = dataset(opts.objects)
    total = sum(map(len, data.values()))
    want = {k: hashlib.sha256(v).hexdigest() for k, v in data.items()}
    runs: list[Run] = []
    with seaweed_server() as origin, LatencyProxy(origin.address, latency=opts.rtt_ms / 2000) as proxy, \
            seaweed_tier() as tier:
        origin.create_bucket(BUCKET)
        origin.upload(BUCKET, data)
        tier.mount_remote(BUCKET, origin, proxy.url)
        env = dict(os.environ, **origin.env, CACHEFS_TIER_ACCESS_KEY_ID=tier.server.env["CACHEFS_TIER_ACCESS_KEY_ID"],
                   CACHEFS_TIER_SECRET_ACCESS_KEY=tier.server.env["CACHEFS_TIER_SECRET_ACCESS_KEY"])
        print(f"dataset: {len(data)} objects, {total / 1e6:.0f} MB; origin +{opts.rtt_ms:g} ms RTT", flush=True)
        for n in opts.nodes:
            for mode in MODES:
                with_tier = mode != "origin"
                if mode != "tier warm":
                    tier.shell(f"remote.uncache -dir=/buckets/{BUCKET}\n")  # an empty tier
                work = opts.work / f"n{n}-{mode.replace(' ', '-')}"
                if work.exists():
                    import shutil

                    shutil.rmtree(work)
                args = ["--endpoint-url", proxy.url]
                if with_tier:
                    args += ["--tier-endpoint-url", tier.endpoint_url]
                with mounts(n, work, env, args) as nodes:
                    before = proxy.stats.bytes_down
                    began = time.monotonic()
                    with ThreadPoolExecutor(n) as pool:
                        list(pool.map(lambda i: epoch(nodes[i][0], want, opts.readers, seed=i), range(n)))
                    seconds = time.monotonic() - began
                    egress = proxy.stats.bytes_down - before
                    got = [int(scrape(p, 'cachefs_block_fetch_bytes_total{source="tier"}')) for _, p in nodes]
                    org = [int(scrape(p, 'cachefs_block_fetch_bytes_total{source="origin"}')) for _, p in nodes]
                runs.append(Run(n, mode, seconds, egress, sum(got), sum(org)))
                print(f"N={n} {mode:9}: {seconds:6.1f} s, origin egress "
                      f"{egress / total:.2f}x the dataset, from the tier {sum(got) / total:.2f}x", flush=True)
    text = report(runs, opts, len(data), total)
    print(text)
    if opts.out:
        replace_section(opts.out, text, HEADING)
    return 0


def report(runs: list[Run], opts: argparse.Namespace, objects: int, total: int) -> str:
    by = {(r.nodes, r.mode): r for r in runs}
    lines = [
        HEADING, "",
        f"`.venv/bin/python bench/tier.py --nodes {' '.join(map(str, opts.nodes))} --objects {opts.objects} "
        f"--readers {opts.readers} --rtt-ms {opts.rtt_ms:g} --out bench/RESULTS.md`: {objects} objects of "
        f"16 KB - 4 MB ({total / 1e6:.0f} MB); origin SeaweedFS `weed mini` behind the latency proxy "
        f"(+{opts.rtt_ms:g} ms per round trip), the tier (`weed master`, two `weed volume`, `weed filer -s3`) "
        "reached directly; N cachefs mounts with empty caches read the whole dataset at once, each in its "
        f"own shuffled order with {opts.readers} threads. *origin*: no tier; *tier cold*: the tier emptied "
        "(`remote.uncache`) first; *tier warm*: the tier as the cold run left it (new nodes joining, or "
        "node caches smaller than the dataset). Egress: bytes the origin sent, as a multiple of the "
        "dataset. One run, side by side, on a 2-core machine shared with other work: read the ratios, "
        "not the seconds.", "",
        "| N nodes | epoch (s): origin / tier cold / tier warm | time vs origin: cold / warm | "
        "origin egress: origin / tier cold / tier warm | blocks from the tier: cold / warm |",
        "|---|---|---|---|---|",
    ]
    for n in opts.nodes:
        a, b, c = (by[(n, mode)] for mode in MODES)
        lines.append(f"| {n} | {a.seconds:.1f} / {b.seconds:.1f} / {c.seconds:.1f} | "
                     f"{b.seconds / a.seconds:.2f} / {c.seconds / a.seconds:.2f} | "
                     f"{a.egress / total:.2f}x / {b.egress / total:.2f}x / {c.egress / total:.2f}x | "
                     f"{b.from_tier / (b.from_tier + b.from_origin):.0%} / "
                     f"{c.from_tier / (c.from_tier + c.from_origin):.0%} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
