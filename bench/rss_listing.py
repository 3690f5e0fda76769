"""Daemon memory with a million objects listed: the listing lives in LMDB, not in Python.

Creates (once, reused across runs) a directory tree of ``--objects`` empty files (1,000 per
folder) on local disk, mounts it with ``cachefs mount file:///...``, waits until the whole tree
is listed into LMDB, then walks and stats every file through the mount, and reports the daemon's
RSS (VmRSS, and the peak VmHWM) at each step from /proc.

    .venv/bin/python bench/rss_listing.py [--objects 1000000] [--tree /var/tmp/cachefs-1m] [--out bench/RESULTS.md]

With ``--out``, its section of that file is replaced (or appended); bench/run.py keeps it. The
mount is unmounted and its cache dir removed also on failure; the tree stays for the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_DIR = 1000
HEADING = "## Daemon memory with a million objects listed"
LISTING_TIMEOUT = 1800.0  # seconds for the daemon to list the whole tree
STOP_TIMEOUT = 20.0


def rss(pid: int) -> tuple[float, float, float, float]:
    """(RSS, peak RSS, anonymous, file-backed) in MB. File-backed pages are mostly LMDB's map:
    shared with the page cache and reclaimable, unlike the anonymous (Python heap) part."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    cur, peak, anon, filed = (int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"))
    return cur, peak, anon, filed


def make_tree(root: Path, n: int) -> None:
    marker = root.parent / f".complete-{n}"
    if marker.exists():
        return
    for d in range((n + PER_DIR - 1) // PER_DIR):
        sub = root / f"d{d:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(min(PER_DIR, n - d * PER_DIR)):
            os.close(os.open(sub / f"f{i:04d}", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.touch()


def replace_section(out: Path, text: str, heading: str = HEADING) -> None:
    """Put the section ``text`` (which starts with ``heading``) into ``out``: in place of an
    earlier one, else at the end. bench/scale.py uses it too."""
    old = out.read_text() if out.exists() else ""
    start = old.find(heading)
    if start < 0:
        out.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    end = old.find("\n## ", start + len(heading))
    out.write_text(old[:start] + text + (old[end + 1:] if end >= 0 else ""))


def cleanup(mnt: Path, pid: int | None) -> None:
    """Unmount, stop the daemon if it outlived its mount, and check that no mount is left."""
    subprocess.run([sys.executable, "-m", "cachefs.cli", "unmount", str(mnt)], check=False, capture_output=True)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline:
                os.kill(pid, 0)  # ProcessLookupError once it is gone
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
    with open("/proc/mounts") as f:
        if any(line.split()[1] == str(mnt) for line in f):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False, capture_output=True)


def cachefs(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "cachefs.cli", *args], check=True, capture_output=True,
                          text=True).stdout


def main() -> None:
    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)  # unwind through the finally below

    signal.signal(signal.SIGTERM, terminate)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--tree", default="/var/tmp/cachefs-1m")
    ap.add_argument("--out", default=None, help="write the result into this markdown file (its own section)")
    args = ap.parse_args()
    tree = Path(args.tree)
    t0 = time.perf_counter()
    make_tree(tree / "data", args.objects)
    print(f"tree of {args.objects} files ready in {time.perf_counter() - t0:.0f} s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="cachefs-rss-"))
    mnt = work / "mnt"
    mnt.mkdir()
    rows = []
    pid = None
    try:
        cachefs("mount", f"file://{tree / 'data'}", str(mnt), "--cache-dir", str(work / "cache"))
        st = json.loads(cachefs("status", "--json", str(mnt)))
        pid = st["pid"]
        rows.append(("mounted", *rss(pid), 0))
        t0 = time.perf_counter()
        while not st["listing"]["complete"]:
            if time.perf_counter() - t0 > LISTING_TIMEOUT:
                raise SystemExit(f"the listing did not finish within {LISTING_TIMEOUT:.0f} s")
            time.sleep(1)
            st = json.loads(cachefs("status", "--json", str(mnt)))
        rows.append((f"listed {st['listing']['objects']} objects into LMDB ({time.perf_counter() - t0:.0f} s)",
                     *rss(pid), st["listing"]["objects"]))
        t0 = time.perf_counter()
        seen = 0
        for d, _, names in os.walk(mnt):
            for name in names:
                os.stat(os.path.join(d, name))
                seen += 1
        rows.append((f"os.walk + stat of {seen} files through the mount ({time.perf_counter() - t0:.0f} s)",
                     *rss(pid), seen))
    finally:
        cleanup(mnt, pid)
        shutil.rmtree(work, ignore_errors=True)
    lines = [HEADING, "",
             f"Command: `.venv/bin/python bench/rss_listing.py --objects {args.objects}` "
             f"({time.strftime('%Y-%m-%d', time.gmtime())}; file:// backend, {PER_DIR} files per folder)", "",
             "| step | RSS (MB) | peak RSS (MB) | anonymous (MB) | file-backed: LMDB map (MB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {cur:.0f} | {peak:.0f} | {anon:.0f} | {filed:.0f} |"
              for name, cur, peak, anon, filed, _ in rows]
    peak = max(r[2] for r in rows)
    lines += ["", f"Target: at most 300 MB. Peak: {peak:.0f} MB: {'met' if peak <= 300 else '**not met**'}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        replace_section(Path(args.out), text)


if __name__ == "__main__":
    main()
