"""Azure Blob Storage through azure-storage-blob (credentials: see ``_credential``).

Credentials are read from the environment (or files named by ``*_FILE`` variables, the shape a
Kubernetes Secret mounted as a volume has), in this order: a connection string, an account key,
a SAS token, else ``DefaultAzureCredential`` (managed identity, workload identity, Azure CLI).
The SDK's own retries are off; ``retry.py`` owns them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from azure.core import exceptions as azexc
from azure.storage.blob import BlobPrefix, BlobServiceClient
from azure.storage.blob._generated.models import ModifiedAccessConditions

from ..errors import AccessDenied, BackendError, NotFound, ObjectChanged, TemporaryFailure, Unreachable, UsageError
from ..source import Source
from .base import Backend, ListPage, ObjectInfo

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5
READ_TIMEOUT = 30


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
        opts: dict[str, Any] = {"retry_total": 0, "connection_timeout": CONNECT_TIMEOUT,
                                "read_timeout": READ_TIMEOUT, "max_single_get_size": 64 << 20}
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
            if status == 404:
                return NotFound(f"{what}: not found")
            if status == 403:
                return AccessDenied(f"{what}: access denied")
            if status == 412:
                return ObjectChanged(f"{what}: object changed")
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

    def _close_sync(self) -> None:
        self.service.close()
