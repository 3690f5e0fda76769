"""The cluster-shared cache tier: an S3 endpoint (SeaweedFS remote-mounting the origin bucket)
that serves block GETs for the same keys as the origin, so that N nodes download an object
from the origin once instead of N times.

The origin stays the authority: listings and HEADs come from it, and a block from the tier is
used only if the tier's answer describes the version the listing names. The tier does not keep
the origin's ETag in its S3 answers (SeaweedFS reports an ETag of its own), so the check is on
what it does keep: the object's total size (from Content-Range) and its Last-Modified, to the
second. An origin object overwritten with the same size within the same second as the version
the tier holds is therefore indistinguishable; see docs/decisions.md for that window.

Anything else the tier does — an error, no answer within ``timeout``, an object it does not
have, another version — is a *miss*: ``get_then`` returns None, the miss is counted by reason
(``metrics.TIER_FALLBACKS``), and the caller reads the block from the origin. A tier that cannot
be reached or does not answer in time is skipped for ``BACKOFF`` seconds, so a dead tier costs
one timeout per ``BACKOFF``, not one per block; so is one that refuses our credentials. Nothing
here raises into the read path.

Credentials are the tier's own: ``CACHEFS_TIER_ACCESS_KEY_ID`` / ``CACHEFS_TIER_SECRET_ACCESS_KEY``
(each also as ``..._FILE`` naming a file that holds it); without them requests are unsigned
(a gateway that allows anonymous reads, e.g. one reachable only inside the cluster).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import trio

from .. import metrics
from ..errors import UsageError

log = logging.getLogger(__name__)
T = TypeVar("T")

ACCESS_KEY_ENV = "CACHEFS_TIER_ACCESS_KEY_ID"
SECRET_KEY_ENV = "CACHEFS_TIER_SECRET_ACCESS_KEY"
ACCESS_KEY_ID_ENV_HINT = f"{ACCESS_KEY_ENV} / {SECRET_KEY_ENV}"
CONNECT_TIMEOUT = 2.0  # seconds: the tier is in the cluster; slower than this is down
BACKOFF = 10.0  # seconds the tier is skipped after it was unreachable, too slow or refused us
# Misses that say the tier as a whole cannot serve now (not: this object is not there, or old).
SKIPPED_AFTER = ("unreachable", "timeout", "denied")


class Miss(Exception):
    """The tier did not serve the block; ``reason`` is one of ``metrics.TIER_FALLBACKS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


def _credential(name: str, environ: dict[str, str]) -> str | None:
    value = environ.get(name)
    if value:
        return value
    path = environ.get(name + "_FILE")
    if path:
        try:
            with open(path) as f:
                return f.read().strip() or None
        except OSError as exc:
            raise UsageError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    return None


class Tier:
    """Block GETs from the tier's S3 endpoint, checked against the listed version."""

    def __init__(self, endpoint_url: str, bucket: str, *, timeout: float, max_connections: int,
                 environ: dict[str, str] | None = None) -> None:
        from obstore.store import S3Store

        env = dict(os.environ if environ is None else environ)
        access, secret = _credential(ACCESS_KEY_ENV, env), _credential(SECRET_KEY_ENV, env)
        if bool(access) != bool(secret):
            raise UsageError(f"set both {ACCESS_KEY_ENV} and {SECRET_KEY_ENV} (or neither, for an "
                             "anonymous tier)")
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.timeout = timeout
        #: values that must never appear in logs or errors
        self.secrets: tuple[str, ...] = (secret,) if secret else ()
        config: dict[str, Any] = {"endpoint": endpoint_url, "region": "us-east-1",
                                  "virtual_hosted_style_request": False}
        if access:
            config.update(access_key_id=access, secret_access_key=secret)
        else:
            config["skip_signature"] = True
        self.store = S3Store(
            bucket,
            config=config,  # type: ignore[arg-type]
            client_options={"allow_http": endpoint_url.startswith("http://"),
                            "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT),
                            "timeout": timedelta(seconds=timeout),
                            "pool_max_idle_per_host": str(max_connections)},
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1)},
        )
        self.limiter = trio.CapacityLimiter(max_connections)
        self._skip_until = 0.0  # trio.current_time() until which the tier is considered down
        self._quiet_until = 0.0  # no warning about single errors until then
        self._errors = 0  # errors since the last warning

    def describe(self) -> str:
        return f"{self.endpoint_url}/{self.bucket}"

    async def get_then(self, key: str, start: int, length: int, size: int, mtime_ns: int,
                       then: Callable[[bytes], T]) -> tuple[bytes, T] | None:
        """Bytes [start, start+length) of ``key`` if the tier holds the listed version (``size``
        bytes, last modified at ``mtime_ns``), with ``then(data)`` run in the same worker
        thread (see ``Backend.get_range_then``); None after a miss, which is counted."""
        if trio.current_time() < self._skip_until:
            metrics.tier_fallbacks.labels("backoff").inc()
            return None
        began = time.monotonic()
        try:
            with trio.move_on_after(self.timeout) as scope:
                result = await trio.to_thread.run_sync(
                    self._get_sync, key, start, length, size, mtime_ns, then,
                    limiter=self.limiter, abandon_on_cancel=True)
            if scope.cancelled_caught:
                raise Miss("timeout", f"no answer within {self.timeout:g} s")
        except Miss as miss:
            self._missed(key, miss)
            return None
        metrics.tier_duration.observe(time.monotonic() - began)
        if self._skip_until:
            self._skip_until = 0.0
            log.info("cache tier %s answers again", self.describe())
        return result

    def _missed(self, key: str, miss: Miss) -> None:
        metrics.tier_fallbacks.labels(miss.reason).inc()
        now = trio.current_time()
        if miss.reason in SKIPPED_AFTER:
            if not self._skip_until:
                log.warning("cache tier %s: %s; reading from the origin, trying the tier again in %g s",
                            self.describe(), miss, BACKOFF)
            self._skip_until = now + BACKOFF
        elif miss.reason == "error":  # one object's trouble: at most one line per BACKOFF
            self._errors += 1
            if now >= self._quiet_until:
                log.warning("cache tier %s: get %r: %s; read from the origin (%d such errors since "
                            "the last report)", self.describe(), key, miss, self._errors)
                self._errors = 0
                self._quiet_until = now + BACKOFF
        else:
            log.debug("cache tier %s: get %r: %s; read from the origin", self.describe(), key, miss)

    def _get_sync(self, key: str, start: int, length: int, size: int, mtime_ns: int,
                  then: Callable[[bytes], T]) -> tuple[bytes, T]:
        import obstore
        from obstore import exceptions as obexc

        if key.startswith("/") or key.endswith("/"):
            raise Miss("error", "a key the S3 client cannot express")
        try:
            result = obstore.get(self.store, key, options={"range": (start, start + length)})
            meta = result.meta
            if meta["size"] != size:
                raise Miss("stale", f"{meta['size']} bytes, listed {size}")
            if int(meta["last_modified"].timestamp()) != mtime_ns // 1_000_000_000:
                raise Miss("stale", f"last modified {meta['last_modified']:%Y-%m-%dT%H:%M:%S}, "
                           f"listed {time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(mtime_ns / 1e9))}")
            data = bytes(result.bytes())
        except Miss:
            raise
        except obexc.NotFoundError as exc:
            raise Miss("missing", "not in the tier") from exc
        except (obexc.PermissionDeniedError, obexc.UnauthenticatedError) as exc:
            raise Miss("denied", f"access denied (check {ACCESS_KEY_ID_ENV_HINT})") from exc
        except (ValueError, obexc.InvalidPathError) as exc:
            raise Miss("error", "a key the S3 client cannot express") from exc
        except Exception as exc:  # connection refused or reset, HTTP errors, bodies cut short
            text = str(exc).lower()
            if "timed out" in text:
                raise Miss("timeout", "no answer in time") from exc
            if "connect" in text:
                raise Miss("unreachable", "cannot connect") from exc
            raise Miss("error", type(exc).__name__) from exc
        if len(data) != length:
            raise Miss("error", f"short read: {len(data)} of {length} bytes")
        return data, then(data)
