"""The one retry mechanism (cachefs/retry.py), on trio's mock clock: jittered exponential
backoff, a deadline that bounds the whole operation (a hanging attempt included), permanent
errors not retried, every retry counted in cachefs_backend_retries_total."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from cachefs import metrics
from cachefs.errors import NotFound, TemporaryFailure
from cachefs.retry import BACKOFF_BASE, BACKOFF_MAX, retrying


def retries(op: str) -> float:
    return float(metrics.backend_retries.labels(op)._value.get())


def run(fn):  # type: ignore[no-untyped-def]
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def failing_times(deadline: float) -> tuple[list[float], float]:
    """Times of every attempt of an always-failing operation, and when it gave up."""
    times: list[float] = []

    async def main() -> float:
        async def attempt() -> None:
            times.append(trio.current_time())
            raise TemporaryFailure("503")

        start = trio.current_time()
        with pytest.raises(TemporaryFailure):
            await retrying("list", attempt, deadline)
        times[:] = [t - start for t in times]
        return trio.current_time() - start

    return times, run(main)


def test_backoff_is_exponential_jittered_and_bounded_by_the_deadline() -> None:
    before = retries("list")
    gaps_by_try: dict[int, list[float]] = {}
    attempts = 0
    for _ in range(100):
        times, took = failing_times(60.0)
        assert took < 60.0  # it never sleeps past the deadline
        attempts += len(times)
        for i, (a, b) in enumerate(itertools.pairwise(times), start=1):
            gap = b - a
            cap = min(BACKOFF_MAX, BACKOFF_BASE * 2**i)
            assert 0 <= gap <= cap + 1e-9, (i, gap, cap)
            gaps_by_try.setdefault(i, []).append(gap)
    # Exponential: the mean wait doubles from one retry to the next until the cap.
    means = [sum(gaps_by_try[i]) / len(gaps_by_try[i]) for i in range(1, 6)]
    assert all(2 * m * 0.6 < n < 2 * m * 1.6 for m, n in itertools.pairwise(means)), means
    # Jittered: waits for the same retry are spread over [0, cap], not one value.
    fourth = gaps_by_try[4]
    cap4 = BACKOFF_BASE * 2**4
    assert min(fourth) < 0.25 * cap4 and max(fourth) > 0.75 * cap4
    assert retries("list") - before == attempts - 100  # every retry counted, not the first tries


def test_success_after_failures_and_permanent_errors() -> None:
    async def main() -> None:
        calls = 0

        async def flaky() -> str:
            nonlocal calls
            calls += 1
            if calls <= 3:
                raise TemporaryFailure("reset")
            return "data"

        before = retries("get")
        assert await retrying("get", flaky, 30) == "data"
        assert calls == 4 and retries("get") - before == 3

        async def missing() -> None:
            nonlocal calls
            calls += 1
            raise NotFound("no such key")

        calls = 0
        with pytest.raises(NotFound):
            await retrying("head", missing, 30)
        assert calls == 1  # a permanent error is not retried

    run(main)


def test_a_hanging_attempt_ends_at_the_deadline() -> None:
    async def main() -> None:
        async def hang() -> None:
            await trio.sleep_forever()  # a store that accepted the connection and never answers

        start = trio.current_time()
        with pytest.raises(TemporaryFailure, match="no answer within 7 s"):
            await retrying("get", hang, 7.0)
        assert trio.current_time() - start == pytest.approx(7.0)

    run(main)
