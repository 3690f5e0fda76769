"""Every Prometheus metric cachefs exports, in one place.

Names follow ``cachefs_<noun>_<unit>`` with ``_total`` for counters. Label values come from
small fixed sets (operations, outcomes, errno names), never from object keys or paths, and the
common series are created up front so dashboards see zeros instead of gaps.
"""

from __future__ import annotations

import errno as errno_mod

from prometheus_client import Counter, Gauge, Histogram

BACKEND_OPERATIONS = ("list", "head", "get", "put", "delete", "copy")
BACKEND_OUTCOMES = ("ok", "not_found", "error")
FUSE_OPERATIONS = (
    "lookup", "getattr", "readdir", "opendir", "open", "read", "release", "statfs",
    "getxattr", "listxattr", "forget", "write", "create", "flush", "fsync", "setattr", "mkdir",
    "rmdir", "unlink", "rename",
)
# How an upload failed, as the writer saw it (EIO: the store, after retries; ENOSPC: the staging
# disk or the cache capacity; ESTALE: the object changed while an append copied it).
UPLOAD_ERRNOS = ("EIO", "ENOSPC", "ESTALE")
READ_SOURCES = ("cache", "backend")
FETCH_SOURCES = ("tier", "origin")  # where a block download came from (the tier: --tier-endpoint-url)
# Why a block was read from the origin instead of the cache tier: the tier did not have the
# object, had another version, did not answer in time, could not be reached, refused the
# credentials, failed otherwise, or was being skipped after a timeout, unreachable or denied.
TIER_FALLBACKS = ("missing", "stale", "timeout", "unreachable", "denied", "error", "backoff")
PREFETCH_STATES = ("queued", "done", "failed")
ORDER_OUTCOMES = ("ahead", "waited")

# Backend latency: loopback answers in ~1 ms, cloud object stores in 10-100 ms, throttled or
# retried requests take seconds.
BACKEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# FUSE operations: served from LMDB or the local cache in tens of microseconds; a miss costs a
# backend round trip.
FUSE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 1, 5, 30)

read_bytes = Counter("cachefs_read_bytes", "Bytes returned to readers, by where they came from",
                     ["source"])
cache_hits = Counter("cachefs_cache_hits", "Reads answered from the local data cache")
cache_misses = Counter("cachefs_cache_misses", "Reads that had to go to the backend")
cache_used = Gauge("cachefs_cache_used_bytes", "Bytes of object data in the local cache")
cache_capacity = Gauge("cachefs_cache_capacity_bytes", "Configured capacity of the data cache")
cache_evictions = Counter("cachefs_cache_evictions", "Cache entries evicted to make room")
cache_rejected = Counter("cachefs_cache_admission_rejected",
                         "Downloads served but not cached because the cache was full")
cache_write_errors = Counter("cachefs_cache_write_errors",
                             "Failures writing the cache dir (e.g. disk full); reads fall back to the backend")
fetched = Counter("cachefs_block_fetches", "Block downloads, by where they came from (tier, origin)",
                  ["source"])
fetched_bytes = Counter("cachefs_block_fetch_bytes",
                        "Bytes of block downloads, by where they came from (tier, origin)", ["source"])
tier_fallbacks = Counter("cachefs_tier_fallbacks",
                         "Block downloads the cache tier did not serve (read from the origin), by reason",
                         ["reason"])
tier_duration = Histogram("cachefs_tier_request_duration_seconds",
                          "Latency of block downloads served by the cache tier", buckets=BACKEND_BUCKETS)
listing_objects = Gauge("cachefs_listing_objects", "Objects in the local listing")
listing_bytes = Gauge("cachefs_listing_bytes", "Total size of objects in the local listing")
backend_requests = Counter("cachefs_backend_requests", "Requests to the object store",
                           ["operation", "outcome"])
backend_duration = Histogram("cachefs_backend_request_duration_seconds",
                             "Latency of object store requests", ["operation"],
                             buckets=BACKEND_BUCKETS)
backend_retries = Counter("cachefs_backend_retries", "Object store requests retried",
                          ["operation"])
fuse_operations = Counter("cachefs_fuse_operations", "FUSE requests handled", ["operation"])
fuse_duration = Histogram("cachefs_fuse_operation_duration_seconds",
                          "Time to answer FUSE requests", ["operation"], buckets=FUSE_BUCKETS)
fuse_errors = Counter("cachefs_fuse_errors", "FUSE requests answered with an error",
                      ["operation", "errno"])
prefetch_objects = Counter("cachefs_prefetch_objects", "Objects through the prefetcher",
                           ["state"])
prefetch_bytes = Counter("cachefs_prefetch_bytes", "Bytes through the prefetcher", ["state"])
prefetch_pending = Gauge("cachefs_prefetch_pending_objects",
                         "Objects queued for prefetch and not yet done")
order_items = Counter("cachefs_order_items", "Items announced in read orders (every epoch counts)")
order_reads = Counter("cachefs_order_reads", "Reads of announced items: cached ahead of the reader "
                      "in time, or the reader waited for the backend", ["outcome"])
order_lead = Gauge("cachefs_order_lead_items", "Announced items fetched ahead of their readers")
write_bytes = Counter("cachefs_write_bytes", "Bytes written to files through the mount")
upload_bytes = Counter("cachefs_upload_bytes", "Bytes uploaded to the object store (PUTs and parts)")
uploads_in_flight = Gauge("cachefs_uploads_in_flight", "PUTs and part uploads in progress")
upload_failures = Counter("cachefs_upload_failures", "Uploads of written files that failed, by the "
                          "errno the writer saw", ["errno"])
write_staged_bytes = Gauge("cachefs_write_staged_bytes",
                           "Bytes written through the mount and held on the cache disk until uploaded")


def errno_name(code: int) -> str:
    return errno_mod.errorcode.get(code, "EUNKNOWN")


def _precreate() -> None:
    for src in READ_SOURCES:
        read_bytes.labels(src)
    for src in FETCH_SOURCES:
        fetched.labels(src)
        fetched_bytes.labels(src)
    for reason in TIER_FALLBACKS:
        tier_fallbacks.labels(reason)
    for op in BACKEND_OPERATIONS:
        backend_duration.labels(op)
        backend_retries.labels(op)
        for outcome in BACKEND_OUTCOMES:
            backend_requests.labels(op, outcome)
    for op in FUSE_OPERATIONS:
        fuse_operations.labels(op)
        fuse_duration.labels(op)
    for code in UPLOAD_ERRNOS:
        upload_failures.labels(code)
    for outcome in ORDER_OUTCOMES:
        order_reads.labels(outcome)
    for state in PREFETCH_STATES:
        prefetch_objects.labels(state)
        prefetch_bytes.labels(state)


_precreate()


def exported_names() -> set[str]:
    """Metric family names as they appear in /metrics (counters with their _total suffix)."""
    from prometheus_client import REGISTRY

    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("cachefs_"):
            continue
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names
