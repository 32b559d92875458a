"""The loop every sender runs: wait for work, claim a batch, handle, settle.

Idle senders sleep on LISTEN/NOTIFY and wake within milliseconds of a commit;
``poll_seconds`` is the fallback when a notification is missed (a dropped
listener connection, deliveries that become due by time rather than insert).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg

from belfry import log
from belfry.queue.store import Lease, Outcome, Queue, Retry, notify_channel

_LOG = log.get(__name__)

Handler = Callable[[Lease], Awaitable[Outcome]]


async def run(
    queue: Queue,
    handle: Handler,
    *,
    stop: asyncio.Event,
    batch: int = 100,
    concurrency: int = 20,
    poll_seconds: float = 1.0,
) -> None:
    """Drain ``queue`` with ``handle`` until ``stop`` is set."""
    wake = asyncio.Event()
    listener: asyncpg.Connection = await queue.pool.acquire()

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

    try:
        while not stop.is_set():
            await queue.rescue()
            await queue.expire()
            leases = await queue.claim(batch)
            if leases:
                results = await asyncio.gather(*(guarded(lease) for lease in leases))
                await queue.settle(results)
                continue
            wake.clear()
            waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiters, timeout=poll_seconds, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
    finally:
        await listener.remove_listener(notify_channel(queue.channel), on_notify)
        await queue.pool.release(listener)
