"""The cluster-shared cache tier (--tier-endpoint-url) with real processes: an origin S3 server
(moto) behind a counting proxy, a SeaweedFS tier (master, two volume servers, filer with its S3
gateway) remote-mounting the origin bucket, and cachefs mounts as the nodes of a cluster."""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefs.testing.proxy import LatencyProxy
from cachefs.testing.servers import REPO, SeaweedTier, Server, free_port, seaweed_tier, weed_binary

from .mounts import cachefs, mounted, scrape

NODES = 3
OBJECTS = 200  # 16 KB - 4 MB, log-uniform: ~130 MB in all, and one object of 10 MiB


@dataclass
class Cluster:
    origin: Server
    origin_proxy: LatencyProxy  # counts what the origin serves (egress)
    tier: SeaweedTier
    tier_proxy: LatencyProxy  # between the nodes and the tier: stalls on demand

    def bucket(self, objects: dict[str, bytes]) -> str:
        """A new origin bucket holding ``objects``, remote-mounted by the tier."""
        name = f"tier-{uuid.uuid4().hex[:10]}"
        self.origin.create_bucket(name)
        self.origin.upload(name, objects)
        self.tier.mount_remote(name, self.origin, self.origin_proxy.url)
        return name

    def mount_args(self, port: int, *extra: str) -> list[str]:
        return ["--endpoint-url", self.origin_proxy.url, "--tier-endpoint-url", self.tier_proxy.url,
                "--metrics-addr", f"127.0.0.1:{port}", *extra]

    @property
    def env(self) -> dict[str, str]:
        import os

        return dict(os.environ, **self.origin.env,
                    CACHEFS_TIER_ACCESS_KEY_ID=self.tier.server.env["CACHEFS_TIER_ACCESS_KEY_ID"],
                    CACHEFS_TIER_SECRET_ACCESS_KEY=self.tier.server.env["CACHEFS_TIER_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="module")
def cluster(moto: Server) -> Iterator[Cluster]:
    with LatencyProxy(moto.address) as origin_proxy, seaweed_tier() as tier, \
            LatencyProxy(tier.server.address) as tier_proxy:
        yield Cluster(moto, origin_proxy, tier, tier_proxy)


def dataset(n: int, seed: int, lo: int = 16 << 10, hi: int = 4 << 20) -> dict[str, bytes]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        size = int(lo * (hi / lo) ** rng.random())
        out[f"train/{i:04d}.bin"] = rng.randbytes(size)
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_on_nodes(roots: list[Path], keys: list[str]) -> list[dict[str, str]]:
    """Each node (mount root) reads every key at the same time as the others, each in its own
    shuffled order: the digests each node read."""
    def epoch(node: int) -> dict[str, str]:
        order = sorted(keys)
        random.Random(node).shuffle(order)
        return {k: digest(roots[node] / k) for k in order}

    with ThreadPoolExecutor(len(roots)) as pool:
        return list(pool.map(epoch, range(len(roots))))


def fetches(port: int) -> dict[str, float]:
    m = scrape(port)
    out = {src: m[f'cachefs_block_fetch_bytes_total{{source="{src}"}}'] for src in ("tier", "origin")}
    for reason in ("missing", "stale", "timeout", "unreachable", "denied", "error", "backoff"):
        out[reason] = m[f'cachefs_tier_fallbacks_total{{reason="{reason}"}}']
    return out


def test_three_nodes_read_the_dataset_from_the_origin_once(cluster: Cluster, tmp_path: Path) -> None:
    data = dataset(OBJECTS, seed=13)
    data["large.bin"] = random.Random(1).randbytes(10 << 20)  # three blocks, fetched as ranges
    total = sum(map(len, data.values()))
    want = {k: hashlib.sha256(v).hexdigest() for k, v in data.items()}
    bucket = cluster.bucket(data)
    ports = [free_port() for _ in range(NODES)]
    before = cluster.origin_proxy.stats.bytes_down
    mounts = [mounted(f"s3://{bucket}", tmp_path / f"mnt{i}", tmp_path / f"cache{i}", cluster.env,
                      *cluster.mount_args(ports[i])) for i in range(NODES)]
    with mounts[0] as m0, mounts[1] as m1, mounts[2] as m2:
        seen = read_on_nodes([m0.path, m1.path, m2.path], list(data))
        counts = [fetches(p) for p in ports]
    egress = cluster.origin_proxy.stats.bytes_down - before
    for node in range(NODES):
        assert seen[node] == want, f"node {node} read other bytes"
    # The tier fetches each object from the origin once (SeaweedFS merges concurrent fills of
    # one object); the nodes' own origin reads are only listings and their fallbacks. 1.1x
    # leaves room for listing pages and a rare double fill of a cold object read by two nodes
    # at once (SeaweedFS #11168); without the tier the three nodes would read 3x.
    assert egress <= 1.1 * total, f"origin served {egress / total:.2f}x the dataset"
    served = sum(c["tier"] for c in counts)
    assert served >= 0.9 * NODES * total, counts  # the nodes read from the tier, not the origin
    assert all(c["stale"] == 0 for c in counts), counts


def test_an_object_changed_at_the_origin_is_never_served_stale(cluster: Cluster, tmp_path: Path) -> None:
    old = {f"f{i}.bin": bytes([i]) * 100_000 for i in range(3)}
    bucket = cluster.bucket(old)
    port = free_port()
    # metadata-ttl 0: every open re-checks the listing, which then names the new version at once
    with mounted(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", cluster.env,
                 *cluster.mount_args(port, "--metadata-ttl", "0")) as m:
        assert (m.path / "f0.bin").read_bytes() == old["f0.bin"]
        assert fetches(port)["tier"] == 100_000  # cached by the tier, served from it
        time.sleep(1.1)  # a new Last-Modified second: the only thing that tells versions apart
        new = bytes([7]) * 100_000  # same size: only Last-Modified differs
        cluster.origin.upload(bucket, {"f0.bin": new})
        assert (m.path / "f0.bin").read_bytes() == new
        after = fetches(port)
        assert after["stale"] == 1 and after["origin"] == 100_000, after
        tier = m.status()["tier"]
        assert tier["fallbacks"]["stale"] == 1 and tier["bytes_from_tier"] == 100_000
        assert tier["endpoint"] == f"{cluster.tier_proxy.url}/{bucket}"
        text = cachefs("status", str(m.path), env=m.env, check=True).stdout
        assert f"tier:       {cluster.tier_proxy.url}/{bucket}:" in text and "fallbacks: 1 stale" in text
    # Once the tier has synced its metadata, it fetches the new version and serves it.
    cluster.tier.meta_sync(bucket)
    with mounted(f"s3://{bucket}", tmp_path / "mnt2", tmp_path / "cache2", cluster.env,
                 *cluster.mount_args(port := free_port())) as m:
        assert (m.path / "f0.bin").read_bytes() == new
        after = fetches(port)
        assert after["tier"] == 100_000 and after["origin"] == 0, after


def test_a_stalled_tier_times_out_to_the_origin(cluster: Cluster, tmp_path: Path) -> None:
    data = dataset(8, seed=5, hi=256 << 10)
    bucket = cluster.bucket(data)
    port = free_port()
    with mounted(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", cluster.env,
                 *cluster.mount_args(port, "--tier-timeout", "1")) as m:
        cluster.tier_proxy.inject("stall", stall_seconds=30)
        try:
            began = time.monotonic()
            for key, value in data.items():
                assert (m.path / key).read_bytes() == value
            elapsed = time.monotonic() - began
        finally:
            cluster.tier_proxy.clear()
        after = fetches(port)
    # One read waits out the timeout; the tier is then skipped (backoff) instead of stalling
    # every read for a second.
    assert after["timeout"] == 1 and after["backoff"] == len(data) - 1, after
    assert after["origin"] == sum(map(len, data.values())) and elapsed < 10


def test_a_tier_refusing_the_keys_is_skipped(cluster: Cluster, tmp_path: Path) -> None:
    data = dataset(6, seed=3, hi=64 << 10)
    bucket = cluster.bucket(data)
    port = free_port()
    env = dict(cluster.env, CACHEFS_TIER_SECRET_ACCESS_KEY="not-the-tier-secret")
    with mounted(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", env, *cluster.mount_args(port)) as m:
        for key, value in data.items():
            assert (m.path / key).read_bytes() == value
        after = fetches(port)
    assert after["denied"] == 1 and after["backoff"] == len(data) - 1, after
    log = (tmp_path / "cache" / "cachefs.log").read_text()
    assert log.count("access denied") == 1 and "not-the-tier-secret" not in log


def test_the_sync_job_mounts_the_bucket_and_brings_changes(cluster: Cluster, tmp_path: Path) -> None:
    """k8s/tier/remote-sync.sh (the CronJob's script) against the tier: the first run mounts the
    bucket; an object changed at the origin is read from the origin ("stale") until the next run
    brings its new version into the tier. (An object created at the origin needs no run: the
    tier looks up a name it does not know in the bucket.)"""
    import os
    import subprocess

    name = f"tier-{uuid.uuid4().hex[:10]}"
    cluster.origin.create_bucket(name)
    cluster.origin.upload(name, {"a.bin": b"a" * 1000})
    env = dict(os.environ, **cluster.origin.env, BUCKET=name, REMOTE_ENDPOINT=cluster.origin_proxy.url,
               REMOTE_REGION="us-east-1", MASTER=cluster.tier.master, FILER=cluster.tier.filer,
               PATH=f"{Path(weed_binary()).parent}:{os.environ['PATH']}")

    def sync() -> str:
        res = subprocess.run(["sh", str(REPO / "k8s" / "tier" / "remote-sync.sh")], env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert cluster.origin.env["AWS_SECRET_ACCESS_KEY"] not in res.stdout + res.stderr
        return res.stdout

    assert "(create) 1 objects" in sync()
    port = free_port()
    with mounted(f"s3://{name}", tmp_path / "mnt", tmp_path / "cache", cluster.env,
                 *cluster.mount_args(port, "--metadata-ttl", "0")) as m:
        assert (m.path / "a.bin").read_bytes() == b"a" * 1000
        cluster.origin.upload(name, {"b.bin": b"b" * 1000})
        assert (m.path / "b.bin").read_bytes() == b"b" * 1000
        time.sleep(1.1)  # a new Last-Modified second
        cluster.origin.upload(name, {"a.bin": b"A" * 2000})
        assert (m.path / "a.bin").read_bytes() == b"A" * 2000
        after = fetches(port)
    assert after["tier"] == 2000 and after["origin"] == 2000 and after["stale"] == 1, after
    assert "(update) 1 objects" in sync()
    with mounted(f"s3://{name}", tmp_path / "mnt2", tmp_path / "cache2", cluster.env,
                 *cluster.mount_args(port := free_port())) as m:
        assert (m.path / "a.bin").read_bytes() == b"A" * 2000
        after = fetches(port)
    assert after["tier"] == 2000 and after["origin"] == 0, after


def test_a_lost_volume_server_costs_origin_reads_until_uncache(cluster: Cluster, tmp_path: Path) -> None:
    """A volume server of the tier is lost with the objects it held: the tier does not answer
    for them (SeaweedFS 4.48 waits on the lost volume), cachefs reads them from the origin after
    --tier-timeout; remote.uncache makes the tier fetch them again. Stops a volume server."""
    data = dataset(20, seed=11, hi=256 << 10)
    total = sum(map(len, data.values()))
    bucket = cluster.bucket(data)

    def epoch(name: str) -> dict[str, float]:
        port = free_port()
        with mounted(f"s3://{bucket}", tmp_path / f"mnt-{name}", tmp_path / f"cache-{name}", cluster.env,
                     *cluster.mount_args(port, "--tier-timeout", "1")) as m:
            for key, value in data.items():
                assert (m.path / key).read_bytes() == value, key
            return fetches(port)

    assert epoch("fill")["tier"] == total
    cluster.tier.stop_volume(0)
    lost = epoch("lost")
    assert lost["timeout"] >= 1 and lost["origin"] > 0, lost
    cluster.tier.shell(f"remote.uncache -dir=/buckets/{bucket}\n")
    again = epoch("uncached")
    assert again["tier"] == total and again["origin"] == 0, again


def test_the_tier_stopped_mid_read_falls_back_to_the_origin(cluster: Cluster, tmp_path: Path) -> None:
    """Last in this module: it stops the tier's gateway."""
    data = dataset(60, seed=7, hi=1 << 20)
    bucket = cluster.bucket(data)
    keys = sorted(data)
    port = free_port()
    third = len(keys) // 3
    stopped = threading.Event()
    started = threading.Event()
    read: list[tuple[str, bool]] = []  # (key, read after the tier was gone)
    errors: list[BaseException] = []
    with mounted(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", cluster.env,
                 *cluster.mount_args(port)) as m:
        def reader() -> None:
            try:
                for i, key in enumerate(keys):
                    if i == third:
                        started.set()
                    if i == 2 * third:
                        stopped.wait(60)  # the last third is read with the tier gone for sure
                    assert (m.path / key).read_bytes() == data[key], key
                    read.append((key, stopped.is_set()))
            except BaseException as exc:
                errors.append(exc)
                started.set()

        t = threading.Thread(target=reader)
        t.start()
        assert started.wait(120)
        cluster.tier.stop_gateway()  # while the reader goes on
        stopped.set()
        t.join(120)
        after = fetches(port)
    assert not errors, errors
    assert [k for k, _ in read] == keys
    assert sum(gone for _, gone in read) >= third
    assert after["tier"] > 0 and after["origin"] > 0
    assert after["unreachable"] + after["error"] + after["timeout"] >= 1, after
