"""The sender loop: NOTIFY wake-ups, replicas without double sends, TTL, attempts, retention, gauges."""

from __future__ import annotations

import asyncio
import collections
import uuid

import asyncpg
from belfry import metrics
from belfry.queue import Drop, Lease, Outcome, Queue, Retry, Sent, ops, worker

from tests.queue.queue_helpers import burst, delivery, put, states


async def test_idle_worker_wakes_on_notify_not_polling(pool: asyncpg.Pool, account_id: str) -> None:
    seen = asyncio.Event()

    async def handle(lease: Lease) -> Outcome:
        if lease.account_id == account_id:
            seen.set()
        return Sent()

    stop = asyncio.Event()
    # Polling every hour: only the NOTIFY sent by enqueue's commit can wake it in time.
    task = asyncio.create_task(
        worker.run(Queue(pool, "mobile", worker="w"), handle, stop=stop, poll_seconds=3600, rescue_seconds=3600)
    )
    try:
        await asyncio.sleep(0.1)  # let it go idle first
        await put(pool, [delivery(account_id, "mobile")])
        await asyncio.wait_for(seen.wait(), timeout=30)
    finally:
        stop.set()
        await task
    assert (await states(pool, account_id)).get("sent") == 1


async def test_two_replicas_share_work_without_double_sends(pool: asyncpg.Pool, account_id: str) -> None:
    total = 600
    handled: collections.Counter[uuid.UUID] = collections.Counter()
    by_worker: collections.Counter[str] = collections.Counter()
    done = asyncio.Event()

    def handler(name: str):  # type: ignore[no-untyped-def]
        async def handle(lease: Lease) -> Outcome:
            await asyncio.sleep(0)  # yield so the replicas interleave
            if lease.account_id == account_id:
                handled[lease.notification_id] += 1
                by_worker[name] += 1
                if len(handled) == total:
                    done.set()
            return Sent()

        return handle

    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(worker.run(Queue(pool, "mobile", worker=name), handler(name), stop=stop, batch=25))
        for name in ("a", "b")
    ]
    await put(pool, [delivery(account_id, "mobile", user_id=f"u{i}") for i in range(total)])
    try:
        await asyncio.wait_for(done.wait(), timeout=60)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert len(handled) == total and set(handled.values()) == {1}
    assert by_worker["a"] > 0 and by_worker["b"] > 0
    assert await states(pool, account_id) == {"sent": total}


async def test_retry_past_ttl_expires_and_claims_skip_expired(pool: asyncpg.Pool, account_id: str) -> None:
    short, stale = delivery(account_id, "bell", ttl=30), delivery(account_id, "bell", ttl=30, user_id="u2")
    await put(pool, [short, stale])
    await pool.execute(
        "update queue.deliveries set expires_at = now() - interval '1 second' where notification_id = $1",
        stale.notification_id,
    )
    queue = Queue(pool, "bell", worker="w")
    leases = [x for x in await queue.claim(100) if x.account_id == account_id]
    assert [x.notification_id for x in leases] == [short.notification_id]  # the stale one is never claimed
    assert await queue.expire() >= 1
    # A retry whose earliest next attempt lies beyond the TTL is expired at once, not retried late.
    await queue.settle([(leases[0], Retry("busy", retry_after=3600))])
    assert await states(pool, account_id) == {"expired": 2}


async def test_channel_max_attempts_caps_rows_enqueued_with_more(pool: asyncpg.Pool, account_id: str) -> None:
    item = delivery(account_id, "bell", max_attempts=50)
    await put(pool, [item])
    queue = Queue(pool, "bell", worker="w", max_attempts=2)
    for expected in ("queued", "dead"):
        await pool.execute("update queue.deliveries set available_at = now() where account_id = $1", account_id)
        [lease] = [x for x in await queue.claim(100) if x.account_id == account_id]
        await queue.settle([(lease, Retry("503 unavailable"))])
        assert await states(pool, account_id) == {expected: 1}
    [dead] = await ops.list_dead(pool, account_id)
    assert [e["error"] for e in dead.errors] == ["503 unavailable", "503 unavailable"]


async def test_retention_purges_old_finished_rows_and_gauges_follow(pool: asyncpg.Pool, account_id: str) -> None:
    await burst(pool, account_id, "other_apps", 30)
    queue = Queue(pool, "other_apps", worker="w")
    found = await ops.update_gauges(pool)
    assert found["other_apps"][0] >= 30
    assert metrics.QUEUE_DEPTH.labels("other_apps")._value.get() >= 30
    leases = [x for x in await queue.claim(1000) if x.account_id == account_id]
    await queue.settle([(x, Drop("live tab") if i % 2 else Sent()) for i, x in enumerate(leases)])
    await pool.execute(
        "update queue.deliveries set state = 'dead' where account_id = $1 and user_id = 'u1'", account_id
    )
    # Nothing is old enough yet; then age the finished rows past the retention.
    assert await ops.purge(pool, older_than_seconds=3600) == 0
    await pool.execute(
        "update queue.deliveries set finished_at = now() - interval '2 hours' where account_id = $1", account_id
    )
    assert await ops.purge(pool, older_than_seconds=3600, batch=7) >= 29
    assert await states(pool, account_id) == {"dead": 1}  # dead letters stay until an operator acts


async def _bounded_sleep(seconds: float) -> str:
    """A send bounded to ``seconds`` that would sleep for a minute: how it ended."""
    bound = worker._Bound()
    timer = bound.arm(seconds)
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        if bound.expired():
            return "timed out"
        raise
    finally:
        timer.cancel()
    return "finished"


async def test_a_send_bound_tells_its_own_timeout_from_the_worker_being_cancelled() -> None:
    assert await _bounded_sleep(0.05) == "timed out"
    task = asyncio.create_task(_bounded_sleep(60))
    await asyncio.sleep(0.05)
    task.cancel()  # the worker stops: the cancellation goes on up, it is not a timed-out send
    done, _ = await asyncio.wait([task], timeout=10)
    assert done and task.cancelled()
