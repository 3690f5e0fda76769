"""The ``cachefs`` command.

Exit codes: 0 success; 1 runtime failure; 2 bad command line, option or config value;
3 the object store refused or could not be reached (missing bucket, access denied, unreachable);
4 the mountpoint or cache dir cannot be used. Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from . import config, control, credentials
from .errors import CachefsError, MountError, UsageError, redact

log = logging.getLogger("cachefs")

UNMOUNT_WAIT = 90.0  # seconds to wait for a daemon to finish after its mount is gone (it may
#                      upload closed files for up to mount.SHUTDOWN_UPLOAD_DEADLINE first)


def _fail(exc: CachefsError | str, code: int | None = None) -> int:
    msg = str(exc)
    print(f"cachefs: {redact(msg.splitlines()[0] if msg else 'error')}", file=sys.stderr)
    return code if code is not None else getattr(exc, "exit_code", 1)


# -- mount ------------------------------------------------------------------------------------

# A SAS token (sig, sv, se), a presigned S3 URL (X-Amz-Signature, -Credential, -Security-Token)
# or user:password@ in a URL.
_SECRET_IN_URL = re.compile(r"(?i)([?&](sig|sv|se|x-amz-signature|x-amz-credential|x-amz-security-token)=)"
                            r"|(//[^/@]+:[^/@]+@)")


def cmd_mount(args: argparse.Namespace) -> int:
    cfg = config.resolve(args)
    if cfg.credentials:
        credentials.apply_file(cfg.credentials)
    for what, url in (("SOURCE", cfg.source), ("--endpoint-url", cfg.endpoint_url or "")):
        if _SECRET_IN_URL.search(url):
            raise UsageError(f"credentials in {what} are refused (they would show in ps and logs); use "
                             "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, IBM_API_KEY_ID(_FILE), "
                             "AZURE_STORAGE_SAS_TOKEN(_FILE) or --credentials FILE instead")
    from .logs import setup
    from .mount import Daemon, run_foreground
    from .source import parse_source

    parse_source(cfg.source, endpoint_url=cfg.endpoint_url, account=cfg.account)  # fail early
    if cfg.foreground:
        setup(cfg.log_level, cfg.log_format)
        run_foreground(cfg, lambda: log.info("mounted %s on %s", cfg.source, cfg.mountpoint))
        return 0
    return _daemonize(cfg, Daemon)


def _daemonize(cfg: config.MountConfig, daemon_cls: Callable[[config.MountConfig], Any]) -> int:
    """Fork; the child mounts and reports "ok" or an error line through a pipe; the parent
    waits for that and exits with the matching code, so `cachefs mount` returns only once the
    mount is usable."""
    import trio

    from .logs import setup

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace")
        if msg.startswith("ok"):
            return 0
        if not msg:
            os.waitpid(pid, 0)
            return _fail("the daemon exited before the mount was ready (see its log)", 1)
        status, _, text = msg.partition(" ")
        os.waitpid(pid, 0)
        return _fail(text.strip(), int(status) if status.isdigit() else 1)

    # Child: new session, no terminal, then the daemon.
    os.close(rfd)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    log_path = os.path.join(cfg.cache_dir, "cachefs.log")
    reported = False

    def report(text: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            os.write(wfd, text.encode())
            os.close(wfd)

    def on_ready() -> None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        report("ok")

    code = 0
    try:
        os.makedirs(cfg.cache_dir, mode=0o700, exist_ok=True)
        setup(cfg.log_level, cfg.log_format, log_path)
    except OSError as exc:
        report(f"4 cache dir {cfg.cache_dir} is not writable: {exc.strerror}")
        os._exit(4)
    try:
        daemon = daemon_cls(cfg)
        trio.run(daemon.run, on_ready)
    except CachefsError as exc:
        report(f"{exc.exit_code} {exc}")
        code = exc.exit_code
    except BaseException as exc:
        log.exception("daemon failed")
        report(f"1 daemon failed: {type(exc).__name__}: {exc}")
        code = 1
    os._exit(code)


# -- unmount ----------------------------------------------------------------------------------

def cmd_unmount(args: argparse.Namespace) -> int:
    from .mount import fuse_unmount, is_stale

    path = os.path.abspath(args.mountpoint)
    if is_stale(path):
        if not fuse_unmount(path, lazy=True):
            return _fail(MountError(f"{path}: could not clean up the stale mount"))
        print(f"cachefs: cleaned up stale mount {path}", file=sys.stderr)
        return 0
    if not _in_mount_table(path):
        return _fail(MountError(f"{path} is not mounted"))
    status: dict[str, Any] = {}
    with contextlib.suppress(CachefsError):
        status = control.request(path, {"cmd": "status"}, timeout=5)
    if not fuse_unmount(path):
        return _fail(MountError(f"cannot unmount {path} (busy? try: fuser -m {path})"))
    pid, ns_dir = status.get("pid"), status.get("cache", {}).get("dir")
    if isinstance(pid, int) and isinstance(ns_dir, str):
        # The daemon may still upload files closed just before (read-write mounts): wait until
        # it lets go of its cache namespace, or is gone (a zombie its parent has not reaped
        # counts as gone).
        deadline = time.monotonic() + UNMOUNT_WAIT
        while time.monotonic() < deadline and _daemon_holds(pid, ns_dir):
            time.sleep(0.05)
    return 0


def _in_mount_table(path: str) -> bool:
    """Whether ``path`` is a mountpoint (from the mount table: ``stat`` of a mount whose root
    fails, e.g. with EIO, cannot tell)."""
    try:
        with open("/proc/self/mounts") as f:
            points = {line.split()[1].encode().decode("unicode_escape") for line in f if line.strip()}
    except OSError:
        return os.path.ismount(path)
    return path in points


def _daemon_holds(pid: int, ns_dir: str) -> bool:
    """Whether daemon ``pid`` still runs and holds the lock of its cache namespace."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                return False
    except OSError:
        return False
    try:
        fd = os.open(os.path.join(ns_dir, "lock"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -- prefetch and status ----------------------------------------------------------------------

def _relative(mountpoint: str, path: str) -> str:
    full = os.path.abspath(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
    rel = os.path.relpath(full, mountpoint)
    if rel == ".":
        return ""
    if rel.startswith(".."):
        # A path given relative to the mount root (as in a --from-list file).
        rel = os.path.normpath(path).lstrip("/")
        if rel.startswith(".."):
            raise UsageError(f"{path} is outside the mount {mountpoint}")
    return rel


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _progress_line(p: dict[str, Any]) -> str:
    files_total = p["files_total"] or 1
    frac = (p["bytes_done"] / p["bytes_total"]) if p["bytes_total"] else (p["files_done"] / files_total)
    bar = "#" * int(frac * 30)
    rate = p["rate_bytes"]
    eta = (p["bytes_total"] - p["bytes_done"]) / rate if rate > 0 else 0
    files_rate = p["files_done"] / p["elapsed"] if p["elapsed"] > 0 else 0
    return (f"[{bar:<30}] {frac * 100:5.1f}%  {p['files_done']}/{p['files_total']} files  "
            f"{_human(p['bytes_done'])}/{_human(p['bytes_total'])}  {files_rate:.0f} files/s "
            f"{_human(rate)}/s  ETA {eta:.0f}s" + (f"  (failed: {p['files_failed']})" if p["files_failed"] else ""))


def _parse_shard(text: str) -> tuple[int, int]:
    rank, sep, world = text.partition("/")
    if not (sep and rank.isdigit() and world.isdigit() and 0 <= int(rank) < int(world)):
        raise UsageError(f"--shard {text!r}: expected RANK/WORLD with 0 <= RANK < WORLD, e.g. 0/4")
    return int(rank), int(world)


def cmd_prefetch(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mountpoint)
    paths = [_relative(mnt, p) for p in args.paths]
    if args.from_list:
        if paths or args.shard:
            raise UsageError("--from-list takes no PATHs and no --shard (announce each rank's own list)")
        try:
            with open(args.from_list, encoding="utf-8", errors="surrogateescape") as f:
                paths = [_relative(mnt, line.rstrip("\n")) for line in f if line.strip()]
        except OSError as exc:
            raise UsageError(f"cannot read {args.from_list}: {exc.strerror}") from None
        control.request(mnt, {"cmd": "order", "stream": args.stream, "orders": [paths]})
        if args.wait:
            return _wait_order(mnt, args.stream)
        print(f"cachefs: order announced ({len(paths)} files, stream {args.stream!r})", file=sys.stderr)
        return 0
    req: dict[str, Any] = {"cmd": "prefetch", "paths": paths or [""]}
    if args.shard:
        req["shard"] = list(_parse_shard(args.shard))
    control.request(mnt, req)
    if not args.wait:
        print(f"cachefs: prefetch queued ({len(paths) or 1} paths)", file=sys.stderr)
        return 0
    show = sys.stderr.isatty() and not args.no_progress
    time.sleep(0.2)
    while True:
        st = control.request(mnt, {"cmd": "status"})["prefetch"]
        if show:
            print("\r" + _progress_line(st), end="", file=sys.stderr, flush=True)
        if not st["running"] and st["jobs_queued"] == 0:
            break
        time.sleep(0.5)
    if show:
        print(file=sys.stderr)
    print(_progress_line(st), file=sys.stdout if not show else sys.stderr)
    if st["stopped_full"]:
        print("cachefs: the cache is full; prefetch stopped", file=sys.stderr)
    return 1 if st["files_failed"] else 0


def _wait_order(mnt: str, stream: str) -> int:
    """Until the stream's order is resolved and fetched as far as the daemon goes before the
    reader moves (the end, the window in a full cache)."""
    while True:
        st = control.request(mnt, {"cmd": "status"})["orders"].get(stream)
        if st is None:
            raise CachefsError(f"the order of stream {stream!r} was replaced or forgotten")
        if st["resolved"] >= st["epoch_items"] and st["state"] in ("caught up", "cache full",
                                                                  "waiting for the reader"):
            break
        time.sleep(0.2)
    print(f"cachefs: order of stream {stream!r}: {_order_line(st)}")
    return 0


def _order_line(o: dict[str, Any]) -> str:
    return (f"at {o['position']}/{o['epoch_items']} of epoch ({o['epochs_announced']} announced), "
            f"{o['lead']} items fetched ahead (window {o['window']}), {o['read_rate']:.0f} items/s, "
            f"{o['state']}" + (f", {o['missing']} not in the bucket" if o["missing"] else ""))


def cmd_status(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mountpoint)
    st = control.request(mnt, {"cmd": "status"})
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    c, r, b, p = st["cache"], st["reads"], st["backend"], st["prefetch"]
    ratio = "n/a" if r["hit_ratio"] is None else f"{r['hit_ratio'] * 100:.1f}%"
    print(f"source:     {st['source']}")
    print(f"mountpoint: {st['mountpoint']} (pid {st['pid']}, up {st['uptime']:.0f}s)")
    print(f"listing:    {st['listing']['objects']} objects, {_human(st['listing']['bytes'])}"
          + ("" if st["listing"]["complete"] else " (listing in progress)"))
    print(f"cache:      {_human(c['used_bytes'])} of {_human(c['capacity_bytes'])} "
          f"({c['policy']}){' FULL' if c['full'] else ''}")
    print(f"hit ratio:  {ratio} ({r['hits']:.0f} hits, {r['misses']:.0f} misses)")
    fuse = st["fuse_requests"]
    print(f"requests:   {sum(fuse.values()):.0f} from the kernel ({fuse['read']:.0f} reads; "
          "warm reads the kernel answers itself are not counted)")
    print(f"backend:    {b['requests']:.0f} requests, {b['error_rate'] * 100:.2f}% errors, "
          f"{b['retries']:.0f} retries")
    t = st.get("tier")
    if t is not None:
        fallbacks = ", ".join(f"{n:.0f} {reason}" for reason, n in t["fallbacks"].items() if n) or "none"
        print(f"tier:       {t['endpoint']}: {_human(t['bytes_from_tier'])} from the tier, "
              f"{_human(t['bytes_from_origin'])} from the origin; fallbacks: {fallbacks}")
    if p["files_total"]:
        state = "running" if p["running"] else "done"
        print(f"prefetch:   {state}: {_progress_line(p)}")
    for name, o in st.get("orders", {}).items():
        print(f"order:      {name}: {_order_line(o)}")
    w = st.get("writes")
    if w is not None:
        print(f"writes:     {len(w['pending'])} file(s) not uploaded yet ({_human(w['staged_bytes'])} staged), "
              f"{_human(w['uploaded_bytes'])} uploaded")
        for f in w["pending"]:
            print(f"  {f['state']:<9} {_human(f['size']):>9}  {f['name']}"
                  + (f"  (last error: {f['error']})" if f["error"] else ""))
        for f in w["recovered"]:
            print(f"  recovered {_human(f['size']):>9}  {f['name']} ({f['state']})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(files=args.files, size_kb=args.size_kb, keep=args.keep)


# -- entry point ------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"cachefs: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cachefs",
        description="Mount an S3 / IBM COS bucket or Azure Blob container as a fast, cached, "
                    "read-only directory for training.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage/config error, 3 object store error, "
               "4 mountpoint/cache-dir error.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    p = sub.add_parser("mount", help="mount SOURCE on MOUNTPOINT (returns once the mount is ready)",
                       description="Mount SOURCE read-only on MOUNTPOINT. Credentials come from the "
                                   "environment (AWS chain; IBM_API_KEY_ID or IBM_API_KEY_ID_FILE "
                                   "for IBM COS IAM API keys; AZURE_STORAGE_CONNECTION_STRING/KEY/"
                                   "SAS_TOKEN or their _FILE forms; managed identity) or a file "
                                   "named by --credentials, never from the command line.")
    config.add_arguments(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("unmount", help="unmount (also cleans up a stale mount of a dead daemon)")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_unmount)

    p = sub.add_parser("prefetch", help="pull files into a running mount's cache")
    p.add_argument("mountpoint")
    p.add_argument("paths", nargs="*", help="files or directories in the mount (default: everything)")
    p.add_argument("--from-list", metavar="FILE",
                   help="announce FILE (one path per line) as the order in which the files will be "
                        "read: the daemon fetches it a window ahead of the reader and keeps what is "
                        "read soonest")
    p.add_argument("--stream", default="default",
                   help="with --from-list: the reader this order belongs to (one per rank of a job "
                        "on the node; default: default); announcing again replaces its order")
    p.add_argument("--shard", metavar="RANK/WORLD",
                   help="bulk prefetch of this node's share only: a file belongs to rank "
                        "crc32(its path in the mount) %% WORLD")
    p.add_argument("--wait", action="store_true", help="show progress and return when done")
    p.add_argument("--no-progress", action="store_true", help="with --wait: no progress bar")
    p.set_defaults(func=cmd_prefetch)

    p = sub.add_parser("status", help="summary of a running mount")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="serve a generated dataset from a local S3 server, mount it, "
                                    "read it twice and report")
    p.add_argument("--files", type=int, default=2000, help="number of files (default 2000)")
    p.add_argument("--size-kb", type=int, default=100, help="average file size in KB (default 100)")
    p.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and "://" in argv[0]:
        # `cachefs SOURCE MOUNTPOINT -o OPTIONS`: how fuse3's mount.fuse runs a fuse.cachefs
        # mount when mount(8) finds no mount.fuse.cachefs.
        from .mounthelper import main as mount_helper

        return mount_helper(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CachefsError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
