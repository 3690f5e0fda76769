"""The backend interface: list a prefix, head, ranged get pinned to an ETag.

Subclasses implement blocking ``_*_sync`` methods with their SDK and ``translate`` for its
exceptions. This base class runs them in worker threads under one ``CapacityLimiter`` (so the
trio thread never blocks on the network), retries temporary failures with ``retry.retrying``,
and records metrics. Subclasses raise only ``errors`` exceptions.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from .. import metrics
from ..errors import BackendError, NotFound, TemporaryFailure
from ..retry import retrying
from ..source import Source

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
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

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close_sync)

    def describe(self) -> str:
        return self.source.url
