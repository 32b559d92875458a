"""Operating the queue: dead letters, requeue, statistics, retention, gauges.

Everything here is SQL on ``queue.deliveries`` (this package owns the table);
``belfry.queue.admin`` exposes the account-scoped parts over gRPC and
``belfry.queue.worker.maintain`` runs retention and the gauges on a schedule.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from belfry import metrics
from belfry.queue.store import CHANNELS, notify_channel


@dataclass(frozen=True)
class DeadLetter:
    """A delivery that ran out of attempts or failed permanently, with its error history."""

    delivery_id: int
    account_id: str
    notification_id: uuid.UUID
    user_id: str
    channel: str
    topic: str
    attempts: int
    errors: tuple[dict[str, Any], ...]
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class ChannelStats:
    """One channel's counts by state, and how long its oldest due delivery has waited."""

    channel: str
    counts: dict[str, int]
    oldest_due_seconds: float


async def list_dead(
    pool: asyncpg.Pool, account_id: str, *, channel: str = "", after_id: int = 0, limit: int = 100
) -> list[DeadLetter]:
    """An account's dead letters in id order, from ``after_id`` (keyset pagination)."""
    rows = await pool.fetch(
        """
        select delivery_id, account_id, notification_id, user_id, channel, topic, attempts, errors,
               created_at, finished_at
        from queue.deliveries
        where account_id = $1 and dead and delivery_id > $2 and ($3 = '' or channel = $3)
        order by delivery_id
        limit $4
        """,
        account_id,
        after_id,
        channel,
        limit,
    )
    return [
        DeadLetter(
            delivery_id=r["delivery_id"],
            account_id=r["account_id"],
            notification_id=r["notification_id"],
            user_id=r["user_id"],
            channel=r["channel"],
            topic=r["topic"],
            attempts=r["attempts"],
            errors=tuple(r["errors"]),
            created_at=r["created_at"],
            finished_at=r["finished_at"],
        )
        for r in rows
    ]


async def requeue(pool: asyncpg.Pool, account_id: str, delivery_ids: Sequence[int], *, by: str) -> list[int]:
    """Send dead letters again with a fresh attempt budget; the error history is kept.

    Returns the ids that were requeued (ids that are not this account's dead
    letters are left alone and not returned). The time to live is not
    extended: a requeued delivery past it is expired, never sent late.
    """
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """
            update queue.deliveries
            set state = 'queued', attempts = 0, available_at = now(), finished_at = null,
                errors = errors || jsonb_build_array(jsonb_build_object('at', now(), 'requeued_by', $3::text))
            where account_id = $1 and delivery_id = any($2::bigint[]) and state = 'dead'
            returning delivery_id, channel
            """,
            account_id,
            list(delivery_ids),
            by,
        )
        for channel in {r["channel"] for r in rows}:
            await conn.execute("select pg_notify($1, '')", notify_channel(channel))
    return sorted(r["delivery_id"] for r in rows)


async def stats(pool: asyncpg.Pool, account_id: str | None = None) -> list[ChannelStats]:
    """Counts by channel and state (one account's, or all when ``account_id`` is None)."""
    rows = await pool.fetch(
        """
        select channel, state, count(*) as n,
               coalesce(extract(epoch from now() - min(available_at)
                                 filter (where state = 'queued' and available_at <= now())), 0)::float8 as age
        from queue.deliveries
        where $1::text is null or account_id = $1
        group by channel, state
        order by channel, state
        """,
        account_id,
    )
    by_channel: dict[str, ChannelStats] = {}
    for r in rows:
        current = by_channel.setdefault(r["channel"], ChannelStats(r["channel"], {}, 0.0))
        current.counts[r["state"]] = r["n"]
        if r["age"] > current.oldest_due_seconds:
            by_channel[r["channel"]] = ChannelStats(r["channel"], current.counts, float(r["age"]))
    return list(by_channel.values())


async def update_gauges(pool: asyncpg.Pool) -> dict[str, tuple[int, float]]:
    """Set QUEUE_DEPTH / QUEUE_AGE for every channel from the claimable rows; return them."""
    rows = await pool.fetch(
        """
        select channel, count(*) as depth, coalesce(extract(epoch from now() - min(available_at)), 0)::float8 as age
        from queue.deliveries
        where finished_at is null and available_at <= now() and state = 'queued'
        group by channel
        """
    )
    found = {r["channel"]: (int(r["depth"]), float(r["age"])) for r in rows}
    for channel in CHANNELS:
        depth, age = found.get(channel, (0, 0.0))
        metrics.QUEUE_DEPTH.labels(channel).set(depth)
        metrics.QUEUE_AGE.labels(channel).set(age)
    return found


async def purge(pool: asyncpg.Pool, *, older_than_seconds: float, batch: int = 5000) -> int:
    """Delete finished deliveries (sent, dropped, expired) older than the retention; return how many.

    Dead letters stay until requeued or purged by an operator: they are the
    record of what could not be delivered. Deletes run in small batches that
    skip locked rows, so several replicas can purge at once without blocking
    the claim path.
    """
    total = 0
    after = ""
    while accounts := [r["account_id"] for r in await pool.fetch(_FINISHED_ACCOUNTS, after, _ACCOUNTS_PER_PASS)]:
        while True:
            async with pool.acquire() as conn, conn.transaction():
                gone = await conn.fetch(_PURGE_DELIVERIES, older_than_seconds, batch, accounts)
                await free_messages(conn, {(r["account_id"], r["notification_id"], r["user_id"]) for r in gone})
            total += len(gone)
            if len(gone) < batch:
                break
        after = accounts[-1]
    if total:
        # Make the purged space reusable now rather than at autovacuum's next
        # visit (its one-minute nap lets a busy queue grow by hundreds of MB).
        # SKIP_LOCKED: another replica's vacuum already does the work.
        await pool.execute("vacuum (skip_locked) queue.deliveries, queue.messages")
    return total


# Retention goes account by account (the finished rows are indexed by account, then by when they finished:
# migration 0007): a loose index scan names the next accounts that hold finished rows, one probe each.
_ACCOUNTS_PER_PASS = 500
_FINISHED_ACCOUNTS = """
with recursive walk(account_id, n) as (
    (select account_id, 1 from queue.deliveries
     where finished_at is not null and account_id > $1 order by account_id limit 1)
    union all
    select (select d.account_id from queue.deliveries d
            where d.finished_at is not null and d.account_id > w.account_id order by d.account_id limit 1), w.n + 1
    from walk w where w.account_id is not null and w.n < $2
)
select account_id from walk where account_id is not null
"""

_PURGE_DELIVERIES = """
delete from queue.deliveries d
using (select x.account_id, x.delivery_id from unnest($3::text[]) as a(account_id),
       lateral (select account_id, delivery_id from queue.deliveries
                where account_id = a.account_id and finished_at < now() - make_interval(secs => $1)
                  and state in ('sent', 'dropped', 'expired')
                order by finished_at
                limit $2
                for update skip locked) x
       limit $2) old
where d.account_id = old.account_id and d.delivery_id = old.delivery_id
returning d.account_id, d.notification_id, d.user_id
"""


async def free_messages(conn: asyncpg.pool.PoolConnectionProxy, keys: set[tuple[str, uuid.UUID, str]]) -> None:
    """Delete the shared messages (migration 0006) of ``keys`` that no delivery refers to any more.

    Two statements, inside the purge's transaction. Two replicas may purge a
    message's last two deliveries at once, each seeing the other's (not yet
    committed) delivery still there: each first locks the messages, in key
    order (no deadlock), so the second waits for the first to commit, and its
    check, a statement of its own with a snapshot taken after that wait, sees
    the other's deletion. A message's other deliveries (a held email, a dead
    letter) keep it.
    """
    if not keys:
        return
    columns = ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
    await conn.execute(
        """
        select 1 from queue.messages m
        join unnest($1::text[], $2::uuid[], $3::text[]) as k(a, n, u)
          on m.account_id = k.a and m.notification_id = k.n and m.user_id = k.u
        order by m.account_id, m.notification_id, m.user_id
        for update of m
        """,
        *columns,
    )
    await conn.execute(
        """
        delete from queue.messages m
        using unnest($1::text[], $2::uuid[], $3::text[]) as k(a, n, u)
        where m.account_id = k.a and m.notification_id = k.n and m.user_id = k.u
          and not exists (select 1 from queue.deliveries d
                          where d.account_id = k.a and d.notification_id = k.n and d.user_id = k.u)
        """,
        *columns,
    )
