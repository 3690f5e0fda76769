"""The planner of announced orders (cache/order.py) on its own: it chooses what the offline
optimum chooses, follows readers that read a little out of order, and stores orders compactly."""

from __future__ import annotations

import random
import sys

from cachefs.cache.order import Order, Planner

from ..fuse.test_order import belady_misses


def order_of(inos: list[int]) -> Order:
    o = Order(len(inos))
    for i, ino in enumerate(inos):
        o.inos[i] = ino
    o.resolved = len(inos)
    o.build_index()
    return o


def test_planner_evicts_and_admits_as_the_optimum() -> None:
    """Three shuffled epochs over 240 items with room for 160, announced one epoch ahead, a
    prefetch window of 16: exactly Belady's number of fetches."""
    n, capacity, window = 240, 160, 16
    rng = random.Random(7)
    epochs = [rng.sample(range(1, n + 1), n) for _ in range(3)]
    held: set[int] = set()
    planner = Planner(held.__contains__)
    fetches = waits = 0
    for e in range(3):
        stream = planner.announce("default", [order_of(x) for x in epochs[e:e + 2]])
        issued = 0
        for ino in epochs[e]:
            issued = max(issued, stream.pos)
            while issued < min(stream.pos + window, stream.end):  # the prefetcher
                item = stream.item(issued)
                if item not in held:
                    if len(held) >= capacity:
                        far = planner.farthest()
                        if far is None or far <= issued - stream.pos:
                            break  # everything cached is read sooner than this
                        held.discard(planner.next_victim())
                    held.add(item)
                    fetches += 1
                issued += 1
            hit = ino in held
            planner.on_read(ino, hit)
            if not hit:  # the reader fetches it itself
                waits += 1
                fetches += 1
                if len(held) < capacity:
                    held.add(ino)
                elif planner.admit(ino, full=True):
                    held.discard(planner.next_victim())
                    held.add(ino)
    seq = [str(i) for e in epochs for i in e]
    assert fetches == belady_misses(seq, capacity)
    assert waits == 0


def test_reader_position_follows_near_order_reads_only() -> None:
    planner = Planner(lambda ino: False)
    stream = planner.announce("default", [order_of(list(range(1, 2001))), order_of(list(range(2001, 1, -1)))])
    for ino in (1, 3, 2, 5, 4):  # workers of a loader, a little out of order
        assert planner.on_read(ino, hit=True)
    assert stream.pos == 5
    assert not planner.on_read(999_999, hit=True)  # not in the order
    assert not planner.on_read(1900, hit=True) and stream.pos == 5  # far ahead: not this reader's
    for ino in range(6, 1990):  # the last ten are never read (drop_last)
        planner.on_read(ino, hit=True)
    assert planner.on_read(2001, hit=True)  # the next epoch's first item: the epoch moves on
    assert (len(stream.orders), stream.pos - stream.base) == (1, 1)


def test_a_finished_order_makes_room_for_anything() -> None:
    held = {1, 2, 3}
    planner = Planner(held.__contains__)
    planner.announce("job", [order_of([1, 2, 3])])
    assert not planner.admit(99, full=True)  # 1, 2, 3 are still to be read: 99 is not announced
    for ino in (1, 2, 3):
        planner.on_read(ino, hit=True)
    assert planner.admit(99, full=True)  # read by no one again: they may go
    assert planner.next_victim() in {1, 2, 3}


def test_orders_are_compact() -> None:
    n = 1_000_000
    o = order_of(list(range(1, n + 1)))
    assert sys.getsizeof(o.inos) + sys.getsizeof(o.index) < 16.1 * n  # 16 bytes per item
    assert o.next_at(123_456, 0) == 123_455 and o.next_at(123_456, 123_456) is None
