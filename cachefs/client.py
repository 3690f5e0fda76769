"""Tell a cachefs mount the order in which a job will read its files. No framework needed.

    from cachefs.client import announce, OrderedSampler

    announce("/data", epoch_paths, next_epoch_paths)       # any framework: lists of paths

    sampler = OrderedSampler(DistributedSampler(ds, seed=0), paths, "/data")   # PyTorch
    loader = DataLoader(ds, sampler=sampler, num_workers=8)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...

Paths are relative to the mount, or absolute paths under it. An announcement replaces the
stream's previous one; a stream is one reader (``rank<N>`` for a distributed sampler, else
``default``). The daemon follows the reader by the reads it sees: nothing is reported per batch.

The sampler wrapper is duck-typed on PyTorch's ``Sampler`` protocol (``__iter__``, ``__len__``,
``set_epoch``) and imports no framework. A failed announcement (not a cachefs mount, daemon
gone, no access to the control socket) is logged once and training goes on unhelped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from . import control

log = logging.getLogger(__name__)

__all__ = ["OrderedSampler", "announce", "forget", "status"]


def _relative(mountpoint: str, path: str) -> str:
    if not os.path.isabs(path):
        return path.lstrip("/")
    rel = os.path.relpath(path, mountpoint)
    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        raise ValueError(f"{path} is not a file under the mount {mountpoint}")
    return rel


def announce(mountpoint: str | os.PathLike[str], *epochs: Sequence[str], stream: str = "default",
             timeout: float = 60.0) -> dict[str, Any]:
    """Announce the read order of the coming epoch(s) (each a sequence of paths, in reading
    order: this epoch first, then the next when it is known). Returns the daemon's answer.
    Raises ``cachefs.errors.CachefsError`` if the mount cannot be told."""
    mnt = os.path.abspath(os.fspath(mountpoint))
    orders = [[_relative(mnt, os.fspath(p)) for p in epoch] for epoch in epochs]
    if not orders:
        raise ValueError("announce needs at least one epoch of paths")
    return control.request(mnt, {"cmd": "order", "stream": stream, "orders": orders}, timeout=timeout)


def forget(mountpoint: str | os.PathLike[str], stream: str = "default") -> dict[str, Any]:
    """Drop a stream's order (the cache goes back to its policy for that data)."""
    mnt = os.path.abspath(os.fspath(mountpoint))
    return control.request(mnt, {"cmd": "order", "stream": stream, "orders": []})


def status(mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``cachefs status --json`` prints; ``["orders"][stream]`` has the reader's position
    and the prefetch lead."""
    return control.request(os.path.abspath(os.fspath(mountpoint)), {"cmd": "status"})


class OrderedSampler:
    """Wraps a sampler (``RandomSampler``, ``DistributedSampler``, or anything that yields
    indices into ``paths``) and announces each epoch's order to the mount before yielding it.

    A sampler with ``set_epoch`` and a seed (``DistributedSampler``) is deterministic: the next
    epoch's order is computed and announced too (unless ``announce_next=False``), so the daemon
    keeps what that epoch reads first and fetches its start ahead. Other samplers draw a new
    order per iteration; only that one is announced.
    """

    def __init__(self, sampler: Any, paths: Sequence[str | os.PathLike[str]],
                 mountpoint: str | os.PathLike[str], stream: str | None = None,
                 announce_next: bool = True) -> None:
        self.sampler = sampler
        self.paths = [os.fspath(p) for p in paths]
        self.mountpoint = os.fspath(mountpoint)
        rank = getattr(sampler, "rank", None)
        self.stream = stream or (f"rank{rank}" if isinstance(rank, int) else "default")
        self.epoch = 0
        self.announce_next = announce_next
        self._warned = False

    @property
    def deterministic(self) -> bool:
        return hasattr(self.sampler, "set_epoch") and hasattr(self.sampler, "seed")

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = [int(i) for i in self.sampler]
        epochs = [indices]
        if self.deterministic and self.announce_next:
            self.sampler.set_epoch(self.epoch + 1)
            try:
                epochs.append([int(i) for i in self.sampler])
            finally:
                self.sampler.set_epoch(self.epoch)
        try:
            announce(self.mountpoint, *([self.paths[i] for i in e] for e in epochs), stream=self.stream)
        except Exception as exc:  # training goes on without help
            if not self._warned:
                log.warning("cachefs: cannot announce the read order to %s: %s", self.mountpoint, exc)
                self._warned = True
        return iter(indices)
