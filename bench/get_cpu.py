"""CPU cost of one small GET, and of listing 1,000 keys, through cachefs's S3 and Azure backends.

Every client is measured side by side in one process, against one SeaweedFS and one Azurite on
loopback, in alternating rounds so that machine noise hits all alike; the figure is the process's
CPU time (user + system, every thread) divided by the GETs made or the keys listed.

GETs: N concurrent trio tasks each fetch a ~110 KB object through ``Backend.get_range`` (the exact
call the daemon makes: worker-thread hop, retry wrapper, If-Match pin).
- S3: boto3, or obstore (the default; ``CACHEFS_S3_DATA_PATH``);
- Azure: azure-storage-blob (``download_blob``, one connection, as the backend did before),
  the lean REST client (``CACHEFS_AZURE_DATA_PATH=rest``), or obstore (the default).

Listings: every page of one folder of ``--keys`` objects through ``Backend.list_page`` with "/" as
delimiter (what the lister asks), one page after the other, all rounds in one trio event loop (as
in the daemon; before 2026-11-30 each round started an event loop of its own, ~0.6 ms per 1,000
keys more on every row).
- S3: botocore parsing the page itself (no hook, as before 9a0b78a), botocore's request with the
  page read by ElementTree (the baseline of issue 12), botocore's request with the page read as
  cachefs reads it (``CACHEFS_S3_LIST_PATH=botocore``), cachefs (``s3_rest``: one signed urllib3
  request a page, the same reading), and obstore's ``list_with_delimiter`` for reference;
- Azure: azure-storage-blob (``walk_blobs``, as the backend did before), cachefs (``azure_rest``:
  azure-core's pipeline, the page read by ``xmlscan``), and obstore's ``list_with_delimiter``.
obstore's listing cannot serve the lister (no continuation token: it gathers a whole folder in
memory; prefixes only at "/" boundaries): see docs/decisions.md.

    .venv/bin/python bench/get_cpu.py [--gets 2000] [--concurrency 32] [--rounds 3] [--keys 5000]
                                      [--stores s3,azure] [--only get,list]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachefs.backends import Backend, ListPage, ObjectInfo, s3
from cachefs.backends.azure import AzureBackend
from cachefs.backends.s3 import S3Backend
from cachefs.source import parse_source
from cachefs.testing.servers import Server, azurite_server, seaweed_server

SIZE = 110_000
OBJECTS = 500  # distinct objects the GETs cycle through
BUCKET = "getcpu"
LIST_DIR = "list/"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class SdkAzure(AzureBackend):
    """The Azure backend as it was before obstore: GETs and listings through azure-storage-blob."""

    def _get_sync(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        from azure.core import MatchConditions

        def fetch() -> bytes:
            stream = self.container.get_blob_client(key).download_blob(
                offset=start, length=length, etag=f'"{etag}"' if etag else None,
                match_condition=MatchConditions.IfNotModified if etag else None, max_concurrency=1)
            return bytes(stream.readall())

        return self._run(f"get {key!r}", fetch)  # type: ignore[no-any-return]

    def _list_sync(self, prefix: str, delimiter: str | None, token: str | None) -> ListPage:
        from azure.storage.blob import BlobPrefix

        def fetch() -> ListPage:
            it: Any
            if delimiter:
                it = self.container.walk_blobs(name_starts_with=prefix or None, delimiter=delimiter,
                                               results_per_page=self.page_size)
            else:
                it = self.container.list_blobs(name_starts_with=prefix or None, results_per_page=self.page_size)
            pages: Any = it.by_page(continuation_token=token)
            page = ListPage()
            for item in next(pages, []):
                if isinstance(item, BlobPrefix):
                    page.prefixes.append(item.name)
                else:
                    page.objects.append(ObjectInfo(item.name, int(item.size), str(item.etag).strip('"'),
                                                   item.last_modified.timestamp()))
            page.token = pages.continuation_token or None
            return page

        return self._run(f"list {prefix!r}", fetch)  # type: ignore[no-any-return]


class TreeS3(S3Backend):
    """The S3 backend as it was before ``xmlscan``: each page read with ElementTree."""

    def _list_sync(self, prefix: str, delimiter: str | None, token: str | None) -> ListPage:
        with mock.patch.object(s3, "_parse_listing", s3._parse_listing_tree):
            return super()._list_sync(prefix, delimiter, token)


class BotocoreS3(S3Backend):
    """The S3 backend with botocore parsing listing pages itself (the client without the hook)."""

    def _list_sync(self, prefix: str, delimiter: str | None, token: str | None) -> ListPage:
        kwargs: dict[str, Any] = {"Bucket": self.source.bucket, "Prefix": prefix, "MaxKeys": self.page_size}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token:
            kwargs["ContinuationToken"] = token
        resp = self._run(f"list {prefix!r}", self.client.list_objects_v2, **kwargs)
        return ListPage(
            objects=[ObjectInfo(o["Key"], int(o["Size"]), o.get("ETag", "").strip('"'), o["LastModified"].timestamp())
                     for o in resp.get("Contents", ())],
            prefixes=[p["Prefix"] for p in resp.get("CommonPrefixes", ())],
            token=resp.get("NextContinuationToken") if resp.get("IsTruncated") else None)


@contextlib.contextmanager
def env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_backends(server: Server, connections: int) -> dict[str, Backend]:
    def make(cls: type[S3Backend], path: str, listing: str = "rest") -> S3Backend:
        with env({**server.env, "CACHEFS_S3_DATA_PATH": path, "CACHEFS_S3_LIST_PATH": listing}):
            return cls(parse_source(f"s3://{BUCKET}"), endpoint_url=server.endpoint_url, region="us-east-1",
                       profile=None, timeout=30, max_connections=connections)

    return {"boto3": make(BotocoreS3, "boto3"), "obstore": make(S3Backend, "obstore"),
            "ElementTree": make(TreeS3, "obstore", "botocore"), "botocore list": make(S3Backend, "obstore", "botocore")}


def azure_backends(server: Server, connections: int) -> dict[str, Backend]:
    def make(cls: type[AzureBackend], path: str) -> AzureBackend:
        with env({**server.env, "CACHEFS_AZURE_DATA_PATH": path}):
            return cls(parse_source(f"az://{BUCKET}"), account=None, endpoint_url=None, timeout=30,
                       max_connections=connections)

    return {"sdk": make(SdkAzure, "rest"), "rest": make(AzureBackend, "rest"), "obstore": make(AzureBackend, "obstore")}


async def gets(backend: Backend, keys: list[str], etags: dict[str, str], concurrency: int) -> tuple[float, float]:
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


async def list_all(backend: Backend) -> int:
    """Keys listed in every page of LIST_DIR, one page after the other, as the lister does."""
    count, token = 0, None
    while True:
        page = await backend.list_page(LIST_DIR, "/", token)
        count += len(page.objects) + len(page.prefixes)
        token = page.token
        if token is None:
            return count


def obstore_lister(store: Any) -> Callable[[], Awaitable[int]]:
    import obstore

    async def run() -> int:
        result = obstore.list_with_delimiter(store, LIST_DIR.rstrip("/"))
        return len(result["objects"]) + len(result["common_prefixes"])

    return run


def backend_lister(backend: Backend) -> Callable[[], Awaitable[int]]:
    return lambda: list_all(backend)


def measure_store(server: Server, args: argparse.Namespace, results: dict[str, dict[str, list[float]]]) -> None:
    server.create_bucket(BUCKET)
    objects = {f"o/{i:05d}": os.urandom(SIZE) for i in range(OBJECTS)}
    server.upload(BUCKET, objects)
    server.upload(BUCKET, ((f"{LIST_DIR}file-{i:07d}.jpg", b"x" * (i % 97)) for i in range(args.keys)))
    connections = args.concurrency + 8
    backends = s3_backends(server, connections) if server.kind == "s3" else azure_backends(server, connections)
    store = "S3 (SeaweedFS)" if server.kind == "s3" else "Azure (Azurite)"
    probe = next(iter(backends.values()))
    etags = {k: trio.run(probe.head, k).etag for k in objects}
    keys = [list(objects)[i % len(objects)] for i in range(args.gets)]
    listers: dict[str, Callable[[], Awaitable[int]]] = {}
    if "list" in args.only:
        if server.kind == "s3":
            listers = {"botocore": backend_lister(backends["boto3"]),
                       "ElementTree (before)": backend_lister(backends["ElementTree"]),
                       "botocore request": backend_lister(backends["botocore list"]),
                       "cachefs": backend_lister(backends["obstore"])}
        else:
            listers = {"sdk (before)": backend_lister(backends["sdk"]), "cachefs": backend_lister(backends["obstore"])}
        listers["obstore (reference)"] = obstore_lister(backends["obstore"].store)  # type: ignore[attr-defined]

    async def get_rounds() -> None:
        for b in backends.values():  # warm up connections
            await gets(b, keys[:100], etags, args.concurrency)
        for _ in range(args.rounds):
            for path, b in backends.items():
                if path in ("ElementTree", "botocore list"):
                    continue  # the obstore data path again: they differ in listings only
                c, w = await gets(b, keys, etags, args.concurrency)
                results.setdefault(f"get|{store}|{path}", {"cpu": [], "rate": []})
                results[f"get|{store}|{path}"]["cpu"].append(c / args.gets * 1000)
                results[f"get|{store}|{path}"]["rate"].append(args.gets / w)

    if "get" in args.only:
        trio.run(get_rounds)
    async def list_rounds() -> None:  # in one event loop, as the daemon lists
        for name, fn in listers.items():
            assert await fn() == args.keys, name  # warm up, and every client sees every key
        for _ in range(args.rounds):
            for name, fn in listers.items():
                c0 = cpu()
                n = await fn()
                results.setdefault(f"list|{store}|{name}", {"cpu": [], "rate": []})
                results[f"list|{store}|{name}"]["cpu"].append((cpu() - c0) / n * 1000 * 1000)

    trio.run(list_rounds)
    for b in backends.values():
        trio.run(b.aclose)


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; medians of {args.rounds} rounds")
    if "get" in args.only:
        print(f"\nGETs: {args.gets} of {SIZE // 1000} KB per round, {args.concurrency} in flight")
        print(f"{'store':<18}{'data path':<12}{'CPU ms/GET':>12}{'GET/s':>10}")
        for name, r in results.items():
            kind, store, path = name.split("|")
            if kind == "get":
                print(f"{store:<18}{path:<12}{statistics.median(r['cpu']):>12.3f}{statistics.median(r['rate']):>10.0f}")
    if "list" in args.only:
        print(f"\nListings: a folder of {args.keys} keys, every page, per round")
        print(f"{'store':<18}{'client':<22}{'CPU ms per 1,000 keys':>24}")
        for name, r in results.items():
            kind, store, path = name.split("|")
            if kind == "list":
                print(f"{store:<18}{path:<22}{statistics.median(r['cpu']):>24.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--gets", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keys", type=int, default=5000, help="objects in the listed folder")
    ap.add_argument("--stores", default="s3,azure")
    ap.add_argument("--only", default="get,list")
    args = ap.parse_args()
    args.only = set(args.only.split(","))
    results: dict[str, dict[str, list[float]]] = {}
    servers = {"s3": seaweed_server, "azure": azurite_server}
    for kind in args.stores.split(","):
        with servers[kind]() as server:
            measure_store(server, args, results)
    report(results, args)


if __name__ == "__main__":
    main()
