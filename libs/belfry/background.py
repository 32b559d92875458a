"""Background work that keeps going: the one helper every service loop runs under.

A loop or a periodic job that fails (the database restarting, a reset
connection, a bug one row triggers) is logged and tried again after a capped,
jittered backoff; it never stops the service. Only ``stop`` ends the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable

from belfry import log

_LOG = log.get(__name__)

# A loop runs until its stop event is set (sender workers, schedulers).
Loop = Callable[[asyncio.Event], Awaitable[None]]
# Waits up to the given seconds, returning early once the event is set (a clock's ``wait``).
Wait = Callable[[float, asyncio.Event], Awaitable[object]]


class Backoff:
    """Capped exponential backoff with full jitter; ``reset()`` after a success."""

    def __init__(self, *, base: float = 0.2, cap: float = 30.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        """Seconds to wait after one more failure."""
        self.failures += 1
        ceiling = min(self.cap, self.base * 2 ** min(self.failures - 1, 32))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography

    def reset(self) -> None:
        """Forget past failures."""
        self.failures = 0


async def sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop`` is set; True when stopped."""
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    return stop.is_set()


async def keep_running(name: str, loop: Loop, stop: asyncio.Event, *, backoff: Backoff | None = None) -> None:
    """Run ``loop(stop)`` until ``stop`` is set, starting it again whenever it raises.

    A loop that returns on its own before ``stop`` is started again too: a
    service's background work is meant to last as long as the service.
    """
    delays = backoff or Backoff()
    while not stop.is_set():
        try:
            await loop(stop)
        except asyncio.CancelledError:
            raise
        except Exception:
            wait = delays.next()
            _LOG.exception("background loop failed; starting it again", loop=name, retry_in=round(wait, 2))
        else:
            if stop.is_set():
                return
            wait = delays.next()
            _LOG.warning("background loop returned before stop; starting it again", loop=name, retry_in=round(wait, 2))
        if await sleep(stop, wait):
            return


async def every(
    name: str,
    seconds: float,
    job: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    *,
    backoff: Backoff | None = None,
    wait: Wait | None = None,
) -> None:
    """Run ``job()`` every ``seconds`` until ``stop`` is set (the first run at once).

    A failed run is logged and tried again after a backoff shorter than the
    period, so a job missed during a database restart runs soon after it.
    ``wait(seconds, stop)``, when given, replaces the plain sleep between runs
    (an injected clock: a test's manual clock wakes the job when it moves).
    """
    delays = backoff or Backoff(cap=max(0.2, seconds))
    while not stop.is_set():
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            delay = delays.next()
            _LOG.exception("periodic job failed; trying again", job=name, retry_in=round(delay, 2))
        else:
            delays.reset()
            delay = seconds
        if wait is not None:
            await wait(delay, stop)
        elif await sleep(stop, delay):
            return
