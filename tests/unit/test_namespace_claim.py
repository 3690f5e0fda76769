"""Claiming a cache namespace (cachefs/cache/namespaces.py): the namespace itself when free, else
the first free private sibling, and never one another daemon holds. flock locks belong to an
open file, so one process can play several daemons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachefs.cache import namespaces


def test_first_free_namespace_is_claimed(tmp_path: Path) -> None:
    a_dir, a = namespaces.claim(str(tmp_path), "s3-b-0123", private_ok=True)
    b_dir, b = namespaces.claim(str(tmp_path), "s3-b-0123", private_ok=True)
    c_dir, c = namespaces.claim(str(tmp_path), "s3-b-0123", private_ok=True)
    assert [a_dir, b_dir, c_dir] == [str(tmp_path / n) for n in ("s3-b-0123", "s3-b-0123.2", "s3-b-0123.3")]
    assert (tmp_path / "s3-b-0123.2" / "lock").read_text() == f"{os.getpid()}\n"
    os.close(a)  # the first daemon exits: the next one gets the namespace it left, warm
    d_dir, d = namespaces.claim(str(tmp_path), "s3-b-0123", private_ok=True)
    assert d_dir == a_dir
    os.close(b)
    e_dir, e = namespaces.claim(str(tmp_path), "s3-b-0123", private_ok=True)
    assert e_dir == b_dir
    for fd in (c, d, e):
        os.close(fd)


def test_busy_namespace_without_fallback_names_the_holder(tmp_path: Path) -> None:
    _, fd = namespaces.claim(str(tmp_path), "ns", private_ok=True)
    with pytest.raises(namespaces.Busy) as info:
        namespaces.claim(str(tmp_path), "ns", private_ok=False)
    assert info.value.pid == str(os.getpid())
    assert not (tmp_path / "ns.2").exists()
    os.close(fd)


def test_all_siblings_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(namespaces, "MAX_SIBLINGS", 3)
    fds = [namespaces.claim(str(tmp_path), "ns", private_ok=True)[1] for _ in range(3)]
    with pytest.raises(namespaces.Busy):
        namespaces.claim(str(tmp_path), "ns", private_ok=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ns", "ns.2", "ns.3"]
    for fd in fds:
        os.close(fd)
