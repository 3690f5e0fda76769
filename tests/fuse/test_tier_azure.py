"""The cluster-shared cache tier (--tier-endpoint-url) in front of an Azure origin, with real
processes: Azurite over HTTPS (SeaweedFS sends an account key over https:// only) behind a
counting TCP relay, a SeaweedFS tier that trusts Azurite's test CA and remote-mounts the
container (``remote.configure -type=azure -azure.endpoint=...``), and cachefs mounts of the
az:// source as the nodes of a cluster."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefs.testing.proxy import LatencyProxy
from cachefs.testing.servers import (
    AZURITE_ACCOUNT,
    REPO,
    SeaweedTier,
    Server,
    azurite_server,
    free_port,
    seaweed_tier,
    weed_binary,
)

from .mounts import Mount, mounted
from .test_tier import dataset, fetches, read_on_nodes

NODES = 3
OBJECTS = 60  # 16 KB - 1 MB, log-uniform (~17 MB), and one object of 10 MiB (three blocks)


@dataclass
class AzureCluster:
    origin: Server  # Azurite over HTTPS
    origin_proxy: LatencyProxy  # a TCP relay (TLS passes through) counting what the origin serves
    tier: SeaweedTier

    @property
    def origin_url(self) -> str:
        """The origin's blob service URL through the relay (the certificate names 127.0.0.1)."""
        return self.origin.endpoint_via(f"https://{self.origin_proxy.address}")

    def container(self, objects: dict[str, bytes]) -> str:
        """A new origin container holding ``objects``, remote-mounted by the tier."""
        name = f"tier-{uuid.uuid4().hex[:10]}"
        self.origin.create_bucket(name)
        self.origin.upload(name, objects)
        self.tier.mount_remote(name, self.origin, self.origin_url)
        return name

    def mount(self, name: str, tmp_path: Path, node: str, port: int,
              *extra: str) -> contextlib.AbstractContextManager[Mount]:
        """A node: a mount of the container, blocks from the tier, metrics on ``port``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "CACHEFS_AZURE_"))}
        env.update(self.origin.env_via(f"https://{self.origin_proxy.address}"),
                   CACHEFS_TIER_ACCESS_KEY_ID=self.tier.server.env["CACHEFS_TIER_ACCESS_KEY_ID"],
                   CACHEFS_TIER_SECRET_ACCESS_KEY=self.tier.server.env["CACHEFS_TIER_SECRET_ACCESS_KEY"])
        return mounted(f"az://{name}", tmp_path / f"mnt-{node}", tmp_path / f"cache-{node}", env,
                       "--account", AZURITE_ACCOUNT, "--endpoint-url", self.origin_url,
                       "--tier-endpoint-url", self.tier.endpoint_url, "--metrics-addr", f"127.0.0.1:{port}",
                       *extra)


@pytest.fixture(scope="module")
def cluster() -> Iterator[AzureCluster]:
    with azurite_server(https=True) as origin, LatencyProxy(origin.address, http=False) as proxy:
        assert origin.ca_file is not None
        with seaweed_tier(trust=origin.ca_file) as tier:
            yield AzureCluster(origin, proxy, tier)


def test_three_nodes_read_an_azure_container_from_the_origin_once(cluster: AzureCluster, tmp_path: Path) -> None:
    data = dataset(OBJECTS, seed=17, hi=1 << 20)
    data["large.bin"] = random.Random(2).randbytes(10 << 20)
    total = sum(map(len, data.values()))
    want = {k: hashlib.sha256(v).hexdigest() for k, v in data.items()}
    name = cluster.container(data)

    # What the tier keeps of a blob it has not fetched yet: size and Last-Modified (to the
    # second) as the origin lists them; not the ETag (empty until cached, then its own).
    s3 = cluster.tier.server.s3_client()
    listed = {b.name: b for b in cluster.origin.blob_service().get_container_client(name).list_blobs()}
    for key in ("large.bin", "train/0000.bin"):
        head = s3.head_object(Bucket=name, Key=key)
        assert head["ContentLength"] == listed[key].size
        assert head["LastModified"] == listed[key].last_modified.replace(microsecond=0)
        assert head["ETag"].strip('"') != listed[key].etag.strip('"')

    ports = [free_port() for _ in range(NODES)]
    before = cluster.origin_proxy.stats.bytes_down
    with cluster.mount(name, tmp_path, "0", ports[0]) as m0, cluster.mount(name, tmp_path, "1", ports[1]) as m1, \
            cluster.mount(name, tmp_path, "2", ports[2]) as m2:
        seen = read_on_nodes([m0.path, m1.path, m2.path], list(data))
        counts = [fetches(p) for p in ports]
    egress = cluster.origin_proxy.stats.bytes_down - before
    for node in range(NODES):
        assert seen[node] == want, f"node {node} read other bytes"
    # Each blob crosses from the origin once (TLS records and listings add ~1 %); without the
    # tier the three nodes would read 3x.
    assert egress <= 1.1 * total, f"origin served {egress / total:.2f}x the dataset"
    # Every block validated against the Azure listing (size, Last-Modified) and served by the tier.
    assert sum(c["tier"] for c in counts) >= 0.9 * NODES * total, counts
    assert all(c["stale"] == 0 and c["missing"] == 0 and c["error"] == 0 for c in counts), counts


def test_a_changed_blob_is_never_served_stale_and_the_sync_job_brings_it(cluster: AzureCluster,
                                                                         tmp_path: Path) -> None:
    """k8s/tier/remote-sync.sh with REMOTE_TYPE=azure (the CronJob's script) mounts the container
    in the tier; a blob overwritten at the origin (same size, a later second) is read from the
    origin ("stale") until the next run brings its new version into the tier."""
    name = f"tier-{uuid.uuid4().hex[:10]}"
    old = {f"f{i}.bin": bytes([i]) * 100_000 for i in range(3)}
    cluster.origin.create_bucket(name)
    cluster.origin.upload(name, old)
    account, key = cluster.origin.azure_account
    env = dict(cluster.tier.env, REMOTE_TYPE="azure", BUCKET=name, REMOTE_ENDPOINT=cluster.origin_url,
               AZURE_STORAGE_ACCOUNT=account, AZURE_STORAGE_ACCESS_KEY=key,
               MASTER=cluster.tier.master, FILER=cluster.tier.filer,
               PATH=f"{Path(weed_binary()).parent}:{os.environ['PATH']}")

    def sync() -> str:
        res = subprocess.run(["sh", str(REPO / "k8s" / "tier" / "remote-sync.sh")], env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert key not in res.stdout + res.stderr
        return res.stdout

    out = sync()
    assert f"origin (azure) -> {cluster.origin_url}" in out and "(create) 3 objects" in out, out
    # metadata-ttl 0: every open re-checks the listing, which then names the new version at once
    with cluster.mount(name, tmp_path, "a", port := free_port(), "--metadata-ttl", "0") as m:
        assert (m.path / "f0.bin").read_bytes() == old["f0.bin"]
        assert fetches(port)["tier"] == 100_000  # the tier fetched it from Azure and served it
        time.sleep(1.1)  # a new Last-Modified second: the only thing that tells versions apart
        new = bytes([7]) * 100_000  # same size: only Last-Modified differs
        cluster.origin.upload(name, {"f0.bin": new})
        assert (m.path / "f0.bin").read_bytes() == new
        after = fetches(port)
        assert after["stale"] == 1 and after["origin"] == 100_000, after
    assert "(update) 1 objects" in sync()
    with cluster.mount(name, tmp_path, "b", port := free_port()) as m:
        assert (m.path / "f0.bin").read_bytes() == new
        after = fetches(port)
        assert after["tier"] == 100_000 and after["origin"] == 0, after
