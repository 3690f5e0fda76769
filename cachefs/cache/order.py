"""Announced read orders: where each reader is in its order, and what is needed when.

A training job knows the order of its reads before an epoch starts (its sampler decides it). It
announces that order, for this epoch and when known the next one, as a *stream* (one per
reader: a rank of a job; ``default`` otherwise). The daemon then knows, for every announced
file, when it is needed next, and uses it twice:

- the prefetcher (``cache.prefetch``) fetches each stream's order a window ahead of its reader;
- the cache (``cache.store``) evicts what is needed latest, or never again, first (Belady's
  rule over the known future), and admits a block only if it is needed sooner than what it
  would push out. Data that no order mentions keeps the ``stable`` policy.

Memory: an order is two arrays of 8 bytes per item (inode numbers in reading order, and the same
sorted as ``ino << 32 | position`` for "where is this inode read next"), never a Python object
per path: a million-item order costs 16 MB, two epochs of it 32 MB. Inode numbers of 2**32 and
above (four billion objects listed in one cache namespace) are not indexed and count as
unannounced.

Positions: a stream's orders are laid end to end; positions are absolute (``base`` is the
position of the first item of ``orders[0]``), so a prefetch cursor stays valid when a finished
epoch is dropped. The reader's position is advanced by reads (``on_read``): the daemon sees every
read, so a client announces the order once and never reports progress. A read matches the
stream's order within a window around the position (workers of a data loader read a few items
out of order); reads of anything else leave the position alone.

Everything here runs on the trio thread; nothing awaits (``Stream.wake`` is set, never waited
for, here).
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .. import metrics

INO_LIMIT = 1 << 32  # inode numbers at or above this are not indexed (see above)
SLACK = 256  # a read this many items behind the reader's position still belongs to the order
JUMP_MIN = 1024  # a read up to max(2 x window, this) items ahead of the position moves it there
RATE_INTERVAL = 0.5  # seconds between two samples of a reader's rate
RATE_SMOOTHING = 0.3  # weight of the newest sample in the moving average
SCAN_BUDGET = 4096  # order positions a victim search looks at before giving up for now (~10 ms)


class Order:
    """One announced epoch: inode numbers in reading order (0: not in the bucket), filled as the
    paths are resolved, and their sorted index once all are."""

    __slots__ = ("index", "inos", "resolved")

    def __init__(self, length: int) -> None:
        self.inos = array("Q", [0]) * length  # exactly 8 bytes per item
        self.index = array("Q")  # ino << 32 | position, sorted; empty until resolved
        self.resolved = 0  # items [0, resolved) hold their inode number

    def __len__(self) -> int:
        return len(self.inos)

    @property
    def indexed(self) -> bool:
        return len(self.index) > 0 or self.resolved == len(self.inos)

    def build_index(self) -> None:
        """Sort (once all items are resolved). Transient memory: one Python int per item."""
        self.index = array("Q", sorted((ino << 32) | i for i, ino in enumerate(self.inos)
                                       if 0 < ino < INO_LIMIT))

    def find(self, ino: int, lo: int, hi: int) -> int | None:
        """The first position in [lo, hi) (resolved positions only) holding ``ino``."""
        hi = min(hi, self.resolved)
        if lo >= hi or ino == 0:
            return None
        try:
            return self.inos.index(ino, max(0, lo), hi)
        except ValueError:
            return None

    def next_at(self, ino: int, start: int) -> int | None:
        """The first position >= ``start`` holding ``ino`` (needs the index)."""
        if not 0 < ino < INO_LIMIT:
            return None
        i = bisect_left(self.index, (ino << 32) | max(0, start))
        if i < len(self.index) and self.index[i] >> 32 == ino:
            return int(self.index[i] & 0xFFFFFFFF)
        return None


@dataclass(eq=False)
class Stream:
    """One reader's announced orders and its position in them."""

    name: str
    orders: list[Order]
    base: int = 0  # absolute position of orders[0][0]
    pos: int = 0  # absolute position of the next item the reader will read
    window: int = 0  # items the prefetcher keeps ahead (set by the prefetcher)
    issued: int = 0  # the prefetcher's cursor: items below it were fetched or are in flight
    done_until: int = 0  # items below it (from pos on) are fetched
    missing: int = 0  # paths not found in the bucket
    announced_at: float = field(default_factory=time.time)
    rate: float = 0.0  # items/s read (moving average)
    _rate_pos: int = 0
    _rate_at: float = field(default_factory=time.monotonic)
    state: str = "resolving"  # resolving, fetching, waiting for the reader, cache full, caught up
    wake: trio.Event = field(default_factory=trio.Event)  # the position moved, or a fetch ended
    never_cursor: int = 0  # victim search among items already read (see Planner)
    far_cursor: int = -1  # victim search from the end of the known future, downwards

    @property
    def end(self) -> int:
        return self.base + sum(len(o) for o in self.orders)

    @property
    def resolved_end(self) -> int:
        """Positions below this hold inode numbers (resolution runs in order, epoch by epoch)."""
        end = self.base
        for o in self.orders:
            end += o.resolved
            if o.resolved < len(o):
                break
        return end

    def _locate(self, q: int) -> tuple[Order, int] | None:
        off = q - self.base
        for o in self.orders:
            if off < len(o):
                return (o, off) if off >= 0 else None
            off -= len(o)
        return None

    def item(self, q: int) -> int:
        """The inode number at absolute position ``q`` (0: unresolved, missing, or out of range)."""
        loc = self._locate(q)
        if loc is None or loc[1] >= loc[0].resolved:
            return 0
        return int(loc[0].inos[loc[1]])

    def find(self, ino: int, lo: int, hi: int) -> int | None:
        """The first absolute position in [lo, hi) holding ``ino``: a bisection of the index, or a
        linear search (C speed) of an order still being resolved."""
        start = self.base
        for o in self.orders:
            if hi <= start:
                break
            if lo < start + len(o):
                if o.index:
                    q = o.next_at(ino, lo - start)
                    q = q if q is not None and q < hi - start else None
                else:
                    q = o.find(ino, lo - start, hi - start)
                if q is not None:
                    return start + q
            start += len(o)
        return None

    def next_use(self, ino: int, frm: int | None = None) -> int | None:
        """The first absolute position >= ``frm`` (default: the reader's) where ``ino`` is read,
        or None if no announced order reads it again. Orders still being resolved are
        searched in their resolved part around the position only."""
        frm = self.pos if frm is None else frm
        start = self.base
        for o in self.orders:
            if frm < start + len(o):
                if o.indexed and o.index:
                    q = o.next_at(ino, frm - start)
                else:
                    q = o.find(ino, frm - start, frm - start + JUMP_MIN)
                if q is not None:
                    return start + q
            start += len(o)
        return None

    def advance(self, q: int) -> None:
        """The reader read absolute position ``q``."""
        if q >= self.pos:
            self.pos = q + 1
            self.wake.set()
        # Drop finished epochs (keep the last: what it holds is "never needed again").
        while len(self.orders) > 1 and self.pos >= self.base + len(self.orders[0]):
            self.base += len(self.orders.pop(0))
        self.never_cursor = max(self.never_cursor, self.base)
        now = time.monotonic()
        if now - self._rate_at >= RATE_INTERVAL:
            sample = (self.pos - self._rate_pos) / (now - self._rate_at)
            self.rate = sample if self.rate == 0 else (1 - RATE_SMOOTHING) * self.rate + RATE_SMOOTHING * sample
            self._rate_pos, self._rate_at = self.pos, now

    def status(self) -> dict[str, object]:
        first = self.orders[0] if self.orders else None
        return {
            "position": self.pos - self.base, "epoch_items": len(first) if first is not None else 0,
            "epochs_announced": len(self.orders), "items_ahead": max(0, self.end - self.pos),
            "resolved": self.resolved_end - self.base, "missing": self.missing,
            "lead": max(0, self.done_until - self.pos), "window": self.window,
            "read_rate": round(self.rate, 1), "state": self.state,
        }


class Planner:
    """All streams of a mount, and what the cache asks of them."""

    def __init__(self, holds: Callable[[int], bool]) -> None:
        self.streams: dict[str, Stream] = {}
        self.holds = holds  # whether the cache holds any block of an inode

    @property
    def active(self) -> bool:
        return bool(self.streams)

    def announce(self, name: str, orders: list[Order]) -> Stream:
        """Replace a stream's orders (its position starts at the first item)."""
        stream = Stream(name, orders)
        stream.far_cursor = stream.end - 1
        self.streams[name] = stream
        metrics.order_items.inc(sum(len(o) for o in orders))
        return stream

    def forget(self, name: str) -> bool:
        return self.streams.pop(name, None) is not None

    # -- reads ------------------------------------------------------------------------------

    def on_read(self, ino: int, hit: bool) -> bool:
        """A reader opened ``ino`` (its first block, first read by this handle); ``hit``: its
        data was cached. Moves the position of the stream it belongs to. Returns whether it
        was an announced read."""
        for stream in self.streams.values():
            lo = max(stream.base, stream.pos - SLACK)
            q = stream.find(ino, lo, stream.pos + max(2 * stream.window, JUMP_MIN))
            if q is None:
                continue
            stream.advance(q)
            metrics.order_reads.labels("ahead" if hit else "waited").inc()
            nxt = stream.next_use(ino)
            if nxt is not None and nxt > stream.far_cursor:
                stream.far_cursor = nxt  # it will be cached beyond where the victim search is
            return True
        return False

    # -- the cache's questions --------------------------------------------------------------

    def distance(self, ino: int) -> int | None:
        """Items until ``ino`` is read next by any stream; None if no stream reads it again."""
        best: int | None = None
        for stream in self.streams.values():
            q = stream.next_use(ino)
            if q is not None and (best is None or q - stream.pos < best):
                best = q - stream.pos
        return best

    def admit(self, ino: int, full: bool) -> bool:
        """May a block of ``ino``, just read, take room from what is cached? Always if there is
        room, if no announced item is cached (the policy decides, as without orders), or if a
        cached announced item is read by no stream again (a finished job's); else only if it
        is read again sooner than the cached announced item read latest (Belady, with bypass).
        So unannounced data never pushes out announced data that is still to be read."""
        if not full:
            return True
        far = self.farthest()
        if far is None or far == float("inf"):
            return True  # room can come from what is not announced, or is read by no one again
        d = self.distance(ino)
        return d is not None and d < far

    def farthest(self) -> float | None:
        """The distance of the cached announced item needed latest (``inf``: never again), or
        None if no cached announced item is known (within the search budget)."""
        victim = self._search(consume=False)
        return None if victim is None else victim[1]

    def next_victim(self) -> int | None:
        """The next inode to evict: one read by no stream again, else the one read latest."""
        victim = self._search(consume=True)
        return None if victim is None else victim[0]

    def _search(self, consume: bool) -> tuple[int, float] | None:
        budget = SCAN_BUDGET
        # Items already read and read by no stream again.
        for stream in self.streams.values():
            q = stream.never_cursor = max(stream.never_cursor, stream.base)
            while q < stream.pos and budget > 0:
                budget -= 1
                ino = stream.item(q)
                if ino and self.distance(ino) is None and self.holds(ino):
                    stream.never_cursor = q + 1 if consume else q
                    return ino, float("inf")
                q += 1
                stream.never_cursor = q
        # The item whose next read is farthest away, over all streams.
        best: tuple[int, float, Stream, int] | None = None
        for stream in self.streams.values():
            q = min(stream.far_cursor, stream.resolved_end - 1)
            while q >= stream.pos and budget > 0:
                budget -= 1
                ino = stream.item(q)
                if ino and stream.next_use(ino) == q and self.holds(ino):
                    d = self.distance(ino)
                    if d is not None and d == q - stream.pos:  # no other stream reads it sooner
                        if best is None or d > best[1]:
                            best = (ino, d, stream, q)
                        break
                q -= 1
            stream.far_cursor = q
        if best is None:
            return None
        if consume:
            best[2].far_cursor = best[3] - 1
        return best[0], best[1]

    def status(self) -> dict[str, object]:
        return {name: s.status() for name, s in self.streams.items()}
