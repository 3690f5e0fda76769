"""Backend faults through a real mount: transient errors are retried invisibly, a cut body is never
served or cached, an outage fails reads with EIO within ``--backend-timeout`` and the daemon
recovers; every attempt is one HTTP request (no SDK retries under ours) and is counted.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cachefs.testing.servers import free_port
from tests.fuse.mounts import mounted, scrape

from .helpers import Faulty, alive, http_status, metric_sum, sha

pytestmark = pytest.mark.timeout(300)

N_FILES = 2000
BIG = 9 * 1024 * 1024 + 333  # three 4 MiB blocks, the last one partial
READERS = 16


def dataset(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    objects = {f"ds/d{i % 20:02d}/f{i:05d}.bin": rng.randbytes(rng.randrange(700, 24_000)) for i in range(N_FILES)}
    objects["big/a.bin"] = rng.randbytes(BIG)
    objects["big/b.bin"] = rng.randbytes(BIG)
    return objects


def read_all(root: Path, objects: dict[str, bytes]) -> list[str]:
    """Read every file (many readers); the keys whose bytes differ or that raised."""
    def check(key: str) -> str | None:
        try:
            with open(root / key, "rb") as f:
                got = f.read()
        except OSError as exc:
            return f"{key}: {errno.errorcode.get(exc.errno or 0, exc.errno)}"
        return None if sha(got) == sha(objects[key]) else f"{key}: {len(got)} bytes, want {len(objects[key])}"

    with ThreadPoolExecutor(READERS) as pool:
        return [r for r in pool.map(check, sorted(objects)) if r is not None]


def test_transient_faults_are_invisible(faulty_any: Faulty, tmp_path: Path) -> None:
    """10% of requests fail (503, reset, body cut short): every file still reads back identical,
    no EIO; nothing cut short was cached; each attempt was one HTTP request and each retry is
    counted in cachefs_backend_retries_total."""
    b, proxy = faulty_any.bucket, faulty_any.proxy
    objects = dataset(1)
    b.put_many(objects)
    port = free_port()
    cache = tmp_path / "cache"
    args = [*b.mount_args, "--metrics-addr", str(port), "--backend-timeout", "30"]
    proxy.inject(("error", "reset", "cut"), rate=0.10)
    with mounted(b.source, tmp_path / "mnt", cache, b.mount_env, *args) as m:
        bad = read_all(m.path, objects)
        after = scrape(port)
        faults = dict(proxy.stats.faults)
        requests = proxy.stats.requests
    proxy.clear()
    assert bad == [], bad[:10]
    print(f"\n{b.kind}: {len(objects)} files read, proxy saw {requests} requests, faults {faults}, "
          f"retries {metric_sum(after, 'cachefs_backend_retries_total'):.0f}")
    assert all(faults.get(k, 0) >= 20 for k in ("error", "reset", "cut")), faults
    attempts = metric_sum(after, "cachefs_backend_requests_total")
    failed = sum(v for k, v in after.items()
                 if k.startswith("cachefs_backend_requests_total{") and 'outcome="error"' in k)
    retries = metric_sum(after, "cachefs_backend_retries_total")
    # Every request cachefs made reached the proxy exactly once: no SDK retried on its own.
    assert attempts == requests, (attempts, requests)
    # Every failed attempt was retried (none gave up); error and reset faults always fail one.
    assert retries == failed >= faults["error"] + faults["reset"], (retries, failed, faults)
    assert after['cachefs_backend_retries_total{operation="get"}'] > 0

    # Whatever was cached is whole: a remount serves every file from the cache, identical.
    with mounted(b.source, tmp_path / "mnt", cache, b.mount_env, *args) as m:
        assert read_all(m.path, objects) == []
        assert m.gets() == 0


@pytest.mark.parametrize("kind", ["outage", "stall"])
def test_outage_fails_reads_in_bounded_time_and_recovers(faulty_any: Faulty, kind: str, tmp_path: Path) -> None:
    """A store that refuses connections (outage) or accepts and never answers (stall): a read of
    uncached data fails with EIO within --backend-timeout (+ slack), the daemon stays up, cached
    data is still served, /healthz answers 200, and reads work once the store is back."""
    b, proxy = faulty_any.bucket, faulty_any.proxy
    rng = random.Random(2)
    objects = {f"o/{i}.bin": rng.randbytes(50_000) for i in range(8)}
    b.put_many(objects)
    timeout = 3.0
    port = free_port()
    args = [*b.mount_args, "--metrics-addr", str(port), "--backend-timeout", str(timeout)]
    with mounted(b.source, tmp_path / "mnt", tmp_path / "cache", b.mount_env, *args) as m:
        pid = int(m.status()["pid"])
        assert (m.path / "o/0.bin").read_bytes() == objects["o/0.bin"]  # cached before the outage
        for key in objects:
            os.stat(m.path / key)  # listed and in the kernel's cache
        before = scrape(port)
        proxy.inject(kind, stall_seconds=120)
        health: list[int] = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                health.append(http_status(port, "/healthz", timeout=10))
                time.sleep(0.2)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            took = []
            for key in ("o/1.bin", "o/2.bin"):
                t0 = time.monotonic()
                with pytest.raises(OSError) as info:
                    (m.path / key).read_bytes()
                took.append(time.monotonic() - t0)
                assert info.value.errno == errno.EIO
            assert (m.path / "o/0.bin").read_bytes() == objects["o/0.bin"]
        finally:
            stop.set()
            prober.join()
        print(f"\n{b.kind} {kind}: EIO after {', '.join(f'{t:.1f}' for t in took)} s "
              f"(--backend-timeout {timeout:g}); /healthz {sorted(set(health))} x{len(health)}")
        assert all(t < timeout + 3 for t in took), took
        assert health and all(h == 200 for h in health), health
        assert alive(pid)
        during = scrape(port)
        failed = 'cachefs_backend_requests_total{operation="get",outcome="error"}'
        assert during[failed] >= before[failed] + 2
        if kind == "outage":  # refused at once: retried with backoff until the deadline
            retried = 'cachefs_backend_retries_total{operation="get"}'
            assert during[retried] >= before[retried] + 2
        assert during['cachefs_fuse_errors_total{errno="EIO",operation="read"}'] >= 2

        proxy.clear()
        for key in ("o/1.bin", "o/2.bin", "o/3.bin"):
            assert (m.path / key).read_bytes() == objects[key]
        assert http_status(port, "/healthz") == 200
        assert int(m.status()["pid"]) == pid
