"""Daemon memory with a million objects listed: the listing lives in LMDB, not in Python.

Creates (once, reused across runs) a directory tree of ``--objects`` empty files (1,000 per
folder) on local disk, mounts it with ``cachefs mount file:///...``, waits until the whole tree
is listed into LMDB, then walks and stats every file through the mount, and reports the daemon's
RSS (VmRSS, and the peak VmHWM) at each step from /proc.

    .venv/bin/python bench/rss_listing.py [--objects 1000000] [--tree /var/tmp/cachefs-1m]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_DIR = 1000


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


def cachefs(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "cachefs.cli", *args], check=True, capture_output=True,
                          text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--tree", default="/var/tmp/cachefs-1m")
    ap.add_argument("--out", default=None, help="append the result to this markdown file")
    args = ap.parse_args()
    tree = Path(args.tree)
    t0 = time.perf_counter()
    make_tree(tree / "data", args.objects)
    print(f"tree of {args.objects} files ready in {time.perf_counter() - t0:.0f} s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="cachefs-rss-"))
    mnt = work / "mnt"
    mnt.mkdir()
    cachefs("mount", f"file://{tree / 'data'}", str(mnt), "--cache-dir", str(work / "cache"))
    rows = []
    try:
        st = json.loads(cachefs("status", "--json", str(mnt)))
        pid = st["pid"]
        rows.append(("mounted", *rss(pid), 0))
        t0 = time.perf_counter()
        while not st["listing"]["complete"]:
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
        subprocess.run([sys.executable, "-m", "cachefs.cli", "unmount", str(mnt)], check=False)
    lines = ["", "## Daemon memory with a million objects listed", "",
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
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
