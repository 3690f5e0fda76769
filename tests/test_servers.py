"""The real servers and the fault proxy that every other test stands on.

Each server takes a put, a paginated list and a get through its own SDK; servers leave nothing
behind (process, port, temporary directory), even when the process that started them is killed.
The proxy adds the configured latency without serializing a stream's chunks, and each fault kind
reaches a client whose retries are off as the error a real store would cause.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from cachefs.testing import servers
from cachefs.testing.proxy import LatencyProxy
from cachefs.testing.servers import Server, ServerError, moto_server

pytestmark = pytest.mark.timeout(120)

N_OBJECTS = 1500  # more than one page of a listing (S3: 1000 keys)


def _objects(n: int) -> dict[str, bytes]:
    return {f"d{i % 7}/obj-{i:05d}": hashlib.sha256(str(i).encode()).digest() * (1 + i % 5) for i in range(n)}


def _bucket(server: Server, prefix: str = "t") -> str:
    name = f"{prefix}-{os.urandom(6).hex()}"
    server.create_bucket(name)
    return name


def test_s3_server_put_list_get(s3_server: Server) -> None:
    bucket = _bucket(s3_server)
    objects = _objects(N_OBJECTS)
    s3_server.upload(bucket, objects)
    client = s3_server.s3_client()
    pages = list(client.get_paginator("list_objects_v2").paginate(Bucket=bucket))
    assert len(pages) >= 2  # pagination with continuation tokens works
    listed = {o["Key"]: o for page in pages for o in page.get("Contents", ())}
    assert sorted(listed) == sorted(objects)
    assert all(listed[k]["Size"] == len(v) for k, v in objects.items())
    # A single PUT's ETag is the quoted MD5 of the content, on both servers.
    key = "d3/obj-00003"
    assert listed[key]["ETag"] == f'"{hashlib.md5(objects[key]).hexdigest()}"'
    got = client.get_object(Bucket=bucket, Key=key)
    assert got["Body"].read() == objects[key] and got["ETag"] == listed[key]["ETag"]
    ranged = client.get_object(Bucket=bucket, Key=key, Range="bytes=5-9")["Body"].read()
    assert ranged == objects[key][5:10]
    top = client.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == [f"d{i}/" for i in range(7)]
    with pytest.raises(ClientError) as info:
        client.head_object(Bucket=bucket, Key="missing")
    assert info.value.response["Error"]["Code"] == "404"


def test_azurite_put_list_get(azurite: Server) -> None:
    container = _bucket(azurite)
    objects = _objects(N_OBJECTS)
    azurite.upload(container, objects)
    client = azurite.blob_service().get_container_client(container)
    pages = list(client.list_blobs(results_per_page=1000).by_page())
    assert len(pages) >= 2
    listed = {b.name: b for page in pages for b in page}
    assert sorted(listed) == sorted(objects)
    key = "d3/obj-00003"
    assert listed[key].size == len(objects[key])
    assert client.download_blob(key).readall() == objects[key]
    assert client.download_blob(key, offset=5, length=5).readall() == objects[key][5:10]
    top = [item.name for item in client.walk_blobs(delimiter="/")]
    assert top == [f"d{i}/" for i in range(7)]
    assert azurite.list_keys(container, "d0/") == sorted(k for k in objects if k.startswith("d0/"))


def test_server_leaves_nothing_behind() -> None:
    with moto_server() as server:
        workdir, port = server.workdir, server.address[1]
        assert server.process is not None
        pgid = server.process.pid
        assert Path(workdir, "server.log").exists()
    assert not Path(workdir).exists()
    assert not _group_alive(pgid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the port is free again


def test_server_stops_when_its_starter_is_killed(tmp_path: Path) -> None:
    """A test run killed with SIGKILL leaves no server behind (the lifeline ends it)."""
    script = "import sys, time\nfrom cachefs.testing.servers import moto_server\n" \
             "with moto_server() as s:\n    print(s.process.pid, flush=True)\n    time.sleep(300)\n"
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout is not None
        pgid = int(starter.stdout.readline())
        assert _group_alive(pgid)
    finally:
        starter.kill()
        starter.wait()
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(pgid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies still count for kill(); only running members matter.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[2]) == pgid and stat[0] != "Z":
            return True
    return False


def test_missing_binaries_say_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(servers, "REPO", tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin/python"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(servers.shutil, "which", lambda name: None)
    monkeypatch.delenv("CACHEFS_AZURITE", raising=False)
    for start in (servers.seaweed_server, servers.azurite_server):
        with pytest.raises(ServerError, match=r"run \./install\.sh --test"), start():
            pass


# -- the proxy ------------------------------------------------------------------------------

@pytest.fixture
def proxied(s3_server: Server) -> Iterator[tuple[Server, str, LatencyProxy]]:
    bucket = _bucket(s3_server, "p")
    s3_server.upload(bucket, {"small": b"s" * 100, "big": os.urandom(200_000)})
    with LatencyProxy(s3_server.address) as proxy:
        yield s3_server, bucket, proxy


def test_proxy_adds_latency_each_way(s3_server: Server) -> None:
    bucket = _bucket(s3_server, "l")
    s3_server.upload(bucket, {"k": b"x"})
    latency = 0.05
    with LatencyProxy(s3_server.address, latency=latency) as proxy:
        client = s3_server.s3_client(proxy.url, retries=0)
        client.head_object(Bucket=bucket, Key="k")  # connected (the handshake costs a round trip)
        rtts = []
        for _ in range(3):
            t0 = time.monotonic()
            client.head_object(Bucket=bucket, Key="k")
            rtts.append(time.monotonic() - t0)
    assert min(rtts) >= 2 * latency, rtts
    assert min(rtts) < 2 * latency + 0.5, rtts


def test_proxy_latency_does_not_serialize_chunks(seaweed: Server) -> None:
    """20 MB through 50 ms each way: ~160 chunks that each waiting out the latency one after the
    other would take 8 s; pipelined, the transfer takes about one round trip more than direct."""
    bucket = _bucket(seaweed, "bw")
    data = os.urandom(20 << 20)
    seaweed.upload(bucket, {"blob": data})
    with LatencyProxy(seaweed.address, latency=0.05) as proxy:
        client = seaweed.s3_client(proxy.url, retries=0)
        t0 = time.monotonic()
        assert client.get_object(Bucket=bucket, Key="blob")["Body"].read() == data
        took = time.monotonic() - t0
    assert took < 2.5, took


def test_proxy_handles_many_connections(s3_server: Server) -> None:
    bucket = _bucket(s3_server, "c")
    objects = {f"o{i}": os.urandom(10_000) for i in range(400)}
    s3_server.upload(bucket, objects)
    with LatencyProxy(s3_server.address, latency=0.01) as proxy:
        client = s3_server.s3_client(proxy.url, retries=0, max_pool_connections=200)
        barrier = threading.Barrier(200)

        def get(key: str) -> bytes:
            if int(key[1:]) < 200:
                barrier.wait()  # 200 requests in flight at once
            return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())

        with ThreadPoolExecutor(200) as pool:
            got = dict(zip(objects, pool.map(get, objects), strict=True))
    assert got == objects
    assert proxy.stats.requests == 400 and not proxy.stats.faults


def _expect(kind: str) -> tuple[type[Exception], Callable[[Any], bool]]:
    """What a boto3 client without retries sees for each fault kind."""
    return {
        "error": (ClientError, lambda e: e.response["Error"]["Code"] == "SlowDown"
                  and e.response["ResponseMetadata"]["HTTPStatusCode"] == 503),
        "error500": (ClientError, lambda e: e.response["Error"]["Code"] == "InternalError"
                     and e.response["ResponseMetadata"]["HTTPStatusCode"] == 500),
        "reset": (ConnectionClosedError, lambda e: True),
        "stall": (ReadTimeoutError, lambda e: True),
        "cut": (ResponseStreamingError, lambda e: "IncompleteRead" in str(e)),
        "outage": (Exception, lambda e: isinstance(e, EndpointConnectionError | ConnectionClosedError)),
    }[kind]


@pytest.mark.parametrize("kind", ["error", "error500", "reset", "stall", "cut", "outage"])
def test_proxy_injects_each_fault(proxied: tuple[Server, str, LatencyProxy], kind: str) -> None:
    server, bucket, proxy = proxied
    client = server.s3_client(proxy.url, retries=0, read_timeout=1)
    big = client.get_object(Bucket=bucket, Key="big")["Body"].read()
    proxy.inject(kind, stall_seconds=30)
    exc_type, check = _expect(kind)
    t0 = time.monotonic()
    with pytest.raises(exc_type) as info:
        client.get_object(Bucket=bucket, Key="big")["Body"].read()
    assert check(info.value), repr(info.value)
    assert time.monotonic() - t0 < 5
    assert proxy.stats.faults[kind] >= 1
    assert set(proxy.stats.faults) == {kind}
    proxy.clear()
    assert client.get_object(Bucket=bucket, Key="big")["Body"].read() == big
    assert client.head_object(Bucket=bucket, Key="small")["ContentLength"] == 100


def test_proxy_cut_of_a_response_without_body_is_seen(proxied: tuple[Server, str, LatencyProxy]) -> None:
    server, bucket, proxy = proxied
    client = server.s3_client(proxy.url, retries=0)
    proxy.inject("cut", count=1)
    with pytest.raises(ConnectionClosedError):
        client.head_object(Bucket=bucket, Key="big")
    assert client.head_object(Bucket=bucket, Key="big")["ContentLength"] == 200_000


def test_proxy_fault_count_duration_and_rate(proxied: tuple[Server, str, LatencyProxy]) -> None:
    server, bucket, proxy = proxied
    client = server.s3_client(proxy.url, retries=0)

    def ok() -> bool:
        try:
            client.head_object(Bucket=bucket, Key="small")
        except ClientError:
            return False
        return True

    proxy.inject("error", count=2)
    assert [ok() for _ in range(4)] == [False, False, True, True]
    proxy.inject("error500", duration=0.5)
    assert not ok()
    time.sleep(0.6)
    assert ok()
    proxy.inject("error", rate=0.3)
    failures = sum(not ok() for _ in range(100))
    proxy.clear()
    assert 10 <= failures <= 50
    assert proxy.stats.faults == {"error": 2 + failures, "error500": 1}
    assert proxy.stats.requests == 4 + 2 + 100


def test_proxy_mixed_faults(proxied: tuple[Server, str, LatencyProxy]) -> None:
    server, bucket, proxy = proxied
    client = server.s3_client(proxy.url, retries=0)
    proxy.inject(("error", "reset", "cut"), rate=1.0)
    for _ in range(30):
        with pytest.raises((ClientError, ConnectionClosedError, ResponseStreamingError)):
            client.get_object(Bucket=bucket, Key="big")["Body"].read()
    assert set(proxy.stats.faults) == {"error", "reset", "cut"} and proxy.stats.faults.total() == 30
    with pytest.raises(ValueError):
        proxy.inject(("error", "outage"))


def test_proxy_stall_ends_when_cleared(proxied: tuple[Server, str, LatencyProxy]) -> None:
    """A stalled response is held, not lost: it arrives once the stall is cleared."""
    server, bucket, proxy = proxied
    client = server.s3_client(proxy.url, retries=0, read_timeout=30)
    proxy.inject("stall", stall_seconds=60)
    threading.Timer(1.0, proxy.clear).start()
    t0 = time.monotonic()
    assert client.head_object(Bucket=bucket, Key="small")["ContentLength"] == 100
    assert 1.0 <= time.monotonic() - t0 < 5


def test_proxy_outage_resets_open_connections(proxied: tuple[Server, str, LatencyProxy]) -> None:
    server, bucket, proxy = proxied
    with socket.create_connection(("127.0.0.1", proxy.port)) as idle:
        time.sleep(0.2)
        proxy.inject("outage")
        idle.settimeout(5)
        with pytest.raises(ConnectionResetError):
            idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.recv(1)
    proxy.clear()
    assert server.s3_client(proxy.url, retries=0).head_object(Bucket=bucket, Key="small")["ContentLength"] == 100


def test_proxy_faults_azure(azurite: Server) -> None:
    from azure.core.exceptions import HttpResponseError, ServiceResponseError

    container = _bucket(azurite, "az")
    azurite.upload(container, {"blob": os.urandom(100_000)})
    with LatencyProxy(azurite.address) as proxy:
        client = azurite.blob_service(azurite.endpoint_via(proxy.url), retry_total=0).get_blob_client(container, "blob")
        assert len(client.download_blob().readall()) == 100_000
        proxy.inject("error")
        with pytest.raises(HttpResponseError) as info:
            client.download_blob().readall()
        assert info.value.status_code == 503 and getattr(info.value, "error_code", None) == "ServerBusy"
        proxy.inject("reset")
        with pytest.raises(ServiceResponseError):
            client.get_blob_properties()
        proxy.clear()
        env = azurite.env_via(proxy.url)
        assert f"BlobEndpoint={proxy.url}/devstoreaccount1;" in env["AZURE_STORAGE_CONNECTION_STRING"]
        assert client.get_blob_properties().size == 100_000


def test_proxy_command_line(moto: Server) -> None:
    target = "{}:{}".format(*moto.address)
    proc = subprocess.Popen([sys.executable, "-m", "cachefs.testing.proxy", "--target", target, "--latency-ms", "10"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "+20 ms per round trip" in line, line
        url = "http://" + line.split()[2]
        moto.s3_client(url, retries=0).list_buckets()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "1 requests" in out, out
