"""Helpers shared by the push tests: leases for direct sender calls, waiting for a settled delivery."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from belfry.message import Message
from belfry.queue import Lease


def lease_for(msg: Message, channel: str, *, ttl: timedelta = timedelta(hours=1)) -> Lease:
    """A lease as ``Queue.claim`` returns it, for calling a sender's ``handle`` directly."""
    return Lease(
        delivery_id=1,
        account_id=msg.account_id,
        notification_id=uuid.UUID(msg.notification_id),
        user_id=msg.user_id,
        channel=channel,
        topic=msg.topic,
        payload=msg.to_json(),
        attempts=1,
        max_attempts=8,
        token=1,
        expires_at=datetime.now(UTC) + ttl,
    )


async def settled(pool: asyncpg.Pool, msg: Message, channel: str, *, rounds: int = 500) -> asyncpg.Record:
    """The delivery row once it left the queued/leased states (bounded wait, no timing assertion)."""
    for _ in range(rounds):
        row = await pool.fetchrow(
            "select state, errors from queue.deliveries"
            " where account_id = $1 and notification_id = $2 and channel = $3",
            msg.account_id,
            uuid.UUID(msg.notification_id),
            channel,
        )
        if row is not None and row["state"] not in ("queued", "leased"):
            return row
        await asyncio.sleep(0.02)
    raise AssertionError(f"the {channel} delivery of {msg.notification_id} was never settled")
