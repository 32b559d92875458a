"""Core queue contract: enqueue, claim with a lease, fenced settle."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from belfry.queue import Fail, NewDelivery, Queue, Retry, Sent, enqueue


def _delivery(account_id: str, channel: str = "email") -> NewDelivery:
    return NewDelivery(
        account_id=account_id,
        notification_id=uuid.uuid4(),
        user_id="u1",
        channel=channel,
        topic="contacts.contact_assigned",
        payload={"title": "hello"},
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )


async def _state(pool: asyncpg.Pool, notification_id: uuid.UUID) -> str:
    return str(await pool.fetchval("select state from queue.deliveries where notification_id = $1", notification_id))


async def test_claim_settle_and_stale_token(pool: asyncpg.Pool, account_id: str) -> None:
    item = _delivery(account_id, channel="mobile")
    async with pool.acquire() as conn:
        assert await enqueue(conn, [item, item]) == 1  # the duplicate is ignored
    first = Queue(pool, "mobile", worker="a", lease_seconds=0.0)
    [lease] = [x for x in await first.claim(100) if x.notification_id == item.notification_id]
    assert await _state(pool, item.notification_id) == "leased"
    # The lease (0 s) already ran out: another replica rescues and claims it.
    second = Queue(pool, "mobile", worker="b", lease_seconds=30.0)
    await second.rescue()
    [again] = [x for x in await second.claim(100) if x.notification_id == item.notification_id]
    assert again.token != lease.token and again.attempts == 2
    assert await first.settle([(lease, Fail("late"))]) == 0  # stale token: no change
    assert await _state(pool, item.notification_id) == "leased"
    assert await second.settle([(again, Sent())]) == 1
    assert await _state(pool, item.notification_id) == "sent"


async def test_retry_then_dead_letter_keeps_history(pool: asyncpg.Pool, account_id: str) -> None:
    item = _delivery(account_id, channel="other_apps")
    async with pool.acquire() as conn:
        await enqueue(conn, [item])
    queue = Queue(pool, "other_apps", worker="a")
    [lease] = [x for x in await queue.claim(100) if x.notification_id == item.notification_id]
    assert await queue.settle([(lease, Retry("503", retry_after=60))]) == 1
    row = await pool.fetchrow(
        "select state, available_at - now() as wait, errors from queue.deliveries where notification_id = $1",
        item.notification_id,
    )
    assert row is not None
    assert row["state"] == "queued" and row["wait"] >= timedelta(seconds=59)
    await pool.execute(
        "update queue.deliveries set available_at = now() where notification_id = $1", item.notification_id
    )
    [lease] = [x for x in await queue.claim(100) if x.notification_id == item.notification_id]
    await queue.settle([(lease, Fail("410 gone"))])
    row = await pool.fetchrow(
        "select state, errors from queue.deliveries where notification_id = $1", item.notification_id
    )
    assert row is not None
    assert row["state"] == "dead"
    assert [e["error"] for e in row["errors"]] == ["503", "410 gone"]
