"""The lean data and listing paths on real servers: Azure GETs through obstore (and the REST
client for the keys obstore cannot hold) with every credential source, their errors, and
listings that give exactly what the SDKs' own listings give (Azurite; moto and SeaweedFS), S3's
sent by ``s3_rest`` (its errors, and a mount listing through it).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from cachefs.backends import Backend, ListPage, ObjectInfo, create_backend, obstore_get, s3_rest
from cachefs.backends.azure import AzureBackend
from cachefs.backends.s3 import S3Backend
from cachefs.errors import AccessDenied, NotFound, ObjectChanged, TemporaryFailure, Unreachable, UsageError
from cachefs.source import parse_source
from cachefs.testing.identity import managed_identity
from cachefs.testing.proxy import LatencyProxy
from cachefs.testing.servers import AZURITE_ACCOUNT, AZURITE_KEY, Server, azurite_server
from tests.fuse.mounts import cachefs, mounted

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 10.0
# Keys a listing and a GET must carry unchanged: spaces, "+", "%", "&", "<", "#", "?", non-ASCII,
# and (Azure) the shapes obstore's paths cannot hold: "a//b", a leading "/", a trailing "/".
ODD_KEYS = ["d/plain.bin", "d/sp ace.bin", "d/plus+sign", "d/pct%20x", "d/amp&lt<gt>", "d/hash#q?x",
            "d/unicodé/ü.txt", "d/sub/deeper/x", "d/sub/y", "d/zz"]
AZURE_ONLY_KEYS = ["d/dd//x", "/lead", "d/marker/"]
TOKEN_LIFETIME = 12  # seconds a managed identity's token lives in the mount test


def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith(("AZURE_", "CACHEFS_AZURE_")):
            monkeypatch.delenv(var)


def container(azurite: Server, objects: dict[str, bytes]) -> str:
    name = f"lean-{uuid.uuid4().hex[:12]}"
    azurite.create_bucket(name)
    azurite.upload(name, objects)
    return name


def sas_token(name: str) -> str:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return generate_container_sas(AZURITE_ACCOUNT, name, account_key=AZURITE_KEY,
                                  permission=ContainerSasPermissions(read=True, list=True),
                                  expiry=datetime.now(UTC) + timedelta(hours=1))


def azure_backend(azurite: Server, name: str, credential: str, monkeypatch: pytest.MonkeyPatch,
                  data_path: str = "obstore") -> AzureBackend:
    """A backend on container ``name`` whose only credential is ``credential``."""
    clean_env(monkeypatch)
    monkeypatch.setenv("CACHEFS_AZURE_DATA_PATH", data_path)
    if credential == "connection string":
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.env["AZURE_STORAGE_CONNECTION_STRING"])
        b = create_backend(parse_source(f"az://{name}"), timeout=TIMEOUT)
    else:
        if credential == "account key":
            monkeypatch.setenv("AZURE_STORAGE_KEY", AZURITE_KEY)
        else:
            monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", sas_token(name))
        b = create_backend(parse_source(f"az://{name}"), account=AZURITE_ACCOUNT, endpoint_url=azurite.endpoint_url,
                           timeout=TIMEOUT)
    assert isinstance(b, AzureBackend)
    return b


async def listing(b: Backend, prefix: str, delimiter: str | None) -> tuple[list[ObjectInfo], list[str]]:
    objects: list[ObjectInfo] = []
    prefixes: list[str] = []
    token = None
    while True:
        page = await b.list_page(prefix, delimiter, token)
        objects += page.objects
        prefixes += page.prefixes
        token = page.token
        if token is None:
            return objects, prefixes


@pytest.fixture
def closing() -> Iterator[list[Backend]]:
    backends: list[Backend] = []
    yield backends
    for b in backends:
        trio.run(b.aclose)


@pytest.mark.parametrize("path", ["obstore", "rest"])
@pytest.mark.parametrize("credential", ["connection string", "account key", "SAS"])
def test_azure_reads_with_each_credential(azurite: Server, credential: str, path: str,
                                          monkeypatch: pytest.MonkeyPatch, closing: list[Backend]) -> None:
    """Every credential source lists, and reads each key pinned to its listed ETag: through
    obstore where its paths hold the key, through the REST client where they cannot (or with
    CACHEFS_AZURE_DATA_PATH=rest, every key)."""
    objects = {k: f"content of {k!r}".encode() * 3 for k in ODD_KEYS + AZURE_ONLY_KEYS}
    name = container(azurite, objects)
    b = azure_backend(azurite, name, credential, monkeypatch, data_path=path)
    closing.append(b)
    if path == "rest":
        assert b.store is None
        closing.append(azure_backend(azurite, name, credential, monkeypatch))  # obstore, for the check below
        store = closing[-1].store  # type: ignore[attr-defined]
    else:
        store = b.store
    assert store is not None

    async def main() -> None:
        listed, _ = await listing(b, "", None)
        assert sorted(o.key for o in listed) == sorted(objects)
        for o in listed:
            assert o.size == len(objects[o.key])
            assert await b.get_range(o.key, 0, o.size, o.etag) == objects[o.key]
            assert await b.get_range(o.key, 3, 5, o.etag) == objects[o.key][3:8]
            via_obstore = obstore_get.get(store, o.key, 0, o.size, o.etag)
            if o.key in ODD_KEYS:
                assert via_obstore is not None and via_obstore[0] == objects[o.key]
            else:
                assert via_obstore is None  # read through the REST client instead (above)

    trio.run(main)


@pytest.mark.parametrize("path", ["obstore", "rest"])
def test_azure_get_errors(azurite: Server, path: str, monkeypatch: pytest.MonkeyPatch,
                          closing: list[Backend]) -> None:
    """A missing blob is NotFound, a read pinned to a replaced version ObjectChanged, a wrong
    account key AccessDenied (listing and GET), a missing container NotFound; on both data paths."""
    name = container(azurite, {"a/x": b"first version", "a//odd": b"odd key"})
    b = azure_backend(azurite, name, "account key", monkeypatch, data_path=path)
    closing.append(b)
    assert (b.store is not None) == (path == "obstore")

    async def main() -> None:
        info = await b.head("a/x")
        odd = await b.head("a//odd")
        for key in ("a/missing", "a//missing"):
            with pytest.raises(NotFound):
                await b.get_range(key, 0, 3, None)
        azurite.upload(name, {"a/x": b"second version", "a//odd": b"odd key, again"})
        for old in (info, odd):
            with pytest.raises(ObjectChanged):
                await b.get_range(old.key, 0, 5, old.etag)
        assert await b.get_range("a/x", 0, 6, None) == b"second"

    trio.run(main)

    monkeypatch.setenv("AZURE_STORAGE_KEY", "A" * 8 + AZURITE_KEY[8:])
    wrong = create_backend(parse_source(f"az://{name}"), account=AZURITE_ACCOUNT, endpoint_url=azurite.endpoint_url,
                           timeout=TIMEOUT)
    monkeypatch.setenv("AZURE_STORAGE_KEY", AZURITE_KEY)
    missing = create_backend(parse_source(f"az://nosuch-{uuid.uuid4().hex[:8]}"), account=AZURITE_ACCOUNT,
                             endpoint_url=azurite.endpoint_url, timeout=TIMEOUT)
    closing += [wrong, missing]

    async def refused() -> None:
        with pytest.raises(AccessDenied):
            await wrong.check()
        with pytest.raises(AccessDenied):
            await wrong.list_page("", "/")
        for key in ("a/x", "a//odd"):
            with pytest.raises(AccessDenied):
                await wrong.get_range(key, 0, 3, None)

    trio.run(refused)
    with pytest.raises(NotFound, match="does not exist"):
        trio.run(missing.check)


def test_azure_data_path_setting_is_checked(azurite: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env(monkeypatch)
    monkeypatch.setenv("CACHEFS_AZURE_DATA_PATH", "sdk")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.env["AZURE_STORAGE_CONNECTION_STRING"])
    with pytest.raises(UsageError, match="CACHEFS_AZURE_DATA_PATH must be obstore or rest"):
        create_backend(parse_source("az://whatever"))


def sdk_listing(azurite: Server, name: str, prefix: str, delimiter: str | None) -> tuple[set[Any], set[str]]:
    """What azure-storage-blob lists (the backend's listing before this client)."""
    from azure.storage.blob import BlobPrefix

    client = azurite.blob_service().get_container_client(name)
    items = (client.walk_blobs(name_starts_with=prefix or None, delimiter=delimiter) if delimiter
             else client.list_blobs(name_starts_with=prefix or None))
    objects, prefixes = set(), set()
    for item in items:
        if isinstance(item, BlobPrefix):
            prefixes.add(item.name)
        else:
            objects.add((item.name, int(item.size), str(item.etag).strip('"'), item.last_modified.timestamp()))
    return objects, prefixes


def test_azure_listing_matches_the_sdk(azurite: Server, monkeypatch: pytest.MonkeyPatch,
                                       closing: list[Backend]) -> None:
    """Page by page (7 entries a page, so tokens are followed), with "/" and without, at the root
    and below: the same objects (size, ETag, mtime) and prefixes as the SDK's listing."""
    objects = {k: os.urandom(len(k)) for k in ODD_KEYS + AZURE_ONLY_KEYS}
    objects.update({f"d/many/{i:03d}": b"x" * i for i in range(40)})
    name = container(azurite, objects)
    b = azure_backend(azurite, name, "connection string", monkeypatch)
    closing.append(b)
    b.page_size = 7

    for prefix, delimiter in [("", None), ("", "/"), ("d/", "/"), ("d/many/", "/"), ("d/sub/", None), ("d/p", "/")]:
        got_objects, got_prefixes = trio.run(listing, b, prefix, delimiter)
        want_objects, want_prefixes = sdk_listing(azurite, name, prefix, delimiter)
        assert {tuple(o) for o in got_objects} == want_objects, (prefix, delimiter)
        assert len(got_objects) == len(want_objects)
        assert set(got_prefixes) == want_prefixes and len(got_prefixes) == len(want_prefixes), (prefix, delimiter)
    assert len(trio.run(listing, b, "d/many/", "/")[0]) == 40


S3_ODD_KEYS = ODD_KEYS + AZURE_ONLY_KEYS + ["d/a//b", "d/pct%2Fslash", "d/plus+%2B", "d/ends-in-space ",
                                           "d/tab\tkey", "d/日本語/ファイル", "d/emoji-🙂"]


def seaweed_keys(keys: Iterable[str]) -> set[str]:
    """The keys SeaweedFS lists for ``keys``: its filer drops empty path segments."""
    return {re.sub("/+", "/", k).lstrip("/") for k in keys}


def s3_backend(server: Server, name: str, monkeypatch: pytest.MonkeyPatch, list_path: str = "rest",
               **env: str) -> S3Backend:
    for var, value in {**server.env, "CACHEFS_S3_LIST_PATH": list_path, **env}.items():
        monkeypatch.setenv(var, value)
    b = create_backend(parse_source(f"s3://{name}"), endpoint_url=server.endpoint_url, region="us-east-1",
                       timeout=TIMEOUT)
    assert isinstance(b, S3Backend)
    return b


@pytest.mark.parametrize("server_name", ["moto", "seaweed"])
def test_s3_listing_matches_botocore(server_name: str, request: pytest.FixtureRequest,
                                     monkeypatch: pytest.MonkeyPatch, closing: list[Backend]) -> None:
    """Pages sent by ``s3_rest`` and read by the scanner hold exactly what botocore's own request
    and parser make of the same listing: odd keys (spaces, "+", "%", "&", "<", unicode, "a//b",
    a leading "/", "/" markers), small pages with their tokens followed, "/" or no delimiter, at
    the root and below, and odd prefixes."""
    server: Server = request.getfixturevalue(server_name)
    name = f"lean-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    objects = {k: os.urandom(len(k.encode())) for k in S3_ODD_KEYS}
    objects.update({f"d/many/{i:03d}": b"x" * i for i in range(30)})
    server.upload(name, objects)
    b = s3_backend(server, name, monkeypatch)
    closing.append(b)
    trio.run(b.check)
    assert b.rest is not None and b.rest.endpoint.url == f"{server.endpoint_url}/{name}"

    def botocore_page(prefix: str, delimiter: str | None, token: str | None, size: int) -> ListPage:
        kwargs: dict[str, Any] = {"Bucket": name, "Prefix": prefix, "MaxKeys": size}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token:
            kwargs["ContinuationToken"] = token
        resp = b.client.list_objects_v2(**kwargs)  # the client without the listing hook
        return ListPage([ObjectInfo(o["Key"], o["Size"], o["ETag"].strip('"'), o["LastModified"].timestamp())
                         for o in resp.get("Contents", ())],
                        [p["Prefix"] for p in resp.get("CommonPrefixes", ())],
                        resp.get("NextContinuationToken") if resp.get("IsTruncated") else None)

    # As the store keeps them (SeaweedFS, a filer, stores "d/a//b" as "d/a/b" and "/lead" as "lead").
    stored = seaweed_keys(objects) if server_name == "seaweed" else set(objects)
    assert set(server.list_keys(name)) == stored
    cases = [("", None, 7), ("", "/", 7), ("d/", "/", 7), ("d/", "/", 2), ("d/many/", "/", 7), ("d/p", "/", 1),
             ("d/", None, 1000), ("d/sp ", "/", 7), ("d/unicodé/", "/", 7), ("d/pct%", None, 7), ("d/plus+", "/", 7),
             ("/", "/", 7), ("d/a/", "/", 7), ("d/marker/", "/", 7), ("none/", "/", 7)]
    for prefix, delimiter, size in cases:
        b.page_size = size
        token: str | None = None
        got: list[ObjectInfo] = []
        while True:
            page = b._list_sync(prefix, delimiter, token)
            want = botocore_page(prefix, delimiter, token, size)
            assert page.objects == want.objects and page.prefixes == want.prefixes, (prefix, delimiter, size)
            assert (page.token is None) == (want.token is None)
            got += page.objects
            token = page.token
            if token is None:
                break
        expected = sorted(k for k in stored if k.startswith(prefix) and (
            delimiter is None or delimiter not in k[len(prefix):]))
        assert [o.key for o in got] == expected, (prefix, delimiter, size)
    with pytest.raises(NotFound):  # through obstore: its "not found" is a NotFound, not a refusal
        trio.run(b.get_range, "d/missing", 0, 3, None)


def test_s3_listing_errors_on_the_rest_path(seaweed: Server, monkeypatch: pytest.MonkeyPatch,
                                           closing: list[Backend]) -> None:
    """Through ``s3_rest``: a missing bucket is NotFound, a refused secret key AccessDenied, a 503
    (throttling) or a page cut short a TemporaryFailure that ``retry.py`` retries, a store that
    stopped answering Unreachable; CACHEFS_S3_LIST_PATH=botocore keeps listings on botocore."""
    name = f"lean-{uuid.uuid4().hex[:12]}"
    seaweed.create_bucket(name)
    seaweed.upload(name, {f"k/{i:04d}": b"x" * 100 for i in range(300)})

    missing = s3_backend(seaweed, f"nosuch-{uuid.uuid4().hex[:8]}", monkeypatch)
    closing.append(missing)
    with pytest.raises(NotFound, match="does not exist"):
        trio.run(missing.check)
    assert missing.rest is not None  # botocore showed the way before the store answered
    with pytest.raises(NotFound):
        missing._list_sync("", "/", None)

    wrong = s3_backend(seaweed, name, monkeypatch, AWS_SECRET_ACCESS_KEY="not-the-secret-key")
    closing.append(wrong)
    with pytest.raises(AccessDenied):
        trio.run(wrong.check)
    assert wrong.rest is not None
    with pytest.raises(AccessDenied, match="access denied \\(SignatureDoesNotMatch\\)"):
        wrong._list_sync("k/", "/", None)

    with LatencyProxy(seaweed.address) as proxy:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.env["AWS_SECRET_ACCESS_KEY"])
        b = create_backend(parse_source(f"s3://{name}"), endpoint_url=proxy.url, region="us-east-1", timeout=TIMEOUT)
        assert isinstance(b, S3Backend)
        closing.append(b)
        trio.run(b.check)
        assert b.rest is not None
        for fault in ("error", "error500", "cut"):
            proxy.inject(fault, count=1)
            with pytest.raises(TemporaryFailure):
                b._list_sync("k/", "/", None)
            proxy.inject(fault, count=2)
            assert len(trio.run(listing, b, "k/", "/")[0]) == 300  # retried until the store answers
            proxy.clear()
        assert len(b._list_sync("k/", None, None).objects) == 300
    with pytest.raises(Unreachable):  # nobody listens there any more
        b._list_sync("k/", "/", None)

    old = s3_backend(seaweed, name, monkeypatch, list_path="botocore")
    closing.append(old)
    trio.run(old.check)
    assert old.rest is None and len(trio.run(listing, old, "k/", "/")[0]) == 300
    monkeypatch.setenv("CACHEFS_S3_LIST_PATH", "fast")
    with pytest.raises(UsageError, match="CACHEFS_S3_LIST_PATH must be rest or botocore"):
        create_backend(parse_source(f"s3://{name}"), endpoint_url=seaweed.endpoint_url, region="us-east-1")


def test_mount_lists_through_the_rest_path(seaweed: Server, tmp_path: Path) -> None:
    """A real mount: every directory listing after the mount's bucket check is sent by
    ``s3_rest`` (its User-Agent), and shows the odd names as they are in the bucket."""
    name = f"lean-{uuid.uuid4().hex[:12]}"
    seaweed.create_bucket(name)
    objects = {"data/sp ace.txt": b"spaces", "data/plus+sign": b"plus", "data/pct%41": b"percent",
               "data/ü/x": b"unicode", "data/sub/": b"", "data/sub/y.bin": os.urandom(50_000),
               **{f"data/many/{i:04d}": b"m%d" % i for i in range(1200)}}  # two pages
    seaweed.upload(name, objects)
    heads: list[bytes] = []
    with LatencyProxy(seaweed.address) as proxy:
        proxy.authorize = lambda head: heads.append(head) is None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CACHEFS_"))}
        env.update(seaweed.env)
        with mounted(f"s3://{name}", tmp_path / "mnt", tmp_path / "cache", env, "--endpoint-url", proxy.url) as m:
            assert sorted(os.listdir(m.path / "data")) == ["many", "pct%41", "plus+sign", "sp ace.txt", "sub", "ü"]
            assert os.listdir(m.path / "data" / "sub") == ["y.bin"]
            assert sorted(os.listdir(m.path / "data" / "many")) == [f"{i:04d}" for i in range(1200)]
            for key in ("data/sp ace.txt", "data/plus+sign", "data/pct%41", "data/ü/x", "data/sub/y.bin"):
                assert (m.path / key).read_bytes() == objects[key]
    listings = [h for h in heads if h.startswith(b"GET /") and b"list-type=2" in h.split(b"\r\n")[0]]
    by_rest = [h for h in listings if b"User-Agent: " + s3_rest.USER_AGENT.encode() in h]
    assert len(listings) - len(by_rest) <= 1, "listings went through botocore"  # the bucket check
    assert len(by_rest) >= 4  # data/, data/sub/, data/many/ (two pages), data/ü/ or the root


def test_mount_with_an_account_key_reads_through_obstore(azurite: Server, tmp_path: Path) -> None:
    """A mount whose credential is AZURE_STORAGE_KEY (no connection string) lists and reads
    every file, odd names included, byte for byte."""
    objects = {"data/a.bin": os.urandom(70_000), "data/sp ace.txt": b"spaces", "data/ü/x": b"unicode"}
    name = container(azurite, objects)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "CACHEFS_AZURE_"))}
    env["AZURE_STORAGE_KEY"] = AZURITE_KEY
    with mounted(f"az://{name}", tmp_path / "mnt", tmp_path / "cache", env, "--account", AZURITE_ACCOUNT,
                 "--endpoint-url", azurite.endpoint_url) as m:
        assert sorted(os.listdir(m.path / "data")) == ["a.bin", "sp ace.txt", "ü"]
        assert (m.path / "data" / "a.bin").read_bytes() == objects["data/a.bin"]
        assert (m.path / "data" / "sp ace.txt").read_bytes() == b"spaces"
        assert (m.path / "data" / "ü" / "x").read_bytes() == b"unicode"
        assert m.gets() >= 3


@pytest.fixture(scope="module")
def azurite_oauth() -> Iterator[Server]:
    with azurite_server(oauth=True) as server:
        yield server


def test_mount_with_a_managed_identity(azurite_oauth: Server, tmp_path: Path) -> None:
    """No key, no SAS: DefaultAzureCredential finds the (loopback) managed identity, and its
    tokens serve the listings, HEADs and obstore GETs of a real mount over HTTPS, also after the
    first token expired (tokens live TOKEN_LIFETIME seconds here); no token appears in the log
    or the status."""
    first = {"one/a.bin": os.urandom(70_000), "one/b/c.txt": b"nested", "one/sp ace": b"spaces"}
    later = {"two/x.bin": os.urandom(50_000), "two/y.txt": b"read after the first token expired"}
    name = container(azurite_oauth, {**first, **later})
    with managed_identity(lifetime=TOKEN_LIFETIME) as identity:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "CACHEFS_AZURE_"))}
        env.update(identity.env, REQUESTS_CA_BUNDLE=str(azurite_oauth.ca_file))
        with mounted(f"az://{name}", tmp_path / "mnt", tmp_path / "cache", env, "--account", AZURITE_ACCOUNT,
                     "--endpoint-url", azurite_oauth.endpoint_url, "--log-level", "debug") as m:
            assert sorted(os.listdir(m.path / "one")) == ["a.bin", "b", "sp ace"]
            for key, data in first.items():
                assert (m.path / key).read_bytes() == data
            issued = len(identity.tokens)
            time.sleep(TOKEN_LIFETIME + 2)  # every token issued so far has expired
            assert sorted(os.listdir(m.path / "two")) == ["x.bin", "y.txt"]
            for key, data in later.items():
                assert (m.path / key).read_bytes() == data
            assert len(identity.tokens) > issued  # a fresh token served the later requests
            assert m.gets() >= 5
            status = cachefs("status", "--json", str(m.path), env=env, check=True).stdout
        assert identity.refused == 0
        logs = (tmp_path / "cache" / "cachefs.log").read_text(errors="replace")
        assert "GET" in logs or "get" in logs
        for token in identity.tokens:
            assert token not in status and token not in logs
            assert token.split(".")[2] not in status + logs


def test_a_container_refusing_the_identity_is_one_clear_line(azurite_oauth: Server, tmp_path: Path) -> None:
    """Without any credential (no managed identity either), mounting fails with exit code 3 and
    one line, no traceback."""
    name = container(azurite_oauth, {"x": b"x"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "CACHEFS_AZURE_", "IDENTITY_", "MSI_"))}
    env.update(REQUESTS_CA_BUNDLE=str(azurite_oauth.ca_file), AZURE_CLIENT_ID="", HOME=str(tmp_path))
    (tmp_path / "mnt").mkdir()
    res = cachefs("mount", f"az://{name}", str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "cache"),
                  "--account", AZURITE_ACCOUNT, "--endpoint-url", azurite_oauth.endpoint_url, env=env, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "no Azure credentials found" in res.stderr, res.stderr
