"""S3 and IBM COS (any S3-compatible store via an endpoint URL).

boto3 resolves credentials with the standard AWS chain (environment, shared files and profiles,
IRSA web identity, instance roles) and does listing and HEAD. Ranged GETs — the hot path, one per
small file — go through obstore (Rust ``object_store``; releases the GIL) fed with boto3's
credentials: it costs ~10x less CPU per request than botocore, which otherwise caps a daemon at a
few hundred small files per second per core (see bench/RESULTS.md). ``CACHEFS_S3_DATA_PATH=boto3``
switches the GETs back to boto3 (for comparison, or a store obstore cannot talk to).

No SDK retries its own requests (``retry.py`` owns retries), and path-style addressing is used
with a custom endpoint, which IBM COS, MinIO and SeaweedFS expect.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from ..errors import AccessDenied, BackendError, NotFound, ObjectChanged, TemporaryFailure, Unreachable
from ..source import Source
from .base import Backend, ListPage, ObjectInfo

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5  # seconds; an endpoint that does not accept a TCP connection in 5 s is down
READ_TIMEOUT = 30  # seconds without a byte on an open connection

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden",
           "AccountProblem", "InvalidToken", "ExpiredToken"}
_CHANGED = {"412", "PreconditionFailed"}


class S3Backend(Backend):
    def __init__(self, source: Source, *, endpoint_url: str | None, region: str | None,
                 profile: str | None, timeout: float, max_connections: int) -> None:
        super().__init__(source, timeout=timeout, max_connections=max_connections)
        self.endpoint_url = endpoint_url
        try:
            session = boto3.session.Session(profile_name=profile, region_name=region)
        except botocore.exceptions.ProfileNotFound as exc:
            raise AccessDenied(f"AWS profile {profile!r} not found") from exc
        config = Config(
            retries={"total_max_attempts": 1},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            max_pool_connections=max_connections,
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # Only sign what is sent; newer botocore adds CRC checksums some stores reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        creds = session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            self.secrets = tuple(s for s in (frozen.secret_key, frozen.token) if s)
        self.data_path = os.environ.get("CACHEFS_S3_DATA_PATH", "obstore")
        self.store: Any = None
        if self.data_path == "obstore" and creds is not None:
            self.store = self._obstore(session, endpoint_url, max_connections)

    def _obstore(self, session: boto3.session.Session, endpoint_url: str | None, max_connections: int) -> Any:
        from obstore.auth.boto3 import Boto3CredentialProvider
        from obstore.store import S3Store

        region = session.region_name or "us-east-1"
        config: dict[str, Any] = {"region": region}
        if endpoint_url:
            config.update(endpoint=endpoint_url, virtual_hosted_style_request=False)
        return S3Store(
            self.source.bucket,
            config=config,  # type: ignore[arg-type]
            client_options={"allow_http": bool(endpoint_url and endpoint_url.startswith("http://")),
                            "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT),
                            "timeout": timedelta(seconds=READ_TIMEOUT),
                            "pool_max_idle_per_host": str(max_connections)},
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1)},
            credential_provider=Boto3CredentialProvider(session),
        )

    def translate(self, exc: Exception, what: str) -> BackendError:
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _NOT_FOUND or status == "404":
                return NotFound(f"{what}: not found")
            if code in _DENIED or status == "403":
                return AccessDenied(f"{what}: access denied ({code or status})")
            if code in _CHANGED or status == "412":
                return ObjectChanged(f"{what}: object changed")
            return TemporaryFailure(f"{what}: {code or status or 'error'}")
        if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
            return AccessDenied(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role)")
        if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError):
            return Unreachable(f"{what}: cannot connect to {self.endpoint_url or 'S3'}")
        if isinstance(exc, botocore.exceptions.BotoCoreError | OSError):
            return TemporaryFailure(f"{what}: {type(exc).__name__}")
        return TemporaryFailure(f"{what}: {type(exc).__name__}")

    def _run(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except BackendError:
            raise
        except Exception as exc:
            raise self.translate(exc, what) from exc

    def _check_sync(self) -> None:
        try:
            self._run(f"bucket {self.source.bucket}", self.client.list_objects_v2,
                      Bucket=self.source.bucket, Prefix=self.source.prefix, MaxKeys=1)
        except NotFound as exc:
            raise NotFound(f"bucket {self.source.bucket!r} does not exist") from exc

    def _list_sync(self, prefix: str, delimiter: str | None, token: str | None) -> ListPage:
        kwargs: dict[str, Any] = {"Bucket": self.source.bucket, "Prefix": prefix,
                                  "MaxKeys": self.page_size}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token:
            kwargs["ContinuationToken"] = token
        resp = self._run(f"list {prefix!r}", self.client.list_objects_v2, **kwargs)
        page = ListPage(
            objects=[ObjectInfo(o["Key"], int(o["Size"]), o.get("ETag", "").strip('"'),
                                o["LastModified"].timestamp()) for o in resp.get("Contents", ())],
            prefixes=[p["Prefix"] for p in resp.get("CommonPrefixes", ())],
            token=resp.get("NextContinuationToken") if resp.get("IsTruncated") else None,
        )
        return page

    def _head_sync(self, key: str) -> ObjectInfo:
        resp = self._run(f"head {key!r}", self.client.head_object, Bucket=self.source.bucket, Key=key)
        return ObjectInfo(key, int(resp["ContentLength"]), resp.get("ETag", "").strip('"'),
                          resp["LastModified"].timestamp())

    def _get_sync(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        if self.store is not None:
            data = self._get_obstore(key, start, length, etag)
            if data is not None:
                return data
        kwargs: dict[str, Any] = {"Bucket": self.source.bucket, "Key": key,
                                  "Range": f"bytes={start}-{start + length - 1}"}
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'
        resp = self._run(f"get {key!r}", self.client.get_object, **kwargs)
        try:
            body = resp["Body"]
            try:
                return body.read()
            finally:
                body.close()
        except Exception as exc:  # the connection broke mid-body
            raise TemporaryFailure(f"get {key!r}: body interrupted ({type(exc).__name__})") from exc

    def _get_obstore(self, key: str, start: int, length: int, etag: str | None) -> bytes | None:
        """The bytes, or None for a key obstore cannot express (its paths drop a leading or
        trailing "/" and refuse control characters, "." and ".." segments): boto3 gets those."""
        import obstore
        from obstore import exceptions as obexc

        if key.startswith("/") or key.endswith("/"):
            return None
        options: dict[str, Any] = {"range": (start, start + length)}
        if etag:
            options["if_match"] = f'"{etag}"'
        try:
            return bytes(obstore.get(self.store, key, options=options).bytes())  # type: ignore[arg-type]
        except obexc.NotFoundError as exc:
            raise NotFound(f"get {key!r}: not found") from exc
        except obexc.PreconditionError as exc:
            raise ObjectChanged(f"get {key!r}: object changed") from exc
        except (obexc.PermissionDeniedError, obexc.UnauthenticatedError) as exc:
            raise AccessDenied(f"get {key!r}: access denied") from exc
        except (ValueError, obexc.InvalidPathError):
            return None  # "Could not parse path": not a network error, nothing to retry
        except Exception as exc:  # connection errors, 5xx, throttling, bodies cut short
            raise TemporaryFailure(f"get {key!r}: {type(exc).__name__}") from exc

    def _close_sync(self) -> None:
        self.client.close()
