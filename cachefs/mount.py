"""Daemon wiring: check everything, mount, serve, and unmount cleanly.

Order of events in ``run`` (all errors before the mount are one-line ``CachefsError``s):
1. check the mountpoint (clean up a stale one) and the cache dir;
2. lock the cache namespace; when another daemon has it, a read-only daemon takes a private
   sibling (``namespaces.claim``), a read-write one is refused;
3. open LMDB, build the backend and check the bucket within a bounded time;
4. mount, tell the waiting parent (``ready``) and serve until SIGTERM/SIGINT or an external
   unmount; then stop background work, unmount, and close LMDB. The data cache's evictor and
   its check of the data files against the index (``DataCache.check``) run in the background:
   start-up does not grow with the cache.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import lmdb
import pyfuse3
import trio

from . import control, http, logs, metrics, stack
from .backends import create_backend
from .backends.tier import Tier
from .cache import namespaces
from .cache.prefetch import Prefetcher
from .cache.store import ATIME_BATCH, DataCache
from .cache.writer import Writer
from .config import Fraction, MountConfig
from .errors import BackendError, MountError, TemporaryFailure, UsageError
from .fs.adapter import CachefsOperations
from .fs.core import CoreFS, Settings
from .metadata import MetadataStore
from .metadata.listing import Lister
from .metadata.store import CORRUPTION, DAMAGED, WriteError
from .source import parse_source

log = logging.getLogger(__name__)

CHECK_DEADLINE = 10.0  # seconds to reach the bucket at start before giving up
ATIME_FLUSH_INTERVAL = 10.0
SYNC_INTERVAL = 30.0  # LMDB runs without fsync per commit; flush it this often
ONDEMAND_CONNECTIONS = 64  # backend connections kept free of prefetch for readers
FUSE_MAX_TASKS = 512  # concurrent FUSE requests in flight
PRE_MOUNT_CHECK = 2.0  # seconds of index checking before the mount; the rest runs after it
SHUTDOWN_UPLOAD_DEADLINE = 60.0  # seconds an unmount waits for uploads of closed files


def is_stale(path: str) -> bool:
    """Whether ``path`` is a FUSE mount whose daemon is gone. ``stat`` alone is not enough: the
    kernel answers it from its attribute cache for a day after any ``ls`` of the mountpoint;
    ``statvfs`` always reaches the daemon."""
    for probe in (os.stat, os.statvfs):
        try:
            probe(path)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                return True
    return False


def fuse_unmount(path: str, lazy: bool = False) -> bool:
    """Unmount with fusermount3 (or umount as root). True if it worked."""
    cmds = [["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]]
    if os.geteuid() == 0:
        cmds.append(["umount"] + (["-l"] if lazy else []) + [path])
    for cmd in cmds:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0:
            return True
    return False


def check_pyfuse3() -> None:
    """The kernel-cache modes need cachefs's pyfuse3 patch (third_party/README.md)."""
    if not hasattr(pyfuse3.Operations, "inode_as_fh"):
        raise MountError("the installed pyfuse3 lacks cachefs's patch: "
                         "run third_party/build-pyfuse3.sh with this Python (./install.sh does)")


def check_mountpoint(path: str) -> None:
    if is_stale(path):
        log.warning("%s is a stale mount (its daemon is gone); cleaning it up", path)
        if not fuse_unmount(path, lazy=True):
            raise MountError(f"mountpoint {path} is a stale mount and could not be unmounted")
    if not os.path.exists(path):
        raise MountError(f"mountpoint {path} does not exist")
    if not os.path.isdir(path):
        raise MountError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"mountpoint {path} is already mounted")
    try:
        if os.listdir(path):
            raise MountError(f"mountpoint {path} is not empty")
    except PermissionError:
        raise MountError(f"mountpoint {path} is not readable") from None


def prepare_cache_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise MountError(f"cache dir {path} is not writable: {exc.strerror}") from None


def cache_capacity(cache_dir: str, size: int | Fraction) -> int:
    """The cache capacity in bytes: a size, or a share of the cache dir's filesystem. A size
    larger than that filesystem is said at once: the cache disk is probably not mounted there
    (a DaemonSet on a node without its SSD would fill the root disk)."""
    st = os.statvfs(cache_dir)
    total = st.f_blocks * st.f_frsize
    capacity = size.of(total) if isinstance(size, Fraction) else size
    if capacity > total:
        log.warning("--cache-size %d is larger than the filesystem of %s (%d bytes): is the cache "
                    "disk mounted there? The cache will fill that filesystem", capacity, cache_dir, total)
    return capacity


def control_socket_path(ns_dir: str, path: str | None = None, group: int | None = None) -> str:
    """The control socket: at ``path`` (``--control-socket``) if given; else in the namespace,
    unless that path is too long for a socket name or ``--control-group`` needs a directory the
    group can reach (the cache dir is 0700): then in a fresh private directory (unpredictable
    name) under the temporary directory. Clients find it through the mount's
    ``user.cachefs.control`` attribute."""
    if path is not None:
        if len(path.encode()) >= 108:
            raise MountError(f"--control-socket {path}: longer than a socket name may be (107 bytes)")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise MountError(f"--control-socket {path}: its directory does not exist")
        if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise MountError(f"--control-socket {path}: exists and is not a socket")
        return os.path.abspath(path)
    inside = os.path.join(ns_dir, "control.sock")
    if len(inside.encode()) < 100 and group is None:  # sun_path holds 108 bytes
        return inside
    return os.path.join(control.private_dir(group), "control.sock")


class Daemon:
    def __init__(self, cfg: MountConfig) -> None:
        self.cfg = cfg
        self.source = parse_source(cfg.source, endpoint_url=cfg.endpoint_url, account=cfg.account)
        self.ready = False
        self.mounted_at = 0.0

    async def run(self, on_ready: Callable[[], None]) -> None:
        cfg = self.cfg
        check_pyfuse3()
        check_mountpoint(cfg.mountpoint)
        prepare_cache_dir(cfg.cache_dir)
        name = self.source.namespace(cfg.endpoint_url)
        try:
            ns_dir, lock_fd = namespaces.claim(cfg.cache_dir, name, private_ok=not cfg.read_write)
        except namespaces.Busy as exc:
            why = ("(a read-write mount needs its namespace to itself)" if cfg.read_write
                   else f"and all its {namespaces.MAX_SIBLINGS - 1} private siblings")
            raise MountError(f"another cachefs daemon (pid {exc.pid}) is using cache namespace "
                             f"{os.path.join(cfg.cache_dir, name)} {why}") from None
        try:
            if cfg.control_socket is not None:
                control_socket_path(ns_dir, cfg.control_socket)  # a bad path fails before the backend is asked
            await self._run_locked(ns_dir, on_ready)
        finally:
            os.close(lock_fd)

    async def _run_locked(self, ns_dir: str, on_ready: Callable[[], None]) -> None:
        cfg = self.cfg
        tier = None
        if cfg.tier_endpoint_url:
            if self.source.kind == "file":
                raise UsageError("--tier-endpoint-url needs an object-store source (s3://, cos://, az://)")
            tier = Tier(cfg.tier_endpoint_url, cfg.tier_bucket or self.source.bucket, timeout=cfg.tier_timeout,
                        max_connections=cfg.prefetch_concurrency + ONDEMAND_CONNECTIONS)
        backend = create_backend(self.source, endpoint_url=cfg.endpoint_url, region=cfg.region,
                                 profile=cfg.profile, account=cfg.account,
                                 timeout=cfg.backend_timeout,
                                 max_connections=cfg.prefetch_concurrency + ONDEMAND_CONNECTIONS)
        logs.redactor.secrets = backend.secrets + (tier.secrets if tier else ())
        if tier is not None:
            log.info("cache tier %s: block downloads go there first", tier.describe())
        timeout = backend.timeout
        backend.timeout = min(timeout, CHECK_DEADLINE)
        try:
            with trio.fail_after(CHECK_DEADLINE + 5):
                await backend.check()
        except TemporaryFailure as exc:
            raise BackendError(f"cannot reach {self.source.url}: {exc}") from None
        except trio.TooSlowError:
            raise BackendError(f"{self.source.url}: no answer within {CHECK_DEADLINE:.0f} s") from None
        backend.timeout = timeout

        meta, checked = await _open_index(ns_dir)
        cache = DataCache(ns_dir, meta, cache_capacity(cfg.cache_dir, cfg.cache_size), cfg.cache_policy,
                          cfg.cache_idle_evict)
        files, size = meta.totals()
        metrics.listing_objects.set(files)
        metrics.listing_bytes.set(size)
        log.info("cache %s: %d bytes cached, %d objects listed", ns_dir, cache.used, files)

        uid = cfg.uid if cfg.uid is not None else os.getuid()
        gid = cfg.gid if cfg.gid is not None else os.getgid()
        rw = cfg.read_write
        settings = Settings(cfg.metadata_ttl, uid, gid,
                            cfg.file_mode if cfg.file_mode is not None else (0o644 if rw else 0o444),
                            cfg.dir_mode if cfg.dir_mode is not None else (0o755 if rw else 0o555),
                            rename_dir_limit=cfg.rename_dir_limit)
        layers = stack.build(meta, cache, backend, settings, read_write=rw,
                             writeback_interval=cfg.writeback_interval,
                             prefetch_concurrency=cfg.prefetch_concurrency, tier=tier)
        core, prefetcher, writer = layers.core, layers.prefetcher, layers.writer
        if writer is not None:
            writer.recover()
        sock_path = control_socket_path(ns_dir, cfg.control_socket, cfg.control_group)
        made_dir = cfg.control_socket is None and not sock_path.startswith(ns_dir)
        ops = CachefsOperations(core, sock_path)

        # The source as the mount's device name (df, findmnt; `mount -a` finds an fstab line
        # mounted already by it). libfuse splits options at unescaped commas.
        fsname = cfg.source.replace("\\", "\\\\").replace(",", "\\,")
        options = {f"fsname={fsname}", "subtype=cachefs", "noatime", "nodev", "nosuid",
                   "rw" if rw else "ro"}
        if cfg.allow_other:
            options |= {"allow_other", "default_permissions"}
        if cfg.noexec:
            options.add("noexec")
        try:
            pyfuse3.init(ops, cfg.mountpoint, options)
        except RuntimeError as exc:
            meta.close()
            raise MountError(f"cannot mount {cfg.mountpoint}: {exc}") from None
        self.mounted_at = time.time()
        invalidations = Invalidator()
        drop = layers.lister.on_stale

        def stale(inos: list[int]) -> None:
            drop(inos)
            invalidations.add(inos)

        layers.lister.on_stale = stale
        layers.lister.on_entries_changed = lambda ino: invalidations.add([ino])
        server = None
        try:
            if cfg.metrics_addr:
                probe = http.HealthProbe(cfg.mountpoint)
                server = http.start(cfg.metrics_addr, lambda: meta.damaged is None and probe.healthy(),
                                    self._is_ready(prefetcher))
            async with trio.open_nursery() as nursery:
                layers.reader.nursery = nursery
                await nursery.start(cache.run)  # the evictor
                nursery.start_soon(cache.check)
                layers.lister.nursery = nursery
                nursery.start_soon(self._fuse_main, nursery)
                nursery.start_soon(self._signals, nursery)
                await nursery.start(prefetcher.run)
                await nursery.start(partial(control.serve, sock_path, self._control_handler(core, prefetcher),
                                            group=cfg.control_group))
                if writer is not None:
                    await nursery.start(writer.run)
                nursery.start_soon(self._housekeeping, cache, meta, ns_dir)
                if not checked:
                    nursery.start_soon(_check_index, meta)
                nursery.start_soon(invalidations.run)
                nursery.start_soon(self._initial_listing, layers.lister, prefetcher)
                self.ready = True
                on_ready()
            if writer is not None:
                await self._upload_before_exit(writer)
        finally:
            if server is not None:
                server.shutdown()
            with contextlib.suppress(Exception):
                cache.flush_atimes()
            pyfuse3.close(unmount=True)
            meta.close()
            if made_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(sock_path))
            with contextlib.suppress(Exception):
                await backend.aclose()
            log.info("unmounted %s", cfg.mountpoint)

    async def _upload_before_exit(self, writer: Writer) -> None:
        """Files closed but not uploaded yet (their upload failed): one more try, bounded. What
        is still not uploaded stays in the journal and is uploaded at the next start."""
        pending = [st for st in writer.files.values() if st.dirty and not st.deleted]
        if not pending:
            return
        log.info("uploading %d file(s) before exit", len(pending))
        with trio.move_on_after(SHUTDOWN_UPLOAD_DEADLINE):
            async with trio.open_nursery() as nursery:
                writer.nursery = nursery
                for st in pending:
                    nursery.start_soon(_try_commit, writer, st)
        left = [st for st in pending if st.dirty]
        if left:
            log.warning("%d file(s) not uploaded yet; they stay staged in the cache dir and are "
                        "uploaded at the next mount of it", len(left))

    def _is_ready(self, prefetcher: Prefetcher) -> Callable[[], bool]:
        def ready() -> bool:
            if not self.ready:
                return False
            return not (self.cfg.ready_after_prefetch and not prefetcher.idle.is_set())
        return ready

    async def _fuse_main(self, nursery: trio.Nursery) -> None:
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=FUSE_MAX_TASKS)
        finally:
            # Unmounted from outside (fusermount -u) or terminated: stop everything else.
            nursery.cancel_scope.cancel()

    async def _signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    continue
                log.info("received %s; unmounting", signal.Signals(signum).name)
                pyfuse3.terminate()
                nursery.cancel_scope.cancel()
                return

    async def _initial_listing(self, lister: Lister, prefetcher: Prefetcher) -> None:
        if self.cfg.prefetch:
            prefetcher.submit([""])
        try:
            await lister.walk()
        except Exception as exc:
            log.warning("initial listing failed: %s", exc)

    async def _housekeeping(self, cache: DataCache, meta: MetadataStore, ns_dir: str) -> None:
        last_sync = last_touch = time.monotonic()
        await self._reclaim(cache, ns_dir)
        while True:
            await trio.sleep(ATIME_FLUSH_INTERVAL)
            while cache.flush_atimes(limit=ATIME_BATCH):
                await trio.sleep(0)  # a million hits in 10 s: let FUSE requests in between batches
            if cache.disk_full:
                await self._reclaim(cache, ns_dir)
            if time.monotonic() - last_touch > namespaces.TOUCH_INTERVAL:
                namespaces.touch(ns_dir)
                last_touch = time.monotonic()
            if time.monotonic() - last_sync > SYNC_INTERVAL:
                try:
                    await trio.to_thread.run_sync(meta.env.sync, True)
                except (WriteError, OSError) as exc:  # a full disk must not stop the daemon
                    cache.index_write_failed(exc)
                last_sync = time.monotonic()

    async def _reclaim(self, cache: DataCache, ns_dir: str) -> None:
        """Make room on the cache disk from namespaces unused for --reclaim-after (if needed)."""
        need = max(0, cache.capacity - cache.used)
        try:
            await trio.to_thread.run_sync(namespaces.reclaim, self.cfg.cache_dir, ns_dir, need,
                                          self.cfg.reclaim_after)
        except OSError as exc:
            log.warning("could not reclaim old cache namespaces: %s", exc)

    def _control_handler(self, core: CoreFS, prefetcher: Prefetcher) -> control.Handler:
        async def handle(req: dict[str, Any]) -> dict[str, Any]:
            cmd = req.get("cmd")
            if cmd == "status":
                return self.status(core, prefetcher)
            if cmd == "prefetch":
                paths = _paths(req.get("paths") or [""])
                if req.get("ordered"):  # --from-list: an announced order (the default stream)
                    stream = prefetcher.announce("default", [paths])
                    return {"queued": len(paths), "stream": stream.name}
                try:
                    prefetcher.submit(paths, shard=_shard(req.get("shard")))
                except trio.WouldBlock:
                    return {"error": "too many prefetch jobs queued; try again later"}
                return {"queued": len(paths)}
            if cmd == "order":
                name = req.get("stream") or "default"
                orders = req.get("orders")
                if not isinstance(name, str) or not 0 < len(name) <= 200 or not isinstance(orders, list):
                    return {"error": "an order request needs 'stream' (a name of at most 200 characters) "
                                     "and 'orders' (a list of lists of paths)"}
                if not orders:
                    return {"stream": name, "forgotten": prefetcher.forget(name)}
                stream = prefetcher.announce(name, [_paths(o) for o in orders])
                return {"stream": stream.name, "items": [len(o) for o in stream.orders]}
            return {"error": f"unknown command {cmd!r}"}

        return handle

    def status(self, core: CoreFS, prefetcher: Prefetcher) -> dict[str, Any]:
        from prometheus_client import REGISTRY

        def sample(name: str, **labels: str) -> float:
            return REGISTRY.get_sample_value(name, labels or None) or 0.0

        hits, misses = sample("cachefs_cache_hits_total"), sample("cachefs_cache_misses_total")
        requests = errors = 0.0
        by_operation: dict[str, float] = {}
        for op in metrics.BACKEND_OPERATIONS:
            for outcome in metrics.BACKEND_OUTCOMES:
                n = sample("cachefs_backend_requests_total", operation=op, outcome=outcome)
                requests += n
                by_operation[op] = by_operation.get(op, 0.0) + n
                if outcome == "error":
                    errors += n
        files, size = core.meta.totals()
        return {
            "pid": os.getpid(),
            "source": self.source.url,
            "mountpoint": self.cfg.mountpoint,
            "uptime": time.time() - self.mounted_at,
            "metadata_damaged": core.meta.damaged,
            "listing": {"objects": files, "bytes": size, "complete": core.lister.listed_once.is_set()},
            "cache": {"dir": core.cache.root, "used_bytes": core.cache.used,
                      "capacity_bytes": core.cache.capacity, "policy": core.cache.policy,
                      "full": core.cache.full},
            "reads": {"hits": hits, "misses": misses,
                      "hit_ratio": hits / (hits + misses) if hits + misses else None,
                      "bytes_from_cache": sample("cachefs_read_bytes_total", source="cache"),
                      "bytes_from_backend": sample("cachefs_read_bytes_total", source="backend")},
            # What the daemon was asked; reads the kernel answers from its page cache are not here.
            "fuse_requests": {op: sample("cachefs_fuse_operations_total", operation=op)
                              for op in metrics.FUSE_OPERATIONS},
            "backend": {"requests": requests, "errors": errors, "by_operation": by_operation,
                        "error_rate": errors / requests if requests else 0.0,
                        "retries": sum(sample("cachefs_backend_retries_total", operation=op)
                                       for op in metrics.BACKEND_OPERATIONS)},
            "prefetch": prefetcher.progress.as_dict(),
            "orders": prefetcher.planner.status(),
            "writes": self._write_status(core),
            "tier": self._tier_status(core, sample),
        }

    @staticmethod
    def _tier_status(core: CoreFS, sample: Callable[..., float]) -> dict[str, Any] | None:
        tier = core.reader.tier
        if tier is None:
            return None
        return {"endpoint": tier.describe(),
                "bytes_from_tier": sample("cachefs_block_fetch_bytes_total", source="tier"),
                "bytes_from_origin": sample("cachefs_block_fetch_bytes_total", source="origin"),
                "fallbacks": {reason: sample("cachefs_tier_fallbacks_total", reason=reason)
                              for reason in metrics.TIER_FALLBACKS}}

    @staticmethod
    def _write_status(core: CoreFS) -> dict[str, Any] | None:
        writer = core.writer
        if writer is None:
            return None
        return {"pending": writer.pending(), "recovered": list(writer.recovered),
                "staged_bytes": writer.staged_bytes,
                "uploaded_bytes": metrics.upload_bytes._value.get()}


def _paths(value: object) -> list[str]:
    """Paths of a control request, relative to the mount root."""
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError("paths must be a list of strings")
    return [p.strip("/") for p in value]


def _shard(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) for v in value)
            or not 0 <= value[0] < value[1]):
        raise ValueError("shard must be [RANK, WORLD] with 0 <= RANK < WORLD")
    return value[0], value[1]


async def _open_index(ns_dir: str) -> tuple[MetadataStore, bool]:
    """Open the namespace's LMDB index, rebuilding it (and saying so) if it cannot be opened,
    was found damaged before, or is found damaged by a check of up to ``PRE_MOUNT_CHECK``
    seconds. Returns the store and whether that check read all of it."""
    path = os.path.join(ns_dir, "meta")
    for attempt in (1, 2):
        try:
            damage = os.path.join(path, DAMAGED)
            if os.path.exists(damage):
                with open(damage) as f:
                    raise RuntimeError(f"found damaged before: {f.read().strip()}")
            meta = MetadataStore(path)
            try:
                _, complete = await trio.to_thread.run_sync(meta.check, time.monotonic() + PRE_MOUNT_CHECK)
            except BaseException:
                meta.env.close()
                raise
            return meta, complete
        except Exception as exc:  # lmdb.Error, damage, a schema from another version
            if attempt == 2:
                raise
            log.warning("cache index unusable (%s); rebuilding the namespace (the listing is read "
                        "again and cached data downloaded again; data written and not yet "
                        "uploaded is kept)", exc)
            _wipe(ns_dir)
    raise AssertionError("unreachable")


async def _check_index(meta: MetadataStore) -> None:
    """Finish reading the whole index after the mount (in a thread), when the check before the
    mount ran out of time: damage left by a power loss is found now, not mid-training."""
    try:
        n, _ = await trio.to_thread.run_sync(meta.check)
        log.info("cache index checked: %d entries", n)
    except CORRUPTION:
        pass  # noted by check(): /healthz fails, the next start rebuilds
    except lmdb.Error as exc:
        log.warning("cache index check stopped: %s", exc)


class Invalidator:
    """Drops the kernel's cached pages and attributes of files that changed in the bucket.

    Inodes are collected in a set (no channel that could fill up and drop one): each is
    invalidated once however often it is reported, and none is ever lost. Runs the kernel
    calls in a thread, since the kernel may wait on a request the daemon is answering."""

    def __init__(self, invalidate: Callable[[int], None] | None = None) -> None:
        self._pending: set[int] = set()
        self._wake = trio.Event()
        self._invalidate = invalidate or (
            lambda ino: pyfuse3.invalidate_inode(pyfuse3.InodeT(ino), attr_only=False))

    def add(self, inos: list[int]) -> None:
        if inos:
            self._pending.update(inos)
            self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._pending = self._pending, set()

            def inval(inos: set[int] = batch) -> None:
                for ino in inos:
                    with contextlib.suppress(OSError):
                        self._invalidate(ino)

            await trio.to_thread.run_sync(inval)


async def _try_commit(writer: Writer, st: Any) -> None:
    try:
        await writer.commit(st)
    except Exception as exc:
        log.warning("upload at exit failed: %s", exc)


def _wipe(ns_dir: str) -> None:
    import shutil

    for name in ("meta", "data"):
        shutil.rmtree(os.path.join(ns_dir, name), ignore_errors=True)


def run_foreground(cfg: MountConfig, on_ready: Callable[[], None]) -> None:
    """Run the daemon in this process until it is unmounted."""
    try:
        daemon = Daemon(cfg)
    except UsageError:
        raise
    trio.run(daemon.run, on_ready)
