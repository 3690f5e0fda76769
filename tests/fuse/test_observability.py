"""Metrics, health endpoints, status and logs of a live mount (issue: run where training runs)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cachefs.http import HealthProbe
from cachefs.testing.servers import free_port

from .mounts import cachefs, mounted, scrape
from .stores import Bucket

pytestmark = pytest.mark.timeout(300)


def http_status(port: int, path: str) -> int:
    try:
        return int(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def files(n: int, size: int = 20_000) -> dict[str, bytes]:
    return {f"ds/c{i % 4}/f{i:04d}.bin": os.urandom(size) for i in range(n)}


def test_metrics_move_with_reads_and_health_answers(s3_bucket: Bucket, tmp_path: Path) -> None:
    data = files(40)
    s3_bucket.put_many(data)
    port = free_port()
    cache = tmp_path / "cache"
    args = [*s3_bucket.mount_args, "--metrics-addr", str(port), "--log-format", "json"]
    with mounted(s3_bucket.source, tmp_path / "mnt", cache, s3_bucket.mount_env, *args) as m:
        assert http_status(port, "/healthz") == 200
        assert http_status(port, "/readyz") == 200
        before = scrape(port)
        for key, blob in data.items():
            assert (m.path / key).read_bytes() == blob
        cold = scrape(port)
        backend_bytes = 'cachefs_read_bytes_total{source="backend"}'
        assert cold[backend_bytes] - before[backend_bytes] == sum(map(len, data.values()))
        assert cold["cachefs_cache_misses_total"] - before["cachefs_cache_misses_total"] == len(data)
        assert cold['cachefs_backend_requests_total{operation="get",outcome="ok"}'] >= len(data)
        assert cold["cachefs_cache_used_bytes"] >= sum(map(len, data.values()))
        assert cold["cachefs_listing_objects"] == len(data)
        assert cold['cachefs_fuse_operations_total{operation="read"}'] >= len(data)
        assert cold['cachefs_backend_request_duration_seconds_count{operation="get"}'] >= len(data)
        # label values are bounded: no object keys in any series
        assert not any("f00" in name for name in cold)
        # the metrics port listens on loopback only
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex(("127.0.0.1", port)) == 0
    # a remount: the kernel's page cache is gone, the daemon's disk cache is not
    with mounted(s3_bucket.source, tmp_path / "mnt", cache, s3_bucket.mount_env, *args) as m:
        start = scrape(port)
        for key, blob in data.items():
            assert (m.path / key).read_bytes() == blob
        warm = scrape(port)
        assert warm["cachefs_cache_hits_total"] - start["cachefs_cache_hits_total"] == len(data)
        assert warm['cachefs_read_bytes_total{source="cache"}'] == sum(map(len, data.values()))
        assert warm['cachefs_backend_requests_total{operation="get",outcome="ok"}'] == 0
        with pytest.raises(FileNotFoundError):
            os.stat(m.path / "ds/missing")
        assert scrape(port)['cachefs_fuse_errors_total{errno="ENOENT",operation="lookup"}'] >= 1
    log_lines = (cache / "cachefs.log").read_text().splitlines()
    assert log_lines and all(json.loads(line)["message"] is not None for line in log_lines)


def test_status_reports_source_cache_and_prefetch(s3_bucket: Bucket, tmp_path: Path) -> None:
    data = files(60)
    s3_bucket.put_many(data)
    with mounted(s3_bucket.source, tmp_path / "mnt", tmp_path / "cache", s3_bucket.mount_env,
                 *s3_bucket.mount_args) as m:
        res = cachefs("prefetch", str(m.path), "--wait", env=m.env, check=True)
        assert "60/60 files" in res.stdout + res.stderr
        text = cachefs("status", str(m.path), env=m.env, check=True).stdout
        assert s3_bucket.source in text and "hit ratio" in text and "prefetch:   done" in text
        st = m.status()
        assert st["prefetch"]["files_done"] == 60 and st["cache"]["used_bytes"] == sum(map(len, data.values()))
        gets = m.gets()
        for key, blob in data.items():
            assert (m.path / key).read_bytes() == blob
        assert m.gets() == gets  # everything came from the prefetched cache
        assert m.status()["reads"]["hit_ratio"] == 1.0


def test_readyz_waits_for_prefetch_when_asked(s3_bucket: Bucket, seaweed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from cachefs.testing.proxy import LatencyProxy

    data = files(150, 5_000)
    s3_bucket.put_many(data)
    port = free_port()
    target = ("127.0.0.1", int(seaweed.endpoint_url.rsplit(":", 1)[1]))
    with LatencyProxy(target, latency=0.05) as proxy:  # slow enough to see "not ready yet"
        args = ["--endpoint-url", proxy.url, "--metrics-addr", f"127.0.0.1:{port}", "--prefetch",
                "--ready-after-prefetch", "--prefetch-concurrency", "4"]
        with mounted(s3_bucket.source, tmp_path / "mnt", tmp_path / "cache", s3_bucket.mount_env, *args) as m:
            assert http_status(port, "/healthz") == 200
            assert http_status(port, "/readyz") == 503
            deadline = time.monotonic() + 120
            while http_status(port, "/readyz") != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert http_status(port, "/readyz") == 200
            assert m.status()["prefetch"]["files_done"] == 150


def test_healthz_probe_detects_a_hung_daemon(s3_bucket: Bucket, tmp_path: Path) -> None:
    s3_bucket.put("h/x", b"x")
    with mounted(s3_bucket.source, tmp_path / "mnt", tmp_path / "cache", s3_bucket.mount_env,
                 *s3_bucket.mount_args) as m:
        probe = HealthProbe(str(m.path))
        assert probe.healthy()
        pid = m.status()["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            assert not probe.healthy()
            assert time.monotonic() - start < 10
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not probe.healthy() and time.monotonic() < deadline:
            pass
        assert probe.healthy()


def test_prefetch_from_list_and_capacity(s3_bucket: Bucket, tmp_path: Path) -> None:
    data = files(50, 10_000)
    s3_bucket.put_many(data)
    order = sorted(data)[::5]
    listing = tmp_path / "order.txt"
    listing.write_text("".join(f"{k}\n" for k in order))
    with mounted(s3_bucket.source, tmp_path / "mnt", tmp_path / "cache", s3_bucket.mount_env,
                 *s3_bucket.mount_args, "--cache-size", "200K") as m:
        res = cachefs("prefetch", str(m.path), "--from-list", str(listing), "--wait", env=m.env, check=True)
        assert "caught up" in res.stdout
        st = m.status()
        assert st["orders"]["default"]["lead"] == len(order)  # the list fits: fetched ahead whole
        assert m.gets() == len(order)
        gets = m.gets()
        for key in order:
            assert (m.path / key).read_bytes() == data[key]
        assert m.gets() == gets
        # the whole dataset (500 KB) does not fit in 200 KB: prefetch stops at the limit
        res = cachefs("prefetch", str(m.path), "--wait", env=m.env)
        assert "cache is full" in res.stderr
        st = m.status()
        assert st["prefetch"]["stopped_full"] and st["cache"]["used_bytes"] <= 200 * 1024
        assert st["prefetch"]["files_done"] < len(data)
        gets = m.gets()
        for key in order:  # what was fetched first was not evicted by the prefetch
            assert (m.path / key).read_bytes() == data[key]
        assert m.gets() == gets
        assert re.search(r"cache: .* FULL", cachefs("status", str(m.path), env=m.env).stdout)
