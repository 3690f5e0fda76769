"""CPU cost of one small GET through cachefs's S3 backend: boto3 vs the obstore data path.

Runs both data paths side by side in one process against one SeaweedFS server on loopback:
N concurrent trio tasks each fetch a ~110 KB object through ``S3Backend.get_range`` (the exact
call the daemon makes, including the worker-thread hop and the If-Match pin), and the process's
CPU time (user + system) is divided by the number of GETs. Several rounds alternate the two
paths so machine noise hits both alike.

    .venv/bin/python bench/get_cpu.py [--gets 2000] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import trio

from cachefs.backends.s3 import S3Backend
from cachefs.source import parse_source
from cachefs.testing.servers import seaweed_server

SIZE = 110_000


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(backend: S3Backend, keys: list[str], etags: dict[str, str], concurrency: int) -> tuple[float, float]:
    send, recv = trio.open_memory_channel[str](len(keys))
    for k in keys:
        send.send_nowait(k)
    send.close()

    async def worker() -> None:
        async for k in recv:
            data = await backend.get_range(k, 0, SIZE, etags[k])
            assert len(data) == SIZE

    c0, t0 = cpu(), time.perf_counter()
    async with trio.open_nursery() as n:
        for _ in range(concurrency):
            n.start_soon(worker)
    return cpu() - c0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gets", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with seaweed_server() as server:
        server.create_bucket("getcpu")
        objects = {f"o/{i:05d}": os.urandom(SIZE) for i in range(500)}
        server.upload("getcpu", objects)
        os.environ.update(server.env)
        backends = {}
        for path in ("boto3", "obstore"):
            os.environ["CACHEFS_S3_DATA_PATH"] = path
            backends[path] = S3Backend(parse_source("s3://getcpu"), endpoint_url=server.endpoint_url, region=None,
                                       profile=None, timeout=30, max_connections=args.concurrency + 8)
        etags = {k: server.s3_client().head_object(Bucket="getcpu", Key=k)["ETag"].strip('"') for k in objects}
        keys = [list(objects)[i % len(objects)] for i in range(args.gets)]
        results: dict[str, list[tuple[float, float]]] = {p: [] for p in backends}

        async def all_rounds() -> None:
            for b in backends.values():  # warm up connections
                await run(b, keys[:100], etags, args.concurrency)
            for _ in range(args.rounds):
                for path, b in backends.items():
                    results[path].append(await run(b, keys, etags, args.concurrency))

        trio.run(all_rounds)
    print(f"{args.gets} GETs of {SIZE // 1000} KB x {args.rounds} rounds, {args.concurrency} in flight, "
          f"SeaweedFS on loopback, {os.cpu_count()} cores")
    print(f"{'data path':<10}{'CPU ms/GET':>12}{'GET/s':>10}{'GET/s per core-second':>24}")
    per_get = {}
    for path, rs in results.items():
        ms = statistics.median(c / args.gets * 1000 for c, _ in rs)
        rate = statistics.median(args.gets / w for _, w in rs)
        per_get[path] = ms
        print(f"{path:<10}{ms:>12.3f}{rate:>10.0f}{1000 / ms:>24.0f}")
    print(f"obstore uses {per_get['boto3'] / per_get['obstore']:.1f}x less CPU per GET than boto3")


if __name__ == "__main__":
    main()
