"""Backpressure: refuse work, with a retry hint, rather than accept it without bound.

Two limits, both answered with RESOURCE_EXHAUSTED and a RetryInfo delay:
- the delivery queue is far behind: more than ``max_depth`` deliveries due and
  unclaimed, or the oldest due one waiting longer than ``max_lag_seconds``;
  or fan-out is: the oldest accepted event not yet fanned out waited longer
  than ``max_lag_seconds`` (both measured by a background loop, so publishing
  never waits on the count);
- an account publishes faster than ``account_rate`` events per second
  (a token bucket per account and replica, ``account_burst`` deep).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from belfry import background
from belfry.errors import ResourceExhausted
from belfry.queue import CHANNELS

from services.dispatcher import store


@dataclass(frozen=True)
class Limits:
    """Thresholds; zero disables a limit."""

    max_depth: int = 200_000
    max_lag_seconds: float = 300.0
    account_rate: float = 0.0
    account_burst: float = 0.0
    refresh_seconds: float = 1.0


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class Backpressure:
    """The queue's backlog, refreshed in the background, and per-account rate buckets."""

    def __init__(self, pool: asyncpg.Pool, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self.limits = limits
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self.depth = 0
        self.lag = 0.0
        self.fanout_lag = 0.0

    async def refresh(self) -> None:
        """Measure the queue's backlog now (only what a configured limit needs)."""
        if self.limits.max_depth:
            self.depth = await store.queue_depth(self._pool, cap=self.limits.max_depth)
        if self.limits.max_lag_seconds:
            self.lag = await store.queue_lag(self._pool, CHANNELS)
            self.fanout_lag = await store.fanout_lag(self._pool)

    async def loop(self, stop: asyncio.Event) -> None:
        """Background loop: keep the backlog figures fresh."""
        await background.every("queue backlog measurement", self.limits.refresh_seconds, self.refresh, stop)

    def check_queue(self) -> None:
        """Raise ResourceExhausted when the queue is far behind."""
        limits = self.limits
        if limits.max_depth and self.depth >= limits.max_depth:
            raise ResourceExhausted(
                f"the delivery queue holds {self.depth} due deliveries (limit {limits.max_depth}); "
                "publishing is paused until senders catch up",
                retry_after=max(1.0, limits.refresh_seconds * 5),
            )
        if limits.max_lag_seconds and self.lag >= limits.max_lag_seconds:
            raise ResourceExhausted(
                f"the delivery queue is {self.lag:.0f} s behind (limit {limits.max_lag_seconds:.0f} s); "
                "publishing is paused until senders catch up",
                retry_after=max(1.0, limits.refresh_seconds * 5),
            )
        if limits.max_lag_seconds and self.fanout_lag >= limits.max_lag_seconds:
            raise ResourceExhausted(
                f"fan-out is {self.fanout_lag:.0f} s behind (limit {limits.max_lag_seconds:.0f} s); "
                "publishing is paused until it catches up",
                retry_after=max(1.0, limits.refresh_seconds * 5),
            )

    def take(self, account_id: str) -> float:
        """Spend one event of the account's budget; 0 when allowed, else seconds to wait."""
        rate = self.limits.account_rate
        if rate <= 0:
            return 0.0
        burst = self.limits.account_burst or rate
        now = self._clock()
        bucket = self._buckets.get(account_id)
        if bucket is None:
            bucket = self._buckets[account_id] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate
