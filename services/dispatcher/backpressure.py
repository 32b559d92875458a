"""Backpressure: refuse work, with a retry hint, rather than accept it without bound.

Two limits, both answered with RESOURCE_EXHAUSTED and a RetryInfo delay:
- the delivery queue is far behind: more than ``max_depth`` deliveries due and
  unclaimed, or the oldest due one waiting longer than ``max_lag_seconds``;
  or fan-out is: the oldest accepted event not yet fanned out waited longer
  than ``max_fanout_lag_seconds`` (all measured by a background loop, so
  publishing never waits on the count). Fan-out has its own, shorter limit:
  accepting costs a fraction of what fanning out does, so an unchecked
  producer can accept for minutes while the same processes' fan-out falls
  behind, and every notification of those minutes arrives late. Past a limit, only the accounts holding more
  than an equal share of the backlog are refused (the flooding account
  first, ``heavy``); past twice a limit, every account is;
- an account publishes faster than ``account_rate`` events per second
  (a token bucket per account in PostgreSQL, ``account_burst`` deep, shared
  by every replica: ``take_shared``).
"""

from __future__ import annotations

import asyncio
import time
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
    max_fanout_lag_seconds: float = 30.0
    account_rate: float = 0.0
    account_burst: float = 0.0
    refresh_seconds: float = 1.0


class Backpressure:
    """The queue's backlog, refreshed in the background, and the per-account rate buckets (shared)."""

    def __init__(self, pool: asyncpg.Pool, limits: Limits) -> None:
        self._pool = pool
        self.limits = limits
        self.depth = 0
        self.lag = 0.0
        self.fanout_lag = 0.0
        self.backlogs: dict[str, float] = {}  # per account, measured only while a limit is reached
        self._backlogs_due = 0.0  # monotonic time of the next per-account measurement

    async def refresh(self) -> None:
        """Measure the queue's backlog now (only what a configured limit needs)."""
        if self.limits.max_depth:
            self.depth = await store.queue_depth(self._pool, cap=self.limits.max_depth * 2)  # counts to the hard limit
        if self.limits.max_lag_seconds:
            self.lag = await store.queue_lag(self._pool, CHANNELS)
        if self.limits.max_fanout_lag_seconds:
            self.fanout_lag = await store.fanout_lag(self._pool)
        if not self._over(1.0):
            self.backlogs = {}
        elif time.monotonic() >= self._backlogs_due:
            # Who holds the backlog changes slowly, and a refused producer waits ``_HEAVY_WAIT`` anyway.
            self.backlogs = await store.backlog_by_account(
                self._pool, queue=self._queue_over(1.0), fanout=self._fanout_over(1.0)
            )
            self._backlogs_due = time.monotonic() + self._heavy_wait()

    async def loop(self, stop: asyncio.Event) -> None:
        """Background loop: keep the backlog figures fresh."""
        await background.every("queue backlog measurement", self.limits.refresh_seconds, self.refresh, stop)

    def _over(self, factor: float) -> bool:
        return self._queue_over(factor) or self._fanout_over(factor)

    def _queue_over(self, factor: float) -> bool:
        limits = self.limits
        return bool(
            (limits.max_depth and self.depth >= limits.max_depth * factor)
            or (limits.max_lag_seconds and self.lag >= limits.max_lag_seconds * factor)
        )

    def _fanout_over(self, factor: float) -> bool:
        limits = self.limits
        return bool(limits.max_fanout_lag_seconds and self.fanout_lag >= limits.max_fanout_lag_seconds * factor)

    def _heavy_wait(self) -> float:
        """How long a refused producer is told to wait (and how long a measured share of the backlog is trusted)."""
        return max(1.0, self.limits.refresh_seconds * 5)

    def heavy(self, account_id: str) -> float:
        """While a backlog limit is reached: seconds to wait when ``account_id`` holds more than an equal share, else 0."""
        if not self.backlogs or not self._over(1.0):
            return 0.0
        share = self.backlogs.get(account_id, 0.0) / (sum(self.backlogs.values()) or 1.0)
        return self._heavy_wait() if share > 1.0 / len(self.backlogs) else 0.0

    def check_queue(self) -> None:
        """Raise ResourceExhausted when the queue is far behind for everyone: past twice a limit."""
        if not self._over(2.0):
            return
        limits = self.limits
        if limits.max_depth and self.depth >= limits.max_depth:
            raise ResourceExhausted(
                f"the delivery queue holds {self.depth} due deliveries (limit {limits.max_depth}); "
                "publishing is paused until senders catch up",
                retry_after=self._heavy_wait(),
            )
        if limits.max_lag_seconds and self.lag >= limits.max_lag_seconds:
            raise ResourceExhausted(
                f"the delivery queue is {self.lag:.0f} s behind (limit {limits.max_lag_seconds:.0f} s); "
                "publishing is paused until senders catch up",
                retry_after=self._heavy_wait(),
            )
        if limits.max_fanout_lag_seconds and self.fanout_lag >= limits.max_fanout_lag_seconds:
            raise ResourceExhausted(
                f"fan-out is {self.fanout_lag:.0f} s behind (limit {limits.max_fanout_lag_seconds:.0f} s); "
                "publishing is paused until it catches up",
                retry_after=self._heavy_wait(),
            )

    async def take_shared(self, wants: dict[str, int]) -> dict[str, tuple[int, float]]:
        """Spend each account's shared budget: → {account: (events granted, seconds until the next one)}."""
        rate = self.limits.account_rate
        if rate <= 0 or not wants:
            return {a: (n, 0.0) for a, n in wants.items()}
        burst = self.limits.account_burst or rate
        found = await store.take_quota(self._pool, wants, rate=rate, burst=burst)
        missing = {a: n for a, n in wants.items() if a not in found}
        if missing:  # a first row another replica inserted at the same moment: now it exists
            found |= await store.take_quota(self._pool, missing, rate=rate, burst=burst)
        return {
            a: (granted, (1.0 - left) / rate if granted < wants[a] else 0.0) for a, (granted, left) in found.items()
        }
