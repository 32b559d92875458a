"""The loop every sender runs: wait for work, claim a batch, handle, settle.

Idle senders sleep on LISTEN/NOTIFY and wake within milliseconds of a commit;
``poll_seconds`` is the fallback when a notification is missed (a dropped
listener connection, deliveries that become due by time rather than insert).
Outcomes are written in batches: one statement settles a whole claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import asyncpg

from belfry import log
from belfry.queue import ops
from belfry.queue.store import Lease, Outcome, Queue, Retry, notify_channel

_LOG = log.get(__name__)

Handler = Callable[[Lease], Awaitable[Outcome]]
Preparer = Callable[[list[Lease]], Awaitable[None]]


async def run(
    queue: Queue,
    handle: Handler,
    *,
    stop: asyncio.Event,
    batch: int = 100,
    concurrency: int = 20,
    poll_seconds: float = 1.0,
    rescue_seconds: float = 1.0,
    prepare: Preparer | None = None,
) -> None:
    """Drain ``queue`` with ``handle`` until ``stop`` is set.

    Expired leases are rescued and deliveries past their time to live expired
    at most every ``rescue_seconds`` (not on every claim: under load the claim
    loop runs thousands of times a second).

    ``prepare``, when given, sees each claimed batch once before its leases
    are handled (e.g. to take per-batch database decisions in one round trip);
    if it fails, the handlers still run and must cope on their own.
    """
    wake = asyncio.Event()
    listener: asyncpg.pool.PoolConnectionProxy = await queue.pool.acquire()

    def on_notify(*_: object) -> None:
        wake.set()

    await listener.add_listener(notify_channel(queue.channel), on_notify)
    limiter = asyncio.Semaphore(concurrency)

    async def guarded(lease: Lease) -> tuple[Lease, Outcome]:
        async with limiter:
            try:
                return lease, await handle(lease)
            except Exception as exc:  # a bug in one delivery must not stop the sender
                _LOG.exception("handler crashed", delivery_id=lease.delivery_id)
                return lease, Retry(f"handler crashed: {exc!r}")

    last_rescue = 0.0
    try:
        while not stop.is_set():
            if time.monotonic() - last_rescue >= rescue_seconds:
                await queue.rescue()
                await queue.expire()
                last_rescue = time.monotonic()
            # Clear before claiming: a NOTIFY that lands while we claim must wake the next wait.
            wake.clear()
            leases = await queue.claim(batch)
            if leases:
                if prepare is not None:
                    try:
                        await prepare(leases)
                    except Exception:  # the handlers fall back to their per-lease path
                        _LOG.exception("batch preparation failed", count=len(leases))
                results = await asyncio.gather(*(guarded(lease) for lease in leases))
                lost = len(results) - await queue.settle(results)
                if lost:
                    _LOG.warning("leases lost before settle (another replica owns them now)", count=lost)
                continue
            waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiters, timeout=poll_seconds, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
    finally:
        await listener.remove_listener(notify_channel(queue.channel), on_notify)
        await queue.pool.release(listener)


async def maintain(
    pool: asyncpg.Pool,
    *,
    stop: asyncio.Event,
    retention_seconds: float = 7 * 86400.0,
    every_seconds: float = 60.0,
    gauges_seconds: float = 5.0,
) -> None:
    """Keep the queue table small and its gauges fresh until ``stop`` is set.

    Every ``every_seconds`` finished deliveries older than ``retention_seconds``
    are purged; every ``gauges_seconds`` QUEUE_DEPTH / QUEUE_AGE are refreshed.
    Any number of replicas may run it (purges skip each other's locked rows).
    """
    last_purge = float("-inf")
    while not stop.is_set():
        try:
            await ops.update_gauges(pool)
            if time.monotonic() - last_purge >= every_seconds:
                purged = await ops.purge(pool, older_than_seconds=retention_seconds)
                last_purge = time.monotonic()
                if purged:
                    _LOG.info("purged finished deliveries", count=purged)
        except (OSError, asyncpg.PostgresError) as exc:  # the database may be restarting: try again later
            _LOG.warning("queue maintenance failed", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=gauges_seconds)
