"""The write half of the backend interface, one contract over every backend: a local directory,
moto and SeaweedFS (S3), Azurite (Azure).

What the daemon relies on: what is written reads back byte for byte; the ETag a write returns is
the one listings and HEAD report afterwards (cached data is keyed by it); an object is never seen
half-written; writes can be repeated after a lost answer; errors are cachefs errors.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY

from cachefs.backends import Backend, ObjectInfo, create_backend
from cachefs.backends import s3 as s3_backend
from cachefs.errors import BackendError, NotFound, ObjectChanged
from cachefs.source import parse_source
from cachefs.testing.servers import AZURITE_ACCOUNT, AZURITE_KEY, Server, free_port

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 20.0  # backend timeout: ample on loopback
MiB = 1 << 20


def make_backend(name: str, request: pytest.FixtureRequest, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Backend:
    """A backend over a fresh local directory, or a fresh bucket on the server ``name``."""
    if name == "local":
        root = tmp_path / "src"
        root.mkdir()
        return create_backend(parse_source(f"file://{root}"), timeout=TIMEOUT)
    server: Server = request.getfixturevalue(name)
    bucket = f"w-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    for var, value in server.env.items():
        monkeypatch.setenv(var, value)
    if server.kind == "s3":
        return create_backend(parse_source(f"s3://{bucket}"), endpoint_url=server.endpoint_url,
                              region="us-east-1", timeout=TIMEOUT)
    return create_backend(parse_source(f"az://{bucket}"), timeout=TIMEOUT)


@pytest.fixture(params=["local", "moto", "seaweed", "azurite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    b = make_backend(request.param, request, tmp_path, monkeypatch)
    yield b
    trio.run(b.aclose)


@pytest.fixture(params=["moto", "seaweed"])
def s3(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    b = make_backend(request.param, request, tmp_path, monkeypatch)
    yield b
    trio.run(b.aclose)


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


async def listing(b: Backend, prefix: str = "",
                  delimiter: str | None = None) -> tuple[dict[str, ObjectInfo], list[str]]:
    """Every object (by key) and common prefix under ``prefix``, all pages."""
    objects: dict[str, ObjectInfo] = {}
    prefixes: list[str] = []
    token = None
    while True:
        page = await b.list_page(prefix, delimiter, token)
        objects.update((o.key, o) for o in page.objects)
        prefixes += page.prefixes
        token = page.token
        if token is None:
            return objects, prefixes


async def check_stored(b: Backend, info: ObjectInfo, data: bytes) -> None:
    """``info`` (what a write returned) is what HEAD and a listing report, and the bytes read
    back pinned to its ETag are ``data``."""
    assert info.size == len(data)
    head = await b.head(info.key)
    assert (head.key, head.size, head.etag) == (info.key, info.size, info.etag)
    assert abs(head.mtime - info.mtime) < 2, (head.mtime, info.mtime)
    assert abs(info.mtime - time.time()) < 60
    parent = info.key.rpartition("/")[0]
    listed, _ = await listing(b, parent + "/" if parent else "", "/")
    assert (listed[info.key].size, listed[info.key].etag) == (info.size, info.etag)
    if data:
        assert await b.get_range(info.key, 0, len(data), info.etag) == data


def ops(operation: str) -> float:
    return REGISTRY.get_sample_value("cachefs_backend_requests_total",
                                     {"operation": operation, "outcome": "ok"}) or 0.0


def test_put_round_trip_and_overwrite(backend: Backend) -> None:
    """put then head, list and get agree on size, ETag and bytes; an overwrite of the same size
    gets a new ETag, and a read pinned to the old one is refused."""
    rng = random.Random(1)
    first, second = rng.randbytes(100_000), rng.randbytes(100_000)

    async def main() -> None:
        before = ops("put")
        info = await backend.put("a/b/obj.bin", first)
        assert ops("put") == before + 1
        await check_stored(backend, info, first)
        _, prefixes = await listing(backend, "a/", "/")
        assert prefixes == ["a/b/"]
        again = await backend.put("a/b/obj.bin", second)
        assert again.etag != info.etag
        await check_stored(backend, again, second)
        with pytest.raises(ObjectChanged):
            await backend.get_range("a/b/obj.bin", 0, 10, info.etag)
        small = await backend.put("tiny", b"x")
        await check_stored(backend, small, b"x")

    run(main)


def test_multipart_out_of_order_with_a_part_uploaded_twice(backend: Backend) -> None:
    """Three parts (5 MiB, 5 MiB, 1 KiB: S3's minimum) uploaded 3, 1, 2, then 1 again with other
    bytes: the object is parts 1 (the last upload), 2, 3, invisible until completed; completing
    again (as a retry after a lost answer does) answers with the object as it is."""
    rng = random.Random(2)
    p1_old, p1, p2, p3 = rng.randbytes(5 * MiB), rng.randbytes(5 * MiB), rng.randbytes(5 * MiB), rng.randbytes(1024)
    data = p1 + p2 + p3
    key = "big/multi.bin"

    async def main() -> None:
        upload = await backend.start_upload(key)
        t3 = await backend.upload_part(key, upload, 3, p3)
        await backend.upload_part(key, upload, 1, p1_old)
        t2 = await backend.upload_part(key, upload, 2, p2)
        t1 = await backend.upload_part(key, upload, 1, p1)
        assert await listing(backend) == ({}, [])  # nothing half-written shows
        with pytest.raises(NotFound):
            await backend.head(key)
        info = await backend.complete_upload(key, upload, [(1, t1), (2, t2), (3, t3)], len(data))
        await check_stored(backend, info, data)
        again = await backend.complete_upload(key, upload, [(1, t1), (2, t2), (3, t3)], len(data))
        await check_stored(backend, again, data)
        assert list((await listing(backend))[0]) == [key]

    run(main)


def test_abort_leaves_nothing(backend: Backend) -> None:
    async def main() -> None:
        await backend.put("keep", b"k")
        upload = await backend.start_upload("gone/x")
        await backend.upload_part("gone/x", upload, 1, b"part one")
        await backend.abort_upload("gone/x", upload)
        await backend.abort_upload("gone/x", upload)  # already gone: fine
        objects, prefixes = await listing(backend, "", "/")
        assert (list(objects), prefixes) == (["keep"], [])
        assert list((await listing(backend))[0]) == ["keep"]
        with pytest.raises(NotFound):
            await backend.head("gone/x")

    run(main)


def test_directory_markers(backend: Backend) -> None:
    """put("d/", b"") makes d/ a prefix (an empty marker object on S3 and Azure, a directory on
    the local backend); delete("d/") removes the marker, and the prefix once it is empty."""
    local = type(backend).__name__ == "LocalBackend"

    async def main() -> None:
        marker = await backend.put("d/", b"")
        assert (await listing(backend, "", "/"))[1] == ["d/"]
        if not local:
            head = await backend.head("d/")
            assert (head.size, head.etag) == (0, marker.etag)
            assert (await listing(backend, "d/", "/"))[0]["d/"].etag == marker.etag
        await backend.put("e/sub/", b"")  # parents are made too
        assert (await listing(backend, "e/", "/"))[1] == ["e/sub/"]
        f = await backend.put("d/f", b"in d")
        await backend.delete("d/")  # the marker only: d/f stays
        await check_stored(backend, f, b"in d")
        assert "d/" in (await listing(backend, "", "/"))[1]
        await backend.delete("d/f")
        await backend.delete("d/")
        await backend.delete("e/sub/")
        await backend.delete("e/")
        assert await listing(backend, "", "/") == ({}, [])

    run(main)


def test_delete(backend: Backend) -> None:
    """A deleted key is gone; deleting a missing key (or marker) is not an error."""
    async def main() -> None:
        await backend.put("x/y", b"data")
        await backend.delete("x/y")
        with pytest.raises(NotFound):
            await backend.head("x/y")
        assert await listing(backend) == ({}, [])
        for key in ("x/y", "nope", "nope/", "a/b/c", "x/"):
            await backend.delete(key)

    run(main)


def test_copy(backend: Backend) -> None:
    """A copy reads back like its source, reports its own ETag consistently, overwrites the
    destination, and leaves the source alone."""
    rng = random.Random(3)
    data, other = rng.randbytes(300_000), rng.randbytes(1000)

    async def main() -> None:
        src = await backend.put("src/a.bin", data)
        old = await backend.put("dst/b.bin", other)
        before = ops("copy")
        info = await backend.copy("src/a.bin", "dst/b.bin", len(data))
        assert ops("copy") > before
        assert info.key == "dst/b.bin"
        await check_stored(backend, info, data)
        with pytest.raises(ObjectChanged):
            await backend.get_range("dst/b.bin", 0, 10, old.etag)
        await check_stored(backend, src, data)
        assert await backend.copy("src/a.bin", "src/a.bin", len(data)) == await backend.head("src/a.bin")
        with pytest.raises(NotFound):
            await backend.copy("src/missing", "dst/c.bin", 10)

    run(main)


def test_multipart_copy(s3: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above MAX_SINGLE_COPY (lowered here to 5 MiB) S3 copies in ranges: 11 MiB + 3 bytes make
    three parts."""
    monkeypatch.setattr(s3_backend, "MAX_SINGLE_COPY", 5 * MiB)
    monkeypatch.setattr(s3_backend, "COPY_PART_SIZE", 5 * MiB)
    data = random.Random(4).randbytes(11 * MiB + 3)

    async def main() -> None:
        src = await s3.put("big/src.bin", data)
        info = await s3.copy("big/src.bin", "big/dst.bin", len(data))
        await check_stored(s3, info, data)
        await check_stored(s3, src, data)
        assert list((await listing(s3))[0]) == ["big/dst.bin", "big/src.bin"]  # no upload left over

    run(main)


# Not on moto: it answers 500 InternalError, not NoSuchUpload, for an upload id it does not know.
@pytest.mark.parametrize("backend", ["local", "seaweed", "azurite"], indirect=True)
def test_complete_of_an_upload_the_store_forgot(backend: Backend) -> None:
    """A complete retried after its answer was lost may find the upload gone (S3: NoSuchUpload):
    the object in its place is accepted if it is the upload's result (its size, and for S3 the
    multipart ETag of those parts), else it is a clear cachefs error, as it is when nothing is
    there. (Azure has no upload to forget: its retried commit simply commits again.)"""
    azure = type(backend).__name__ == "AzureBackend"
    rng = random.Random(5)
    data = rng.randbytes(5 * MiB) + rng.randbytes(100)
    key = "k.bin"

    async def main() -> None:
        upload = await backend.start_upload(key)
        parts = [(1, await backend.upload_part(key, upload, 1, data[:5 * MiB])),
                 (2, await backend.upload_part(key, upload, 2, data[5 * MiB:]))]
        await backend.complete_upload(key, upload, parts, len(data))
        forgotten = uuid.uuid4().hex
        again = await backend.complete_upload(key, forgotten, parts, len(data))
        await check_stored(backend, again, data)
        if not azure:
            with pytest.raises(BackendError, match="is not its result"):
                await backend.complete_upload(key, forgotten, parts, len(data) + 1)
        with pytest.raises(BackendError, match=r"no such upload|InvalidBlockList"):
            await backend.complete_upload("elsewhere", forgotten, parts, len(data))
        aborted = await backend.start_upload("aborted")
        token = await backend.upload_part("aborted", aborted, 1, b"abc")
        await backend.abort_upload("aborted", aborted)
        if not azure:  # Azure's abort leaves the blocks to be dropped by the blob's next commit
            with pytest.raises(BackendError, match="no such upload"):
                await backend.complete_upload("aborted", aborted, [(1, token)], 3)

    run(main)


@pytest.mark.parametrize("credential", ["key", "sas"])
def test_azure_credentials(credential: str, azurite: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes, and a copy (whose source URL must carry the SAS), with an account key and with a
    container SAS instead of a connection string; no message shows the SAS."""
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    name = f"w-{uuid.uuid4().hex[:12]}"
    azurite.create_bucket(name)
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    sas = generate_container_sas(AZURITE_ACCOUNT, name, account_key=AZURITE_KEY,
                                 permission=ContainerSasPermissions(read=True, add=True, create=True, write=True,
                                                                    delete=True, list=True),
                                 expiry=datetime.now(UTC) + timedelta(hours=1))
    if credential == "key":
        monkeypatch.setenv("AZURE_STORAGE_KEY", AZURITE_KEY)
    else:
        monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", sas)
    b = create_backend(parse_source(f"az://{name}"), account=AZURITE_ACCOUNT, endpoint_url=azurite.endpoint_url,
                       timeout=TIMEOUT)
    sig = next(p.split("=", 1)[1] for p in sas.split("&") if p.startswith("sig="))

    async def main() -> None:
        data = b"hello " * 1000
        info = await b.put("a", data)
        await check_stored(b, info, data)
        upload = await b.start_upload("m")
        token = await b.upload_part("m", upload, 1, data)
        await check_stored(b, await b.complete_upload("m", upload, [(1, token)], len(data)), data)
        await check_stored(b, await b.copy("a", "c/copy", len(data)), data)
        with pytest.raises(NotFound) as caught:
            await b.copy("missing", "c/other", 10)
        assert sig not in str(caught.value) and AZURITE_KEY not in str(caught.value)
        await b.delete("a")
        assert sorted((await listing(b))[0]) == ["c/copy", "m"]
        await b.aclose()

    run(main)


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_unreachable_store(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A put to an endpoint nobody listens on fails with a cachefs error within the backend
    timeout, and the message carries no credential."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    if kind == "s3":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNREACHABLE")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unreachable-secret-key")
        b = create_backend(parse_source("s3://bucket"), endpoint_url=endpoint, region="us-east-1", timeout=2)
        secret = "unreachable-secret-key"
    else:
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                           f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                           f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};")
        b = create_backend(parse_source("az://container"), timeout=2)
        secret = AZURITE_KEY

    async def main() -> None:
        start = time.monotonic()
        with pytest.raises(BackendError) as caught:
            await b.put("k", b"data")
        assert time.monotonic() - start < 6
        assert secret not in str(caught.value)
        await b.aclose()

    run(main)


def test_local_writes_stay_inside_the_directory(tmp_path: Path) -> None:
    """The local backend's path rules hold for writes: nothing outside DIR or through a symbolic
    link, nothing in its staging area, which is never listed."""
    root = tmp_path / "src"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    b = create_backend(parse_source(f"file://{root}"), timeout=TIMEOUT)

    async def main() -> None:
        for key in ("../escape", "link/x", "link/", ".cachefs-uploads/x", "a/.cachefs-tmp-1"):
            with pytest.raises(NotFound):
                await b.put(key, b"no")
        with pytest.raises(NotFound):
            await b.copy("link/../../outside/x", "y", 1)
        await b.delete("link/x")  # invisible, so already "missing"
        upload = await b.start_upload("f")
        await b.upload_part("f", upload, 1, b"part")
        assert (root / ".cachefs-uploads").is_dir()
        assert await listing(b) == ({}, [])
        assert await listing(b, "", "/") == ({}, [])
        assert await listing(b, ".cachefs-uploads/") == ({}, [])
        with pytest.raises(BackendError):
            await b.put("f/", b"a directory has no contents")
        info = await b.put("plain", b"p")
        assert os.stat(root / "plain").st_mode & 0o777 == 0o666 & ~_umask()
        await check_stored(b, info, b"p")

    run(main)
    assert sorted(os.listdir(outside)) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
