"""Shared pieces of the fault tests: a bucket behind a fault proxy, metrics, daemon facts.

Mounting itself uses ``tests.fuse.mounts.mounted`` (the real ``cachefs`` command).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from cachefs.testing.proxy import LatencyProxy
from cachefs.testing.servers import Server
from tests.fuse.stores import Bucket

T = TypeVar("T")


@dataclass
class Faulty:
    """A bucket whose ``mount_args``/``mount_env`` point cachefs at ``proxy``, not the server."""

    bucket: Bucket
    proxy: LatencyProxy
    server: Server


def _client(server: Server, name: str) -> object:
    return server.s3_client() if server.kind == "s3" else server.blob_service().get_container_client(name)


@contextlib.contextmanager
def faulty_bucket(server: Server, name: str, latency: float = 0.0) -> Iterator[Faulty]:
    server.create_bucket(name)
    target = urlsplit(server.endpoint_url)
    with LatencyProxy((target.hostname or "127.0.0.1", target.port or 80), latency) as proxy:
        env = dict(server.env)
        endpoint = proxy.url
        if server.kind == "azure":
            conn = env["AZURE_STORAGE_CONNECTION_STRING"]
            env["AZURE_STORAGE_CONNECTION_STRING"] = conn.replace(server.endpoint_url.rsplit("/", 1)[0], proxy.url)
            endpoint = proxy.url + "/" + server.endpoint_url.rsplit("/", 1)[1]
        yield Faulty(Bucket(server.kind, name, endpoint, env, _client(server, name)), proxy, server)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def metric_sum(sample: dict[str, float], name: str) -> float:
    """Sum of every series of one metric (all label values)."""
    return sum(v for k, v in sample.items() if k == name or k.startswith(name + "{"))


def http_status(port: int, path: str, timeout: float = 10) -> int:
    try:
        return int(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout).status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    return int(proc_status(pid)[field].split()[0])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def daemon_log(cache_dir: Path) -> str:
    return (cache_dir / "cachefs.log").read_text(errors="replace")


def tree_files(root: Path) -> dict[str, Path]:
    """Every file below root by relative path (bytes names decoded with surrogateescape)."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = Path(d, n)
            out[os.path.relpath(p, root)] = p
    return out


class Background(threading.Thread, Generic[T]):
    """Run ``fn(*args)`` in a thread; ``result()`` joins and returns its value (or raises)."""

    def __init__(self, fn: Callable[..., T], *args: object) -> None:
        super().__init__(daemon=True)
        self._fn, self._args = fn, args
        self._value: T | None = None
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:
            self._error = exc

    def result(self, timeout: float) -> T:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self._fn.__name__} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def fast_upload(server: Server, bucket: str, objects: dict[str, bytes], concurrency: int = 64) -> None:
    """Upload many small objects to an S3 server with obstore (async, no GIL): several times
    faster than boto3 threads for a 10,000-object dataset."""
    import asyncio

    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, config={  # type: ignore[arg-type]
        "endpoint": server.endpoint_url, "region": "us-east-1", "virtual_hosted_style_request": False,
        "access_key_id": server.env["AWS_ACCESS_KEY_ID"], "secret_access_key": server.env["AWS_SECRET_ACCESS_KEY"]},
        client_options={"allow_http": True})

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)

        async def put(key: str, data: bytes) -> None:
            async with sem:
                await obstore.put_async(store, key, data)

        await asyncio.gather(*(put(k, v) for k, v in objects.items()))

    asyncio.run(main())
