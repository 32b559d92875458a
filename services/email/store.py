"""All SQL of the email sender: the daily cap.

The cap is counted when a message is handed to SMTP, per (account, address,
topic, UTC day). A conditional upsert per counter takes the slots, so replicas
racing for the last slot cannot both win: PostgreSQL serialises them on the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class CapRequest:
    """One delivery asking for a daily-cap slot."""

    account_id: str
    delivery_id: int
    address: str
    topic: str


async def take_cap_slots(pool: asyncpg.Pool, requests: list[CapRequest], cap: int) -> set[int]:
    """The delivery ids that may be sent today (they took a slot now or on an earlier attempt).

    One round trip for the whole batch: ``email.take_cap_slots`` (migration
    0002) takes the slots, counts them under the cap and undoes the slots
    the cap refused, in one transaction.
    """
    if not requests:
        return set()
    rows = await pool.fetch(
        "select delivery_id from email.take_cap_slots($1::text[], $2::bigint[], $3::text[], $4::text[], $5::int)",
        [r.account_id for r in requests],
        [r.delivery_id for r in requests],
        [r.address for r in requests],
        [r.topic for r in requests],
        cap,
    )
    return {row["delivery_id"] for row in rows}


async def purge_counts(pool: asyncpg.Pool, *, keep_days: int = 2) -> int:
    """Forget cap counters of past days (the cap is per UTC day)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "delete from email.cap_slots where day < (now() at time zone 'utc')::date - $1::int", keep_days
        )
        status = await conn.execute(
            "delete from email.daily_counts where day < (now() at time zone 'utc')::date - $1::int", keep_days
        )
    return int(status.split()[-1])
