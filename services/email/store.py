"""All SQL of the email sender: the daily cap.

The cap is counted when a message is handed to SMTP, per (account, address,
topic, UTC day). One conditional upsert takes the slot, so replicas racing
for the last slot cannot both win: PostgreSQL serialises them on the row.
"""

from __future__ import annotations

import asyncpg


async def take_cap_slot(
    pool: asyncpg.Pool, account_id: str, delivery_id: int, address: str, topic: str, cap: int
) -> bool:
    """True when this delivery may be sent today (it took a slot now or on an earlier attempt)."""
    async with pool.acquire() as conn, conn.transaction():
        # The counter is a soft limit: after a database crash at worst the last
        # few milliseconds of slots are forgotten (a few emails past the cap),
        # so this commit need not wait for the WAL flush on every message.
        await conn.execute("set local synchronous_commit = off")
        first = await conn.fetchval(
            """
            insert into email.cap_slots (account_id, delivery_id, day)
            values ($1, $2, (now() at time zone 'utc')::date)
            on conflict do nothing
            returning true
            """,
            account_id,
            delivery_id,
        )
        if not first:
            return True  # a resend after a crash or retry: it was counted already
        taken = await conn.fetchval(
            """
            insert into email.daily_counts as c (account_id, address, topic, day, sent)
            values ($1, $2, $3, (now() at time zone 'utc')::date, 1)
            on conflict (account_id, address, topic, day) do update set sent = c.sent + 1
            where c.sent < $4
            returning c.sent
            """,
            account_id,
            address.lower(),
            topic,
            cap,
        )
        if taken is None:
            # Over the cap: undo the slot so the record shows only real sends.
            await conn.execute(
                "delete from email.cap_slots where account_id = $1 and delivery_id = $2", account_id, delivery_id
            )
            return False
        return True


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
