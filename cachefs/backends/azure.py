"""Azure Blob Storage through azure-storage-blob (credentials: see ``_credential``).

Credentials are read from the environment (or files named by ``*_FILE`` variables, the shape a
Kubernetes Secret mounted as a volume has), in this order: a connection string, an account key,
a SAS token, else ``DefaultAzureCredential`` (managed identity, workload identity, Azure CLI).
The SDK's own retries are off; ``retry.py`` owns them.

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
from typing import Any

from azure.core import exceptions as azexc
from azure.storage.blob import BlobBlock, BlobPrefix, BlobServiceClient
from azure.storage.blob._generated.models import ModifiedAccessConditions

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


def env_secret(name: str) -> str | None:
    """The value of $NAME, or the stripped contents of the file named by $NAME_FILE."""
    value = os.environ.get(name)
    if value:
        return value
    path = os.environ.get(name + "_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read {name}_FILE {path!r}: {exc.strerror}") from exc
    return None


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
        secrets: list[str] = []
        if conn_str:
            secrets.append(conn_str)
            secrets.extend(p.split("=", 1)[1] for p in conn_str.split(";")
                           if p.startswith(("AccountKey=", "SharedAccessSignature=")))
            service = BlobServiceClient.from_connection_string(conn_str, **opts)
        else:
            if not account:
                raise UsageError("no Azure account: use --account, AZURE_STORAGE_ACCOUNT, an account "
                                 "in the URL, or AZURE_STORAGE_CONNECTION_STRING")
            url = endpoint_url or f"https://{account}.blob.core.windows.net"
            key = env_secret("AZURE_STORAGE_KEY")
            sas = env_secret("AZURE_STORAGE_SAS_TOKEN")
            credential: Any
            if key:
                credential = {"account_name": account, "account_key": key}
                secrets.append(key)
            elif sas:
                credential = sas.lstrip("?")
                secrets.append(credential)
            else:
                from azure.identity import DefaultAzureCredential

                credential = DefaultAzureCredential()
            service = BlobServiceClient(url, credential=credential, **opts)
        self.secrets = tuple(secrets)
        self.service = service
        self.container = service.get_container_client(source.bucket)
        self.endpoint = service.url.split("?")[0]

    def translate(self, exc: Exception, what: str) -> BackendError:
        if isinstance(exc, azexc.ResourceNotFoundError):
            return NotFound(f"{what}: not found")
        if isinstance(exc, azexc.ResourceModifiedError):
            return ObjectChanged(f"{what}: object changed")
        if isinstance(exc, azexc.ClientAuthenticationError):
            return AccessDenied(f"{what}: access denied")
        if isinstance(exc, azexc.HttpResponseError):
            status = exc.status_code or 0
            code = getattr(exc, "error_code", None) or ""
            code = str(getattr(code, "value", code))  # a StorageErrorCode (str enum) or a str
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
        if isinstance(exc, azexc.ServiceRequestError):
            return Unreachable(f"{what}: cannot connect to {self.endpoint}")
        if type(exc).__name__ == "CredentialUnavailableError":
            return AccessDenied(f"{what}: no Azure credentials found (set "
                                "AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_KEY, "
                                "AZURE_STORAGE_SAS_TOKEN or use a managed identity)")
        return TemporaryFailure(f"{what}: {type(exc).__name__}")

    def _run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BackendError:
            raise
        except Exception as exc:
            raise self.translate(exc, what) from exc

    def _check_sync(self) -> None:
        def probe() -> None:
            pages = self.container.list_blobs(name_starts_with=self.source.prefix or None,
                                              results_per_page=1).by_page()
            next(pages, None)

        try:
            self._run(f"container {self.source.bucket}", probe)
        except NotFound as exc:
            raise NotFound(f"container {self.source.bucket!r} does not exist") from exc

    def _list_sync(self, prefix: str, delimiter: str | None, token: str | None) -> ListPage:
        def fetch() -> ListPage:
            it: Any
            if delimiter:
                it = self.container.walk_blobs(name_starts_with=prefix or None, delimiter=delimiter,
                                               results_per_page=self.page_size)
            else:
                it = self.container.list_blobs(name_starts_with=prefix or None,
                                               results_per_page=self.page_size)
            pages: Any = it.by_page(continuation_token=token)
            page = ListPage()
            for item in next(pages, []):
                if isinstance(item, BlobPrefix):
                    page.prefixes.append(item.name)
                else:
                    page.objects.append(ObjectInfo(item.name, int(item.size),
                                                   str(item.etag).strip('"'),
                                                   item.last_modified.timestamp()))
            page.token = pages.continuation_token or None
            return page

        return self._run(f"list {prefix!r}", fetch)

    def _head_sync(self, key: str) -> ObjectInfo:
        props = self._run(f"head {key!r}", self.container.get_blob_client(key).get_blob_properties)
        return ObjectInfo(key, int(props.size), str(props.etag).strip('"'),
                          props.last_modified.timestamp())

    def _get_sync(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        # Not download_blob(): its downloader silently requests a body that was cut short again,
        # up to 3 times 1 s apart, inside one call, so its retries would multiply with retry.py's
        # and escape the metrics. The generated operation it wraps makes exactly one request.
        conditions = ModifiedAccessConditions(if_match=f'"{etag}"') if etag else None

        def fetch() -> bytes:
            client = self.container.get_blob_client(key)
            stream = client._client.blob.download(range=f"bytes={start}-{start + length - 1}",
                                                  modified_access_conditions=conditions, decompress=False)
            return b"".join(stream)

        return self._run(f"get {key!r}", fetch)

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
