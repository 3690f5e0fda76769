"""The backend interface: list a prefix, head, ranged get pinned to an ETag; and the write half:
put, multipart (block) uploads, delete, server-side copy.

Subclasses implement blocking ``_*_sync`` methods with their SDK and ``translate`` for its
exceptions. This base class runs them in worker threads under one ``CapacityLimiter`` (so the
trio thread never blocks on the network), retries temporary failures with ``retry.retrying``,
and records metrics. Subclasses raise only ``errors`` exceptions.

Invariants of the write half, on every backend:

- every ``_*_sync`` write may be run again after an attempt whose answer was lost (that is what
  a retry does): put, upload_part, copy and delete are idempotent, complete_upload recognises an
  upload it already completed, abort_upload and delete treat "not there" as done;
- an object is never visible half-written: put, complete_upload and copy replace it atomically;
- the ETag a write returns is the one ``list_page`` and ``head`` report for that version (the
  daemon keys cached data by it), and a later ``get_range`` returns exactly the bytes written;
- a key ending in "/" is a directory marker: an empty object on S3 and Azure, a directory on
  the local backend (which lists directories as prefixes, never as objects).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import trio

from .. import metrics
from ..errors import BackendError, NotFound, TemporaryFailure
from ..retry import retrying
from ..source import Source

T = TypeVar("T")


class ObjectInfo(NamedTuple):
    """One object as listed or written. A named tuple: listings make one per key, and a frozen
    dataclass costs ~5x the CPU to create."""

    key: str  # full key in the bucket
    size: int
    etag: str  # without quotes
    mtime: float  # seconds since the epoch


@dataclass(slots=True)
class ListPage:
    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)  # common prefixes, each ending in "/"
    token: str | None = None  # continuation; None when this was the last page


class Backend(abc.ABC):
    """One bucket/container (or directory) seen through an object-store API."""

    #: Page size asked of the store; S3 and Azure both cap at 1000 (Azure 5000).
    page_size = 1000
    #: The smallest part ``upload_part`` accepts, but for the last one (S3: 5 MiB).
    min_part_size = 1

    def __init__(self, source: Source, *, timeout: float, max_connections: int) -> None:
        self.source = source
        self.timeout = timeout
        self.limiter = trio.CapacityLimiter(max_connections)
        #: values that must never appear in logs or errors (filled by subclasses)
        self.secrets: tuple[str, ...] = ()

    # -- what subclasses implement (blocking, run in threads) --------------------------------

    @abc.abstractmethod
    def _check_sync(self) -> None:
        """Raise NotFound / AccessDenied / Unreachable if the bucket cannot be used."""

    @abc.abstractmethod
    def _list_sync(self, prefix: str, delimiter: str | None, token: str | None) -> ListPage: ...

    @abc.abstractmethod
    def _head_sync(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def _get_sync(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        """Return exactly ``length`` bytes from ``start`` (or fewer only at the object's end),
        raising ObjectChanged if the object's ETag is no longer ``etag``."""

    @abc.abstractmethod
    def _put_sync(self, key: str, data: bytes) -> ObjectInfo:
        """Create or replace ``key`` with ``data`` in one request."""

    @abc.abstractmethod
    def _start_upload_sync(self, key: str) -> str:
        """Begin a multipart upload to ``key``; its upload id."""

    @abc.abstractmethod
    def _upload_part_sync(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        """Upload part ``number`` (1-based; again: the last one wins); the part's token."""

    @abc.abstractmethod
    def _complete_upload_sync(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                              size: int) -> ObjectInfo:
        """Make ``key`` the concatenation of ``parts`` ((number, token) in order), ``size``
        bytes; also when an earlier attempt did so and its answer was lost."""

    @abc.abstractmethod
    def _abort_upload_sync(self, key: str, upload_id: str) -> None:
        """Drop an upload's parts; an unknown upload is not an error."""

    @abc.abstractmethod
    def _delete_sync(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    @abc.abstractmethod
    def _copy_sync(self, src: str, dst: str, size: int) -> ObjectInfo:
        """Copy ``src`` (``size`` bytes) to ``dst`` inside the store, replacing ``dst``."""

    def _close_sync(self) -> None:  # noqa: B027 - optional hook
        pass

    # -- the async interface the daemon uses ---------------------------------------------------

    async def _call(self, operation: str, fn: Callable[[], T]) -> T:
        async def attempt() -> T:
            start = time.monotonic()
            outcome = "error"
            try:
                result = await trio.to_thread.run_sync(fn, limiter=self.limiter,
                                                       abandon_on_cancel=True)
                outcome = "ok"
                return result
            except NotFound:
                outcome = "not_found"
                raise
            except BackendError:
                raise
            except Exception as exc:  # an SDK error the subclass did not translate
                raise TemporaryFailure(f"{operation}: {type(exc).__name__}") from exc
            finally:
                metrics.backend_requests.labels(operation, outcome).inc()
                metrics.backend_duration.labels(operation).observe(time.monotonic() - start)

        return await retrying(operation, attempt, self.timeout)

    async def check(self) -> None:
        await self._call("list", self._check_sync)

    async def list_page(self, prefix: str, delimiter: str | None = "/",
                        token: str | None = None) -> ListPage:
        return await self._call("list", lambda: self._list_sync(prefix, delimiter, token))

    async def head(self, key: str) -> ObjectInfo:
        return await self._call("head", lambda: self._head_sync(key))

    async def get_range(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        return await self._call("get", lambda: self._checked_get(key, start, length, etag))

    async def get_range_then(self, key: str, start: int, length: int, etag: str | None,
                             then: Callable[[bytes], T]) -> tuple[bytes, T]:
        """Like ``get_range``, and run ``then(data)`` in the same worker thread right after the
        GET (e.g. write the cache file): one thread hop per download instead of two. ``then``
        must not raise (return its error instead): an exception would be retried as a GET."""
        def call() -> tuple[bytes, T]:
            data = self._checked_get(key, start, length, etag)
            return data, then(data)

        return await self._call("get", call)

    def _checked_get(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        data = self._get_sync(key, start, length, etag)
        if len(data) != length:
            # A body cut short by the network; never hand it on as if it were the object.
            raise TemporaryFailure(f"short read of {key!r}: {len(data)} of {length} bytes")
        return data

    # -- writes ---------------------------------------------------------------------------------

    async def put(self, key: str, data: bytes) -> ObjectInfo:
        """Create or replace ``key`` in one request (``key`` ending in "/" with b"": a marker)."""
        return await self._call("put", lambda: self._put_sync(key, data))

    async def start_upload(self, key: str) -> str:
        """Begin a multipart upload; its id for the calls below."""
        return await self._call("put", lambda: self._start_upload_sync(key))

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        """Upload part ``number`` (1-based; each but the last at least ``min_part_size``
        bytes). Uploading a number again replaces that part. Returns the token
        ``complete_upload`` wants for it."""
        if number < 1:
            raise ValueError(f"part numbers start at 1, not {number}")
        return await self._call("put", lambda: self._upload_part_sync(key, upload_id, number, data))

    async def complete_upload(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                              size: int) -> ObjectInfo:
        """Publish the upload: ``key`` becomes the ``parts`` ((number, token), in order),
        ``size`` bytes in all, at once."""
        parts = list(parts)
        return await self._call("put", lambda: self._complete_upload_sync(key, upload_id, parts, size))

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Drop an upload's parts (best effort; an upload already gone is fine)."""
        await self._call("put", lambda: self._abort_upload_sync(key, upload_id))

    async def delete(self, key: str) -> None:
        """Delete ``key`` (a marker when it ends in "/"); a missing key is not an error."""
        await self._call("delete", lambda: self._delete_sync(key))

    async def copy(self, src: str, dst: str, size: int) -> ObjectInfo:
        """Copy ``src`` (``size`` bytes) to ``dst`` inside the store, replacing ``dst``."""
        if src == dst:  # S3 refuses a copy onto itself that changes nothing
            return await self.head(dst)
        return await self._call("copy", lambda: self._copy_sync(src, dst, size))

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close_sync)

    def describe(self) -> str:
        return self.source.url
