"""Helpers for the queue tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from belfry.queue import NewDelivery, enqueue


def delivery(account_id: str, channel: str, *, ttl: float = 3600.0, **extra: Any) -> NewDelivery:
    """One delivery of ``account_id`` on ``channel``."""
    return NewDelivery(
        account_id=account_id,
        notification_id=uuid.uuid4(),
        user_id=extra.pop("user_id", "u1"),
        channel=channel,
        topic="contacts.contact_assigned",
        payload={"n": extra.pop("n", 0)},
        expires_at=datetime.now(UTC) + timedelta(seconds=ttl),
        **extra,
    )


async def put(pool: asyncpg.Pool, items: list[NewDelivery]) -> None:
    """Enqueue in one transaction, as a producer would."""
    async with pool.acquire() as conn, conn.transaction():
        await enqueue(conn, items)


async def burst(pool: asyncpg.Pool, account_id: str, channel: str, count: int) -> None:
    """``count`` deliveries for one account in one statement (a producer's bulk insert)."""
    await pool.execute(
        """
        insert into queue.deliveries (account_id, notification_id, user_id, channel, topic, payload, expires_at)
        select $1, gen_random_uuid(), 'u' || i, $2, 'contacts.contact_assigned', '{}'::jsonb, now() + interval '1 hour'
        from generate_series(1, $3) as i
        """,
        account_id,
        channel,
        count,
    )


async def states(pool: asyncpg.Pool, account_id: str) -> dict[str, int]:
    """The account's deliveries counted by state."""
    rows = await pool.fetch(
        "select state, count(*) as n from queue.deliveries where account_id = $1 group by state", account_id
    )
    return {r["state"]: r["n"] for r in rows}
