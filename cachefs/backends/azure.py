"""Azure Blob Storage: GETs through obstore, listings through a lean REST client, the rest
through azure-storage-blob (credentials: see ``AzureBackend.__init__``).

Credentials are read from the environment (or files named by ``*_FILE`` variables, the shape a
Kubernetes Secret mounted as a volume has), in this order: a connection string, an account key,
a SAS token, else ``DefaultAzureCredential`` (managed identity, workload identity, Azure CLI).
All three clients use the one that was chosen, never one of their own from the environment.

Ranged GETs (the hot path, one per small file) go through obstore's ``AzureStore`` (Rust; releases
the GIL): ~0.5 ms of CPU per GET instead of 2-4 ms through the SDK (bench/get_cpu.py). Keys that
obstore's paths cannot hold ("a//b", a leading or trailing "/") are read through ``azure_rest``.
Listings go through ``azure_rest`` too: the SDK's XML deserializer costs 30-50x more CPU per key.
``CACHEFS_AZURE_DATA_PATH=rest`` sends every GET through ``azure_rest`` (for comparison, or a
store obstore cannot talk to). No client retries its own requests; ``retry.py`` owns retries.

Writes: a put is one Put Blob request; a multipart upload stages blocks whose ids are
"UPLOADID-NNNNNN" (the SDK sends them base64-encoded; every id of a blob has one length, as
Azure requires) and commits the list, so "starting" an upload needs no request and aborting one
none either (uncommitted blocks are dropped by the next commit of the blob, or after a week).
Bodies are sent with their Content-MD5. A copy is Copy Blob from the same container, polled
until it has finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from datetime import timedelta
from typing import Any
from xml.etree import ElementTree

from azure.core import exceptions as azexc
from azure.storage.blob import BlobBlock, BlobServiceClient

from ..credentials import env_secret
from ..errors import (
    AccessDenied,
    BackendError,
    NotFound,
    ObjectChanged,
    TemporaryFailure,
    Unreachable,
    UsageError,
    temporary_status,
)
from ..source import Source
from . import obstore_get
from .azure_rest import BlobRest, StoreError
from .base import Backend, ListPage, ObjectInfo

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5
READ_TIMEOUT = 30
PUT_BLOB_MAX = 5000 << 20  # the most one Put Blob request carries (API version 2019-12-12 on)
# Copy Blob within an account usually finishes at once; otherwise its status is polled, first
# after 50 ms, then twice as long each time up to once a second.
COPY_POLL_FIRST = 0.05
COPY_POLL_MAX = 1.0
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
# Requests refused for what they are: retrying the same request cannot help.
_PERMANENT = {"InvalidBlockList", "InvalidBlockId", "InvalidBlobOrBlock", "BlockCountExceedsLimit",
              "RequestBodyTooLarge", "InvalidHeaderValue", "InvalidResourceName", "OutOfRangeInput",
              "LeaseIdMissing", "LeaseIdMismatchWithBlobOperation", "SnapshotsPresent", "InvalidBlobType",
              "BlobImmutableDueToPolicy", "UnsupportedHeader"}


def block_id(upload_id: str, number: int) -> str:
    """The id of part ``number`` of an upload (before the SDK's base64)."""
    return f"{upload_id}-{number:06d}"


class _Static:
    """An obstore credential provider handing out one credential that never expires."""

    def __init__(self, credential: dict[str, Any]) -> None:
        self.credential = credential

    def __call__(self) -> Any:
        return self.credential


def _connection_string(conn_str: str) -> dict[str, str]:
    """The settings of a connection string, by lower-case name ("accountkey": ...)."""
    return {name.strip().lower(): value for name, sep, value in
            (part.partition("=") for part in conn_str.split(";")) if sep}


class AzureBackend(Backend):
    page_size = 5000  # Azure's maximum page

    def __init__(self, source: Source, *, account: str | None, endpoint_url: str | None,
                 timeout: float, max_connections: int) -> None:
        super().__init__(source, timeout=timeout, max_connections=max_connections)
        # max_single_put_size: a put is always one request (above it the SDK would stage blocks).
        opts: dict[str, Any] = {"retry_total": 0, "connection_timeout": CONNECT_TIMEOUT,
                                "read_timeout": READ_TIMEOUT, "max_single_get_size": 64 << 20,
                                "max_single_put_size": PUT_BLOB_MAX}
        conn_str = env_secret("AZURE_STORAGE_CONNECTION_STRING")
        account = account or os.environ.get("AZURE_STORAGE_ACCOUNT")
        # The one credential all three clients use: an account key, a SAS, a token credential
        # (azure-identity), or none (a public container through a connection string).
        key: str | None = None
        sas: str | None = None
        token_credential: Any = None
        if conn_str:
            settings = _connection_string(conn_str)
            service = BlobServiceClient.from_connection_string(conn_str, **opts)
            # UseDevelopmentStorage=true names no key: the SDK's credential carries Azurite's.
            key = settings.get("accountkey") or getattr(service.credential, "account_key", None)
            sas = None if key else settings.get("sharedaccesssignature")
        else:
            if not account:
                raise UsageError("no Azure account: use --account, AZURE_STORAGE_ACCOUNT, an account "
                                 "in the URL, or AZURE_STORAGE_CONNECTION_STRING")
            url = endpoint_url or f"https://{account}.blob.core.windows.net"
            key = env_secret("AZURE_STORAGE_KEY")
            sas = None if key else env_secret("AZURE_STORAGE_SAS_TOKEN")
            credential: Any
            if key:
                credential = {"account_name": account, "account_key": key}
            elif sas:
                credential = sas.lstrip("?")
            else:
                from azure.identity import DefaultAzureCredential

                credential = token_credential = DefaultAzureCredential()
            service = BlobServiceClient(url, credential=credential, **opts)
        if sas:
            sas = sas.lstrip("?")
        self.secrets = tuple(s for s in (conn_str, key, sas) if s)
        self.service = service
        self.container = service.get_container_client(source.bucket)
        self.endpoint = service.url.split("?")[0].rstrip("/")
        self.account = str(service.account_name)
        self.rest = BlobRest(self.endpoint, self.account, source.bucket, key=key, sas=sas,
                             credential=token_credential, max_connections=max_connections,
                             connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT)
        self.data_path = os.environ.get("CACHEFS_AZURE_DATA_PATH", "obstore")
        if self.data_path not in ("obstore", "rest"):
            raise UsageError(f"CACHEFS_AZURE_DATA_PATH must be obstore or rest, not {self.data_path!r}")
        self.store: Any = None
        if self.data_path == "obstore":
            self.store = self._obstore(key, sas, token_credential, max_connections)

    def _obstore(self, key: str | None, sas: str | None, token_credential: Any, max_connections: int) -> Any:
        from obstore.store import AzureStore

        provider: Any = None
        config: dict[str, Any] = {"account_name": self.account, "endpoint": self.endpoint}
        # Always an explicit provider (or none at all): obstore would otherwise pick credentials
        # from the environment by its own rules, possibly not the ones chosen above.
        if key:
            provider = _Static({"access_key": key, "expires_at": None})
        elif sas:
            provider = _Static({"sas_token": sas, "expires_at": None})
        elif token_credential is not None:
            from obstore.auth.azure import AzureCredentialProvider

            provider = AzureCredentialProvider(token_credential)
        else:
            config["skip_signature"] = True
        client_options: dict[str, Any] = {"allow_http": self.endpoint.startswith("http://"),
                                          "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT),
                                          "timeout": timedelta(seconds=READ_TIMEOUT),
                                          "pool_max_idle_per_host": str(max_connections)}
        # The CA bundle the SDK (requests) trusts: the data path must trust it too.
        client_options.update(obstore_get.root_certificate("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"))
        return AzureStore(
            self.source.bucket,
            config=config,  # type: ignore[arg-type]
            client_options=client_options,  # type: ignore[arg-type]
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1)},
            credential_provider=provider,
        )

    def refusal(self, status: int, code: str, what: str) -> BackendError:
        """The error for a non-2xx answer: its HTTP status and Azure error code."""
        if code in _PERMANENT:
            return BackendError(f"{what}: refused by the store ({code})")
        if status == 404:
            return NotFound(f"{what}: not found")
        if status == 403:
            return AccessDenied(f"{what}: access denied")
        if status == 412:
            return ObjectChanged(f"{what}: object changed")
        if status and not temporary_status(status):
            return BackendError(f"{what}: refused by the store (HTTP {status})")
        return TemporaryFailure(f"{what}: HTTP {status}")

    def translate(self, exc: Exception, what: str) -> BackendError:
        if isinstance(exc, StoreError):
            return self.refusal(exc.status, exc.code, what)
        if type(exc).__name__ == "CredentialUnavailableError" or (
                isinstance(exc, azexc.ClientAuthenticationError) and exc.response is None):
            # No token at all (DefaultAzureCredential tried every source), not a refusal.
            return AccessDenied(f"{what}: no Azure credentials found (set "
                                "AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_KEY, "
                                "AZURE_STORAGE_SAS_TOKEN or use a managed identity)")
        if isinstance(exc, azexc.ResourceNotFoundError):
            return NotFound(f"{what}: not found")
        if isinstance(exc, azexc.ResourceModifiedError):
            return ObjectChanged(f"{what}: object changed")
        if isinstance(exc, azexc.ClientAuthenticationError):
            return AccessDenied(f"{what}: access denied")
        if isinstance(exc, azexc.HttpResponseError):
            code = getattr(exc, "error_code", None) or ""
            code = str(getattr(code, "value", code))  # a StorageErrorCode (str enum) or a str
            return self.refusal(exc.status_code or 0, code, what)
        if isinstance(exc, azexc.ServiceRequestError):
            return Unreachable(f"{what}: cannot connect to {self.endpoint}")
        if isinstance(exc, ElementTree.ParseError | ValueError):
            return TemporaryFailure(f"{what}: unreadable answer ({type(exc).__name__})")
        return TemporaryFailure(f"{what}: {type(exc).__name__}")

    def _run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BackendError:
            raise
        except Exception as exc:
            raise self.translate(exc, what) from exc

    def _check_sync(self) -> None:
        try:
            self._run(f"container {self.source.bucket}", self.rest.list_page,
                      self.source.prefix, None, None, 1)
        except NotFound as exc:
            raise NotFound(f"container {self.source.bucket!r} does not exist") from exc

    def _list_sync(self, prefix: str, delimiter: str | None, token: str | None) -> ListPage:
        return self._run(f"list {prefix!r}", self.rest.list_page, prefix, delimiter, token, self.page_size)

    def _head_sync(self, key: str) -> ObjectInfo:
        props = self._run(f"head {key!r}", self.container.get_blob_client(key).get_blob_properties)
        return ObjectInfo(key, int(props.size), str(props.etag).strip('"'),
                          props.last_modified.timestamp())

    def _get_sync(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        got = None
        if self.store is not None:
            got = obstore_get.get(self.store, key, start, length, etag)
        if got is None:  # CACHEFS_AZURE_DATA_PATH=rest, or a key obstore cannot express
            got = self._run(f"get {key!r}", self.rest.get, key, start, length, etag)
        return got[0]

    # -- writes ---------------------------------------------------------------------------------

    def _put_sync(self, key: str, data: bytes) -> ObjectInfo:
        if len(data) > PUT_BLOB_MAX:
            raise BackendError(f"put {key!r}: {len(data)} bytes is more than one request carries; "
                               "upload it in blocks")
        resp = self._run(f"put {key!r}", self.container.get_blob_client(key).upload_blob, data,
                         length=len(data), overwrite=True, validate_content=True, max_concurrency=1)
        return ObjectInfo(key, len(data), str(resp["etag"]).strip('"'), resp["last_modified"].timestamp())

    def _start_upload_sync(self, key: str) -> str:
        return uuid.uuid4().hex

    def _upload_part_sync(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        if not _UPLOAD_ID.match(upload_id):
            raise NotFound(f"upload part {number} of {key!r}: no such upload")
        block = block_id(upload_id, number)
        self._run(f"upload part {number} of {key!r}", self.container.get_blob_client(key).stage_block,
                  block, data, length=len(data), validate_content=True)
        return block

    def _complete_upload_sync(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                              size: int) -> ObjectInfo:
        # Committing the same list again (after a lost answer) is fine: a block id is looked
        # for among the uncommitted blocks, then among the committed ones.
        resp = self._run(f"complete upload of {key!r}", self.container.get_blob_client(key).commit_block_list,
                         [BlobBlock(block_id=token) for _, token in parts])
        return ObjectInfo(key, size, str(resp["etag"]).strip('"'), resp["last_modified"].timestamp())

    def _abort_upload_sync(self, key: str, upload_id: str) -> None:
        pass  # nothing to delete: see the module docstring

    async def start_upload(self, key: str) -> str:
        return self._start_upload_sync(key)  # no request: not counted as one, nothing to retry

    async def abort_upload(self, key: str, upload_id: str) -> None:
        self._abort_upload_sync(key, upload_id)

    def _delete_sync(self, key: str) -> None:
        with contextlib.suppress(NotFound):
            self._run(f"delete {key!r}", self.container.get_blob_client(key).delete_blob)

    def _copy_sync(self, src: str, dst: str, size: int) -> ObjectInfo:
        what = f"copy {src!r} to {dst!r}"
        # The source's URL carries the SAS when that is the credential; it goes to the store
        # only, never into a message.
        source = self.container.get_blob_client(src).url
        dest = self.container.get_blob_client(dst)
        started = self._run(what, dest.start_copy_from_url, source)
        copy_id = started.get("copy_id")
        deadline = time.monotonic() + self.timeout
        delay = COPY_POLL_FIRST
        while True:
            props = self._run(what, dest.get_blob_properties)
            status = props.copy.status
            if copy_id and props.copy.id and props.copy.id != copy_id:
                raise ObjectChanged(f"{what}: {dst!r} was replaced while it was copied")
            if status in (None, "success"):
                return ObjectInfo(dst, int(props.size), str(props.etag).strip('"'),
                                  props.last_modified.timestamp())
            if status in ("failed", "aborted"):
                raise BackendError(f"{what}: the copy {status}")
            if time.monotonic() + delay > deadline:
                try:
                    self._run(what, dest.abort_copy, copy_id)
                except BackendError as exc:
                    log.debug("%s: abort of the unfinished copy failed: %s", what, exc)
                raise TemporaryFailure(f"{what}: not finished within {self.timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, COPY_POLL_MAX)

    def _close_sync(self) -> None:
        self.service.close()
        self.rest.close()
