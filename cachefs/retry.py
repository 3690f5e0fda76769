"""One retry mechanism: jittered exponential backoff under a deadline.

SDK clients are configured with no retries of their own so that budgets do not multiply; every
temporary failure comes back here, is counted, and is retried until ``deadline`` seconds have
passed since the first attempt. The deadline also bounds each attempt: one that is still waiting
for an answer when it passes (a store that accepts connections but never replies) is abandoned,
so an operation never takes much longer than ``deadline`` whatever the SDK's own timeouts are.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from . import metrics
from .errors import TemporaryFailure

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_BASE = 0.05  # first retry after up to 50 ms: a throttled store recovers quickly
BACKOFF_MAX = 5.0  # never sleep longer than this between attempts


async def retrying(operation: str, attempt: Callable[[], Awaitable[T]], deadline: float) -> T:
    """Run attempt() until it succeeds, raises a permanent error, or the deadline passes."""
    give_up_at = trio.current_time() + deadline
    tries = 0
    while True:
        try:
            with trio.move_on_at(give_up_at):
                return await attempt()
            raise TemporaryFailure(f"{operation}: no answer within {deadline:g} s")
        except TemporaryFailure as exc:
            tries += 1
            delay = random.uniform(0, min(BACKOFF_MAX, BACKOFF_BASE * 2**tries))
            if trio.current_time() + delay >= give_up_at:
                log.warning("%s failed after %d attempts: %s", operation, tries, exc)
                raise
            metrics.backend_retries.labels(operation).inc()
            log.debug("%s: %s; retry %d in %.2fs", operation, exc, tries, delay)
            await trio.sleep(delay)
