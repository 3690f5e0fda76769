"""Announced read orders through real mounts (issue 10): the daemon fetches a job's own order
ahead of its reader, lists what it needs on the way, keeps what is read soonest, and each node
fetches only what its ranks read.

The kernel's page cache would answer repeated reads without asking the daemon, so each file's
pages are dropped after reading (POSIX_FADV_DONTNEED), as for a dataset larger than RAM.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import time
from pathlib import Path

import pytest

from cachefs import client

from .mounts import Mount, cachefs, mounted
from .stores import Bucket

pytestmark = pytest.mark.timeout(300)


def read_dropping_pages(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = b""
        while chunk := os.read(fd, 1 << 20):
            data += chunk
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return data
    finally:
        os.close(fd)


def wait_for(cond, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def order_reads(m: Mount) -> tuple[float, float]:
    """(reads of announced files whose data was already cached, reads that waited)."""
    from .mounts import scrape

    port = int(m.args[m.args.index("--metrics-addr") + 1].rsplit(":", 1)[1])
    metrics = scrape(port)
    return (metrics['cachefs_order_reads_total{outcome="ahead"}'],
            metrics['cachefs_order_reads_total{outcome="waited"}'])


def belady_misses(seq: list[str], capacity: int) -> int:
    """Misses of the offline optimum (evict the item read latest, or never; an item read later
    than everything cached is not admitted) for equal-sized items, ``capacity`` of them."""
    nxt = [0.0] * len(seq)
    later: dict[str, float] = {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = later.get(seq[i], float("inf"))
        later[seq[i]] = i
    cached: dict[str, float] = {}
    heap: list[tuple[float, str]] = []
    misses = 0
    for i, x in enumerate(seq):
        if x not in cached:
            misses += 1
            if len(cached) >= capacity:
                while -heap[0][0] != cached.get(heap[0][1]):
                    heapq.heappop(heap)  # stale entry
                if -heap[0][0] <= nxt[i]:
                    continue  # read later than everything cached: bypass
                del cached[heapq.heappop(heap)[1]]
        cached[x] = nxt[i]
        heapq.heappush(heap, (-nxt[i], x))
    return misses


def test_announced_order_is_fetched_ahead_listing_unlisted_dirs(s3_bucket: Bucket, tmp_path: Path) -> None:
    from cachefs.testing.servers import free_port

    data = {f"train/c{i % 12:02d}/img{i:04d}.jpg": os.urandom(3000 + i) for i in range(300)}
    s3_bucket.put_many(data)
    order = list(data)
    random.Random(1).shuffle(order)
    port = free_port()
    with mounted(s3_bucket.source, tmp_path / "mnt", tmp_path / "cache", s3_bucket.mount_env,
                 *s3_bucket.mount_args, "--metrics-addr", f"127.0.0.1:{port}") as m:
        # Announced before anything below train/ was listed (absolute paths under the mount).
        reply = client.announce(m.path, [str(m.path / k) for k in order] + ["train/c00/nothing.jpg"])
        assert reply["items"] == [len(order) + 1]
        wait_for(lambda: client.status(m.path)["orders"]["default"]["state"] == "caught up")
        st = client.status(m.path)["orders"]["default"]
        assert st["missing"] == 1 and st["resolved"] == len(order) + 1 and st["position"] == 0
        assert st["lead"] == len(order) + 1  # everything fits: all fetched ahead of the reader
        gets = m.gets()
        assert gets == len(order)  # each once
        for n, key in enumerate(order):
            assert read_dropping_pages(m.path / key) == data[key]
            if n == 99:
                st = client.status(m.path)["orders"]["default"]
                assert st["position"] == 100
        assert m.gets() == gets
        ahead, waited = order_reads(m)
        assert (ahead, waited) == (len(order), 0)
        text = cachefs("status", str(m.path), env=m.env, check=True).stdout
        assert f"order:      default: at {len(order)}/{len(order) + 1} of epoch" in text


def run_epochs(bucket: Bucket, tmp: Path, name: str, epochs: list[list[str]], data: dict[str, bytes],
               capacity: int, announce: bool) -> tuple[float, float]:
    """Read the epochs through a fresh mount; returns (backend GETs, reads that did not wait
    for the backend) from epoch 2 on, as ratios of its reads."""
    from cachefs.testing.servers import free_port

    port = free_port()
    with mounted(bucket.source, tmp / name / "mnt", tmp / name / "cache", bucket.mount_env,
                 *bucket.mount_args, "--cache-size", str(capacity), "--metrics-addr", f"127.0.0.1:{port}",
                 "--prefetch-concurrency", "8") as m:
        for e, keys in enumerate(epochs):
            if announce:
                client.announce(m.path, *epochs[e:e + 2])
            if e == 1:
                hits_before = order_reads(m)[0] if announce else m.status()["reads"]["hits"]
            for key in keys:
                assert read_dropping_pages(m.path / key) == data[key]
        if announce:
            wait_for(lambda: client.status(m.path)["orders"]["default"]["state"] == "caught up")
            hits = order_reads(m)[0] - hits_before
        else:
            hits = m.status()["reads"]["hits"] - hits_before
        gets = m.gets()
    n = len(epochs[0])
    later = n * (len(epochs) - 1)
    return 1 - (gets - n) / later, hits / later


def test_eviction_from_the_known_future(s3_bucket: Bucket, tmp_path: Path) -> None:
    files, size = 240, 8_000
    data = {f"d/f{i:04d}": os.urandom(size) for i in range(files)}
    s3_bucket.put_many(data)
    capacity = files * size * 2 // 3  # the dataset is 1.5x the cache
    rng = random.Random(7)
    epochs = []
    for _ in range(3):
        keys = sorted(data)
        rng.shuffle(keys)
        epochs.append(keys)
    seq = [k for e in epochs for k in e]
    optimum = 1 - (belady_misses(seq, capacity // size) - files) / (files * 2)

    hit_ratio, not_waited = run_epochs(s3_bucket, tmp_path, "order", epochs, data, capacity, announce=True)
    stable_hit_ratio, stable_not_waited = run_epochs(s3_bucket, tmp_path, "stable", epochs, data, capacity,
                                                     announce=False)
    print(f"optimum {optimum:.3f}; announced: hit ratio {hit_ratio:.3f}, reads not waiting {not_waited:.3f}; "
          f"stable: hit ratio {stable_hit_ratio:.3f}, reads not waiting {stable_not_waited:.3f}")
    assert hit_ratio >= 0.95 * optimum
    # Each shuffled epoch can hit at most what the cache held when it began (capacity / dataset,
    # which stable already reaches); the known future lets the daemon fetch the rest ahead.
    assert not_waited >= 0.95 and not_waited > stable_not_waited + 0.2


class FakeDistributedSampler:
    """PyTorch's DistributedSampler protocol without torch: a seeded shuffle per epoch, padded
    to a multiple of the world size, every world-th index from the rank on."""

    def __init__(self, n: int, rank: int, world: int, seed: int = 0) -> None:
        self.n, self.rank, self.world, self.seed, self.epoch = n, rank, world, seed, 0
        self.total = -(-n // world) * world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        indices = list(range(self.n))
        random.Random(self.seed + self.epoch).shuffle(indices)
        indices += indices[:self.total - self.n]
        return iter(indices[self.rank:self.total:self.world])

    def __len__(self) -> int:
        return self.total // self.world


class FakeRandomSampler:
    """RandomSampler's protocol: a new order at every iteration, no set_epoch, no seed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(random.sample(range(self.n), self.n))

    def __len__(self) -> int:
        return self.n


def test_four_nodes_each_fetch_their_ranks_share(s3_bucket: Bucket, tmp_path: Path) -> None:
    """Four mounts on four cache dirs (four nodes), each told its rank's DistributedSampler order
    by the sampler wrapper: epoch 1 costs each object about one GET in all. Then bulk prefetch
    with --shard RANK/4 on each node: every object once, none twice."""
    world = 4
    data = {f"train/c{i % 5}/f{i:04d}": os.urandom(2000) for i in range(203)}
    val = {f"val/v{i:03d}": os.urandom(1000) for i in range(60)}
    s3_bucket.put_many(data | val)
    paths = sorted(data)
    with contextlib.ExitStack() as stack:
        mounts = [stack.enter_context(mounted(s3_bucket.source, tmp_path / f"mnt{r}", tmp_path / f"cache{r}",
                                              s3_bucket.mount_env, *s3_bucket.mount_args)) for r in range(world)]
        # Epoch 1 only (the next epoch's order would be fetched ahead as well, and counted).
        samplers = [client.OrderedSampler(FakeDistributedSampler(len(paths), r, world, seed=3),
                                          [m.path / p for p in paths], m.path, announce_next=False)
                    for r, m in enumerate(mounts)]
        for r, (m, sampler) in enumerate(zip(mounts, samplers, strict=True)):
            sampler.set_epoch(0)
            assert sampler.stream == f"rank{r}" and len(sampler) == 51
            for i in sampler:  # as a DataLoader's workers would read them
                assert read_dropping_pages(m.path / paths[i]) == data[paths[i]]
            st = client.status(m.path)["orders"][f"rank{r}"]
            assert (st["epochs_announced"], st["position"]) == (1, 51)
        gets = [m.gets() for m in mounts]
        assert sum(gets) <= 1.05 * len(paths), gets  # 203 objects, 204 reads (one padded)

        for r, m in enumerate(mounts):
            cachefs("prefetch", str(m.path), "val", "--shard", f"{r}/{world}", "--wait", env=m.env, check=True)
        val_gets = [m.gets() - g for m, g in zip(mounts, gets, strict=True)]
        assert sum(val_gets) == len(val) and max(val_gets) < len(val)
        res = cachefs("prefetch", str(mounts[0].path), "--shard", "4/4", env=mounts[0].env)
        assert res.returncode == 2 and "RANK/WORLD" in res.stderr


def test_sampler_wrapper_announces_what_it_yields(s3_bucket: Bucket, tmp_path: Path) -> None:
    data = {f"s/f{i:03d}": os.urandom(500) for i in range(40)}
    s3_bucket.put_many(data | {"t/other": b"other"})
    paths = sorted(data)
    with mounted(s3_bucket.source, tmp_path / "mnt", tmp_path / "cache", s3_bucket.mount_env,
                 *s3_bucket.mount_args) as m:
        sampler = client.OrderedSampler(FakeRandomSampler(len(paths)), paths, m.path)
        assert not sampler.deterministic and len(sampler) == len(paths)
        order = list(sampler)
        assert sorted(order) == list(range(len(paths)))
        st = client.status(m.path)["orders"]["default"]
        assert st["epochs_announced"] == 1 and st["epoch_items"] == len(paths)
        for i in order[:10]:
            read_dropping_pages(m.path / paths[i])
        wait_for(lambda: client.status(m.path)["orders"]["default"]["position"] == 10)
        # Reads of files the order does not name leave the position alone.
        assert read_dropping_pages(m.path / "t" / "other") == b"other"
        assert client.status(m.path)["orders"]["default"]["position"] == 10
        client.forget(m.path)
        assert client.status(m.path)["orders"] == {}
        # A seeded sampler: the next epoch is announced too, and its start fetched ahead.
        seeded = client.OrderedSampler(FakeDistributedSampler(len(paths), 1, 2, seed=5), paths, m.path)
        assert seeded.deterministic and seeded.stream == "rank1"
        seeded.set_epoch(0)
        epoch0 = list(seeded)
        assert client.status(m.path)["orders"]["rank1"]["epochs_announced"] == 2
        for i in epoch0:
            read_dropping_pages(m.path / paths[i])
        seeded.set_epoch(1)
        epoch1 = list(seeded)
        reference = FakeDistributedSampler(len(paths), 1, 2, seed=5)
        reference.set_epoch(1)
        assert epoch1 == list(reference) != epoch0
        wait_for(lambda: client.status(m.path)["orders"]["rank1"]["state"] == "caught up")
        before = m.gets()
        for i in epoch1:
            read_dropping_pages(m.path / paths[i])
        assert m.gets() == before
        # Bad input: one clear error, the daemon goes on.
        from cachefs import control
        from cachefs.errors import CachefsError

        for bad in ({"cmd": "order", "orders": "s/f000"}, {"cmd": "order", "orders": [[1, 2]]},
                    {"cmd": "order", "stream": "x" * 201, "orders": [["s/f000"]]}):
            with pytest.raises(CachefsError):
                control.request(str(m.path), bad)
        reply = client.announce(m.path, ["s/\ud800", "s/f001", "../s/f002", ""], stream="odd")
        assert reply["items"] == [4]
        wait_for(lambda: client.status(m.path)["orders"]["odd"]["resolved"] == 4)
        assert client.status(m.path)["orders"]["odd"]["missing"] == 3
        client.forget(m.path, "odd")
        listing = tmp_path / "list.txt"
        listing.write_text("s/f000\n")
        res = cachefs("prefetch", str(m.path), "--from-list", str(listing), "--shard", "0/2", env=m.env)
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1
        # Not a cachefs mount: training goes on, the wrapper only logs.
        lost = client.OrderedSampler(FakeRandomSampler(3), ["a", "b", "c"], tmp_path)
        assert sorted(lost) == [0, 1, 2]
        with pytest.raises(ValueError):
            client.announce(m.path, ["/elsewhere/x"])
