"""A small run of the benchmark, so that it never rots (the full run is too long for CI).

No timing is asserted: the benchmark exits nonzero if any file read through any filesystem has
the wrong hash or a mount fails; here it must finish, report that every read was checked, and
leave no mount behind.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE_FILES = 300  # bench/run.py's SMOKE: 300 files, 2 epochs, 3 filesystems, plus the large file
FILESYSTEMS = ("native", "cachefs", "cachefs+prefetch")


@pytest.mark.timeout(600)
def test_bench_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = out.read_text()
    assert "| phase | " + " | ".join(FILESYSTEMS) + " |" in report
    for phase in ("index cold", "index warm", "prefetch", "epoch 1 (cold)", "epoch 2 (warm)", "large seq (cold)"):
        assert f"| {phase} |" in report
    checked = re.search(r"Checked: (\d+) reads, every one's blake2b equal", report)
    assert checked is not None
    assert int(checked.group(1)) == len(FILESYSTEMS) * (2 * SMOKE_FILES + 1)
    with open("/proc/mounts") as f:
        assert "cachefs-bench-" not in f.read()
