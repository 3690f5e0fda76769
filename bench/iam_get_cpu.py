"""CPU cost of one small GET with an IBM IAM API key (bearer tokens) vs HMAC keys (SigV4).

Same measurement as ``bench/get_cpu.py`` (N concurrent trio tasks each fetch a ~110 KB object
through ``S3Backend.get_range``; the process's CPU time divided by the GETs), for four backends
side by side in one process, rounds alternating: HMAC and IAM, each on the obstore and the boto3
data path. The store is moto on loopback (it accepts bearer requests; SeaweedFS checks SigV4
signatures and refuses them) and the IAM token endpoint is ``cachefs.testing.iam`` with one-hour
tokens, in this process. moto's own CPU runs in its own process and is not counted.

    .venv/bin/python bench/iam_get_cpu.py [--gets 1000] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics

import trio
from get_cpu import SIZE, run  # type: ignore[import-not-found]

from cachefs.backends.s3 import S3Backend
from cachefs.source import parse_source
from cachefs.testing.iam import IamServer
from cachefs.testing.servers import moto_server


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--gets", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with moto_server() as server, IamServer("bench-key", ttl=3600) as iam:
        server.create_bucket("iamcpu")
        objects = {f"o/{i:05d}": os.urandom(SIZE) for i in range(200)}
        server.upload("iamcpu", objects)
        backends = {}
        for auth in ("hmac", "iam"):
            for path in ("obstore", "boto3"):
                env = dict(server.env, CACHEFS_S3_DATA_PATH=path)
                if auth == "iam":
                    env = {"IBM_API_KEY_ID": "bench-key", "IBM_AUTH_ENDPOINT": iam.url,
                           "CACHEFS_S3_DATA_PATH": path, "AWS_EC2_METADATA_DISABLED": "true"}
                for name in [k for k in os.environ if k.startswith(("AWS_", "IBM_"))]:
                    del os.environ[name]
                os.environ.update(env)
                backends[f"{auth}/{path}"] = S3Backend(
                    parse_source("s3://iamcpu"), endpoint_url=server.endpoint_url, region=None, profile=None,
                    timeout=30, max_connections=args.concurrency + 8)
        etags = {k: server.s3_client().head_object(Bucket="iamcpu", Key=k)["ETag"].strip('"') for k in objects}
        keys = [list(objects)[i % len(objects)] for i in range(args.gets)]
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}

        async def all_rounds() -> None:
            for b in backends.values():  # warm up connections (and get the first token)
                await run(b, keys[:50], etags, args.concurrency)
            for _ in range(args.rounds):
                for name, b in backends.items():
                    results[name].append(await run(b, keys, etags, args.concurrency))

        trio.run(all_rounds)
    print(f"{args.gets} GETs of {SIZE // 1000} KB x {args.rounds} rounds, {args.concurrency} in flight, "
          f"moto on loopback, {os.cpu_count()} cores; IAM exchanges: {iam.grants}")
    print(f"{'auth/data path':<16}{'CPU ms/GET':>12}")
    per_get = {}
    for name, rs in results.items():
        per_get[name] = statistics.median(c / args.gets * 1000 for c, _ in rs)
        print(f"{name:<16}{per_get[name]:>12.3f}")
    for path in ("obstore", "boto3"):
        print(f"{path}: IAM/HMAC CPU per GET = {per_get[f'iam/{path}'] / per_get[f'hmac/{path}']:.2f}")


if __name__ == "__main__":
    main()
