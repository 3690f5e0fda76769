"""IBM COS with an IAM API key, through real mounts: a loopback token endpoint issues tokens
that live two seconds, and a proxy in front of moto refuses every request (list, HEAD, GET, PUT)
that does not carry a currently valid one. Reads, a prefetch, listings and a write span several
token lifetimes, on both GET paths (obstore and boto3)."""

from __future__ import annotations

import http.client
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefs.backends import s3_rest
from cachefs.testing.iam import IamServer
from cachefs.testing.proxy import LatencyProxy
from cachefs.testing.servers import Server

from .mounts import cachefs, fuse_mounts, mounted

pytestmark = pytest.mark.timeout(300)

TTL = 2.0  # seconds a token lives
BLOCK = 4 << 20


@dataclass
class IamStore:
    bucket: str
    server: Server
    iam: IamServer
    proxy: LatencyProxy  # the store as cachefs sees it: refuses requests without a valid token
    api_key: str

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IBM_", "CACHEFS_"))}
        env.update(IBM_API_KEY_ID=self.api_key, IBM_SERVICE_INSTANCE_ID="crn:v1:test:instance",
                   IBM_AUTH_ENDPOINT=self.iam.url, AWS_EC2_METADATA_DISABLED="true")
        env.update(extra)
        return env

    @property
    def args(self) -> list[str]:
        return ["--endpoint-url", self.proxy.url]


@pytest.fixture
def store(moto: Server) -> Iterator[IamStore]:
    name = f"iam-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    with IamServer(f"key-{uuid.uuid4().hex}", ttl=TTL) as iam, LatencyProxy(moto.address, 0.02) as proxy:
        proxy.authorize = iam.authorize
        yield IamStore(name, moto, iam, proxy, iam.api_key)


def raw_status(proxy: LatencyProxy, path: str, token: str | None) -> int:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize("data_path", ["obstore", "boto3"])
def test_reads_prefetch_and_writes_across_token_expiries(store: IamStore, tmp_path: Path, data_path: str) -> None:
    small = {f"s/{i:02d}.bin": os.urandom(2000 + i) for i in range(10)}
    many = {f"p/{i:02d}.bin": os.urandom(5000 + i) for i in range(40)}
    big = os.urandom(6 * BLOCK)
    store.server.upload(store.bucket, {**small, **many, "big.bin": big})
    env = store.env(CACHEFS_S3_DATA_PATH=data_path)
    heads: list[bytes] = []
    authorize = store.proxy.authorize
    assert authorize is not None
    store.proxy.authorize = lambda head: heads.append(head) is None and authorize(head)
    started = time.monotonic()
    with mounted(f"cos://{store.bucket}", tmp_path / "mnt", tmp_path / "cache", env, *store.args,
                 "--read-write", "--metadata-ttl", "1", "--prefetch-concurrency", "2") as m:
        for key, data in small.items():
            assert (m.path / key).read_bytes() == data
        # A prefetch of 40 files, two at a time over a 40 ms round trip (about a token's life).
        res = cachefs("prefetch", str(m.path), "p", "--wait", env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        for key, data in many.items():
            assert (m.path / key).read_bytes() == data  # from the cache now
        # One long read: the blocks of a large file, out of order, one every 0.7 s.
        order = list(range(6))
        random.Random(1).shuffle(order)
        with open(m.path / "big.bin", "rb") as f:
            for block in order:
                assert os.pread(f.fileno(), BLOCK, block * BLOCK) == big[block * BLOCK:(block + 1) * BLOCK]
                time.sleep(0.7)
        elapsed = time.monotonic() - started
        # Listings and a write (PUT) with the token of the moment.
        assert sorted(os.listdir(m.path / "s")) == sorted(k.split("/")[1] for k in small)
        (m.path / "out.bin").write_bytes(b"written with a bearer token")
        assert store.server.get(store.bucket, "out.bin") == b"written with a bearer token"
    assert str(tmp_path / "mnt") not in fuse_mounts()
    assert store.iam.denied == [] and store.proxy.stats.denied == 0
    # Listings after the mount's bucket check are sent by s3_rest, with the bearer token too.
    listings = [h for h in heads if b"list-type=2" in h.split(b"\r\n")[0]]
    assert len(listings) >= 3
    assert all(b"User-Agent: " + s3_rest.USER_AGENT.encode() in h for h in listings[1:])
    tokens_used = [t for t, n in store.iam.used.items() if n]
    print(f"\n{data_path}: reads for {elapsed:.1f} s, {store.iam.grants} tokens issued, {len(tokens_used)} used, "
          f"{sum(store.iam.used.values())} requests authorised")
    assert elapsed > 3 * TTL and len(tokens_used) >= 4, "tokens were not refreshed while the mount ran"
    # The proxy refuses what it should: no token, an expired one (the first), an unknown one.
    first = next(iter(store.iam.issued))
    assert raw_status(store.proxy, f"/{store.bucket}/big.bin", None) == 403
    assert raw_status(store.proxy, f"/{store.bucket}/big.bin", first) == 403
    assert raw_status(store.proxy, f"/{store.bucket}/big.bin", "iam-made-up") == 403
    fresh, _ = store.iam.issue()
    assert raw_status(store.proxy, f"/{store.bucket}/big.bin", fresh) == 200


def test_a_token_the_store_refuses_is_replaced(store: IamStore, tmp_path: Path) -> None:
    """A token revoked before it expires: the store's refusal makes cachefs exchange the key
    again and send the request once more; the reader sees nothing."""
    files = {f"r/{i}.bin": os.urandom(3000 + i) for i in range(4)}
    store.server.upload(store.bucket, files)
    store.iam.ttl = 3600
    for data_path in ("obstore", "boto3"):
        cache = tmp_path / f"cache-{data_path}"
        with mounted(f"cos://{store.bucket}", tmp_path / "mnt", cache, store.env(CACHEFS_S3_DATA_PATH=data_path),
                     *store.args) as m:
            assert (m.path / "r/0.bin").read_bytes() == files["r/0.bin"]
            grants = store.iam.grants
            store.iam.revoke()
            for key in ("r/1.bin", "r/2.bin"):
                assert (m.path / key).read_bytes() == files[key]
            assert store.iam.grants == grants + 1  # one exchange, not one per request
        assert store.iam.denied == ["unknown"]  # the one refusal, then the new token
        store.iam.denied.clear()


def test_api_key_from_a_file_and_from_a_credentials_file(store: IamStore, tmp_path: Path) -> None:
    store.server.upload(store.bucket, {"a.txt": b"key from a file\n"})
    key_file = tmp_path / "apikey"
    key_file.write_text(store.api_key + "\n")
    env = store.env(IBM_API_KEY_ID_FILE=str(key_file))
    del env["IBM_API_KEY_ID"]
    with mounted(f"cos://{store.bucket}", tmp_path / "mnt", tmp_path / "cache", env, *store.args) as m:
        assert (m.path / "a.txt").read_bytes() == b"key from a file\n"
    creds = tmp_path / "creds.env"
    creds.write_text(f"IBM_API_KEY_ID={store.api_key}\nIBM_AUTH_ENDPOINT={store.iam.url}\n")
    creds.chmod(0o600)
    env = {k: v for k, v in store.env().items() if not k.startswith("IBM_")}
    with mounted(f"cos://{store.bucket}", tmp_path / "mnt", tmp_path / "cache", env, *store.args,
                 "--credentials", str(creds)) as m:
        assert (m.path / "a.txt").read_bytes() == b"key from a file\n"
    assert store.iam.denied == []


def test_wrong_api_key_is_exit_code_3_and_one_line(store: IamStore, tmp_path: Path) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = cachefs("mount", f"cos://{store.bucket}", str(mnt), *store.args, "--cache-dir", str(tmp_path / "cache"),
                  env=store.env(IBM_API_KEY_ID=wrong), timeout=60)
    assert res.returncode == 3, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("cachefs: "), res.stderr
    assert "refused the API key" in res.stderr and "BXNIM0415E" in res.stderr
    assert wrong not in res.stderr + res.stdout
    assert str(mnt) not in fuse_mounts()
    assert store.iam.refused_keys == 1 and store.proxy.stats.requests == 0  # nothing unauthorised sent
    assert wrong not in (tmp_path / "cache" / "cachefs.log").read_text()
    # An unreachable token endpoint: exit code 3 too, and says which endpoint.
    res = cachefs("mount", f"cos://{store.bucket}", str(mnt), *store.args, "--cache-dir", str(tmp_path / "cache"),
                  env=store.env(IBM_AUTH_ENDPOINT="http://127.0.0.1:9/identity/token"), timeout=60)
    assert res.returncode == 3 and res.stderr.count("\n") == 1, res.stderr
    assert "IBM IAM token endpoint http://127.0.0.1:9/identity/token" in res.stderr
