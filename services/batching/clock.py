"""The service's clock: the system clock in production, a manual one in tests.

Windows and digests are timed by this clock (never by the database's
``now()``), so a test can move a week forward in a millisecond. The manual
clock wakes the background loops whenever it moves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from belfry import background


class Clock(Protocol):
    """Tells the time and lets loops wait for it to move."""

    def now(self) -> datetime:
        """The current instant (aware, UTC)."""

    async def wait(self, seconds: float, stop: asyncio.Event) -> None:
        """Return after ``seconds``, when ``stop`` is set, or (manual clocks) when time moves."""


class SystemClock:
    """Wall-clock time."""

    def now(self) -> datetime:
        """The current instant (aware, UTC)."""
        return datetime.now(UTC)

    async def wait(self, seconds: float, stop: asyncio.Event) -> None:
        """Sleep up to ``seconds`` unless ``stop`` is set first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)


class ManualClock:
    """A clock that moves only when told to; every move wakes the waiting loops."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("the manual clock needs an aware datetime")
        self._now = start.astimezone(UTC)
        self._moved = asyncio.Event()

    def now(self) -> datetime:
        """The instant the clock was last set to."""
        return self._now

    def set(self, instant: datetime) -> None:
        """Jump to ``instant`` (forward or back) and wake the loops."""
        self._now = instant.astimezone(UTC)
        self._moved.set()
        self._moved = asyncio.Event()

    def advance(self, seconds: float) -> None:
        """Move forward by ``seconds`` and wake the loops."""
        self.set(self._now + timedelta(seconds=seconds))

    async def wait(self, seconds: float, stop: asyncio.Event) -> None:
        """Return when the clock moves, ``stop`` is set, or ``seconds`` of real time pass."""
        moved = asyncio.ensure_future(self._moved.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([moved, stopped], timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            moved.cancel()
            stopped.cancel()


async def repeat(
    tick: Callable[[], Awaitable[int]], *, clock: Clock, stop: asyncio.Event, batch: int, every: float, what: str
) -> None:
    """Run ``tick`` until ``stop``: again at once while it leases full batches, else after ``every`` seconds.

    It runs under ``belfry.background.every``, waiting on ``clock``: a failed
    tick (a database outage) is logged and tried again, never fatal.
    """

    async def drain() -> None:
        while await tick() >= batch and not stop.is_set():
            pass

    await background.every(what, every, drain, stop, wait=clock.wait)
