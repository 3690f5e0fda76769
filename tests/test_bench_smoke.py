"""A small run of the benchmark, so that it never rots (the full run is too long for CI).

No timing is asserted: the benchmark exits nonzero if any file read through any filesystem has
the wrong hash, or a mount fails; here it must finish and write its report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_bench_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = out.read_text()
    for fs in ("native", "cachefs", "cachefs+prefetch"):
        assert f"| {fs} " in report or f" {fs} |" in report
    assert "epoch 2 (warm)" in report and "large seq (cold)" in report
    with open("/proc/mounts") as f:
        assert "cachefs-bench" not in f.read()
