"""`cachefs demo` (the README's first command) runs end to end on a small dataset."""

from __future__ import annotations

import re

import pytest

from .mounts import cachefs, fuse_mounts

pytestmark = pytest.mark.timeout(300)


def test_demo_reads_everything_twice_and_cleans_up() -> None:
    before = set(fuse_mounts())
    res = cachefs("demo", "--files", "200", "--size-kb", "20", timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    cold = re.search(r"^\s+cold\s+(\d+)\s+([\d.]+)\s+(\d+)%\s+(\d+)\s+(\d+)$", res.stdout, re.M)
    warm = re.search(r"^\s+warm\s+(\d+)\s+([\d.]+)\s+(\d+)%\s+(\d+)\s+(\d+)$", res.stdout, re.M)
    assert cold and warm, res.stdout
    assert int(cold.group(4)) == 200  # one GET per file on the cold pass
    assert int(warm.group(3)) == 100 and int(warm.group(4)) == 0  # the warm pass never asks the bucket
    assert "cachefs demo: ok" in res.stdout
    assert set(fuse_mounts()) == before
