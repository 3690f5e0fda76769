"""A small run of the benchmark, so that it never rots (the full run is too long for CI).

No timing is asserted: the benchmark exits nonzero if any file read through any filesystem has
the wrong hash, if any object written through a mount is not in the store byte for byte once
``close`` returned, or if a mount fails; here it must finish, report that every read and every
written object was checked, and leave no mount behind.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE_FILES = 300  # bench/run.py's SMOKE: 300 files, 2 epochs, 4 filesystems, plus the large file
FILESYSTEMS = ("native", "bare-fuse", "cachefs", "cachefs+prefetch")
SMOKE_WRITE_FILES = 40  # SMOKE's write phase: a 20 MiB file (multipart) and 40 small files, cachefs only


@pytest.mark.timeout(600)
def test_bench_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = out.read_text()
    assert "| phase | " + " | ".join(FILESYSTEMS) + " |" in report
    for phase in ("index cold", "index warm", "prefetch", "epoch 1 (cold)", "epoch 2 (warm)", "large seq (cold)",
                  "write large", "write small"):
        assert f"| {phase} |" in report
    checked = re.search(r"Checked: (\d+) reads, every one's blake2b equal.*; (\d+) objects written through the "
                        r"mounts read back from the store, every byte equal", report)
    assert checked is not None
    assert int(checked.group(1)) == len(FILESYSTEMS) * (2 * SMOKE_FILES + 1)
    assert int(checked.group(2)) == 1 + SMOKE_WRITE_FILES
    assert "| RSS peak, write mount (MB) |" in report
    with open("/proc/mounts") as f:
        assert "cachefs-bench-" not in f.read()


@pytest.mark.timeout(600)
def test_bench_scale_smoke(tmp_path: Path) -> None:
    """bench/scale.py at a tiny size: real objects in SeaweedFS through real mounts, and a generated
    listing under the daemon's layers; every figure and every target row is reported."""
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\n## Earlier section\n\nkept\n")
    res = subprocess.run([sys.executable, str(REPO / "bench" / "scale.py"), "--objects", "2000",
                          "--tree-objects", "2000", "--synthetic", "20000", "--synthetic-tree", "20000",
                          "--prefetch-budget", "60", "--out", str(out)],
                         capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = out.read_text()
    assert "## Earlier section\n\nkept" in report
    assert report.count("## At scale:") == 1
    assert "| objects | 2,000 in one folder | 2,000 in 1,000 folders |" in report
    assert "| objects | 20,000 in one folder + 20,000 in 1,000 folders |" in report
    assert "| relist: records written (`Lister.writes`) | 0 |" in report  # nothing changed: nothing written
    assert "2,000 blocks in" in report  # the whole tree prefetched
    assert len(re.findall(r"^\| [^|]+ \| [^|]+ \| (yes|\*\*no\*\*) \|$", report, re.M)) == 7
    with open("/proc/mounts") as f:
        assert "cachefs-scale-" not in f.read()


@pytest.mark.timeout(300)
def test_bench_get_cpu_smoke() -> None:
    """bench/get_cpu.py at a tiny size: every client of both stores is measured (each GET is
    length-checked and each listing must see every key, or the script fails)."""
    res = subprocess.run([sys.executable, str(REPO / "bench" / "get_cpu.py"), "--gets", "60", "--concurrency", "8",
                          "--rounds", "1", "--keys", "1200"], capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = {tuple(line.split()[:3]) for line in res.stdout.splitlines() if len(line.split()) >= 3}
    for store, path in [("S3", "boto3"), ("S3", "obstore"), ("Azure", "sdk"), ("Azure", "rest"), ("Azure", "obstore")]:
        assert any(r[0] == store and r[2] == path for r in rows), (store, path, res.stdout)
    for store, client in [("S3", "botocore"), ("S3", "ElementTree"), ("S3", "cachefs"), ("S3", "obstore"),
                          ("Azure", "sdk"), ("Azure", "cachefs"), ("Azure", "obstore")]:
        assert any(r[0] == store and r[2] == client for r in rows), (store, client, res.stdout)
@pytest.mark.timeout(600)
def test_bench_order_smoke(tmp_path: Path) -> None:
    """bench/order.py at a tiny size: both setups and both scenarios run through real mounts,
    every byte read is checked (the script exits nonzero otherwise), and the table is written."""
    out = tmp_path / "RESULTS.md"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "order.py"), "--files", "120", "--classes", "10",
                          "--mean-kb", "20", "--rounds", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = out.read_text()
    assert report.count("## Announced order: cold epoch vs --prefetch") == 1
    for row in ("| whole dataset, 1 node | --prefetch | 120 |", "| whole dataset, 1 node | announced | 120 |",
                "| rank 0 of 4 nodes | --prefetch | 30 |", "| rank 0 of 4 nodes | announced | 30 |"):
        assert row in report
    assert "| rank 0 of 4 nodes | announced | 30 |" in report and report.count("x** |") == 2
    with open("/proc/mounts") as f:
        assert "cachefs-bench-order-" not in f.read()


@pytest.mark.timeout(600)
def test_bench_train_smoke(tmp_path: Path) -> None:
    """bench/train.py at smoke size: real JPEGs through the multiprocessing loader from the local
    disk, the HDF5 repack and two cachefs mounts; a row per setup and epoch, and the plot."""
    out = tmp_path / "RESULTS.md"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "train.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = out.read_text()
    for setup in ("local disk", "HDF5 repack (local disk)", "cachefs", "cachefs, order announced"):
        row = re.search(rf"^\| {re.escape(setup)} \| (\d+), (\d+)% \| (\d+), (\d+)% \|$", report, re.MULTILINE)
        assert row is not None, setup
        assert all(int(row.group(i)) > 0 for i in (1, 3)) and all(int(row.group(i)) <= 100 for i in (2, 4))
    assert "order announced / the HDF5 repack on local disk: epoch 1" in report
    png = tmp_path / "train.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open("/proc/mounts") as f:
        assert "cachefs-bench-train-" not in f.read()
