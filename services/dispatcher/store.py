"""All of the dispatcher's SQL.

Writes happen inside the caller's transaction (with the queue's enqueue), so
an event's notification, decisions, mention claims and deliveries commit or
vanish together. Bulk statements use ``unnest`` so a batch of a thousand
events costs a handful of round trips.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

# A connection, or one borrowed from the pool (the same API for our purposes).
Conn: TypeAlias = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(frozen=True)
class NotificationRow:
    """The record of one accepted event."""

    account_id: str
    notification_id: uuid.UUID
    idempotency_key: str
    body_hash: bytes
    topic: str
    occurred_at: datetime
    actor_user_id: str
    actor_source: int
    object: dict[str, str]


@dataclass(frozen=True)
class RecipientRow:
    """One candidate's rule outcome and channel decisions."""

    account_id: str
    notification_id: uuid.UUID
    user_id: str
    state: str
    reason: str
    channels: list[dict[str, str]]
    held_until: datetime | None


async def find_keys(
    conn: Conn | asyncpg.Pool, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[uuid.UUID, bytes]]:
    """Notifications already recorded under these (account, idempotency key) pairs."""
    if not keys:
        return {}
    rows = await conn.fetch(
        """
        select n.account_id, n.idempotency_key, n.notification_id, n.body_hash
        from unnest($1::text[], $2::text[]) as k(a, key)
        join dispatcher.notifications n on n.account_id = k.a and n.idempotency_key = k.key
        """,
        [a for a, _ in keys],
        [k for _, k in keys],
    )
    return {(r["account_id"], r["idempotency_key"]): (r["notification_id"], bytes(r["body_hash"])) for r in rows}


async def insert_notifications(
    conn: Conn, rows: Sequence[NotificationRow], recipients: Sequence[RecipientRow] = ()
) -> set[uuid.UUID]:
    """Insert notifications (and, when given, their recipients); return the ids inserted.

    A key taken meanwhile by a concurrent publisher is skipped, with its
    recipients: the concurrent insert waits for the other transaction and
    then skips, which is what makes concurrent duplicates produce exactly one
    notification.
    """
    if not rows:
        return set()
    # Sorted keys: two batches sharing keys lock them in the same order (no deadlock).
    ordered = sorted(rows, key=lambda r: (r.account_id, r.idempotency_key))
    inserted = await conn.fetch(
        """
        with n as (
            insert into dispatcher.notifications
                (account_id, notification_id, idempotency_key, body_hash, topic, occurred_at,
                 actor_user_id, actor_source, object)
            select * from unnest($1::text[], $2::uuid[], $3::text[], $4::bytea[], $5::text[], $6::timestamptz[],
                                 $7::text[], $8::smallint[], $9::jsonb[])
            on conflict (account_id, idempotency_key) where idempotency_key is not null do nothing
            returning notification_id
        ),
        r as (
            insert into dispatcher.recipients (account_id, notification_id, user_id, state, reason, channels, held_until)
            select a, x.n, u, s, r, c::jsonb, h
            from unnest($10::text[], $11::uuid[], $12::text[], $13::text[], $14::text[], $15::text[], $16::timestamptz[])
                as x(a, n, u, s, r, c, h)
            where x.n in (select notification_id from n)
        )
        select notification_id from n
        """,
        [r.account_id for r in ordered],
        [r.notification_id for r in ordered],
        [r.idempotency_key for r in ordered],
        [r.body_hash for r in ordered],
        [r.topic for r in ordered],
        [r.occurred_at for r in ordered],
        [r.actor_user_id for r in ordered],
        [r.actor_source for r in ordered],
        [r.object for r in ordered],
        *_recipient_arrays(recipients),
    )
    return {r["notification_id"] for r in inserted}


def _channels_json(rows: Sequence[RecipientRow]) -> list[str]:
    """Each row's channel record as JSON, encoded once per distinct record object (they are shared)."""
    done: dict[int, str] = {}
    out = []
    for r in rows:
        text = done.get(id(r.channels))
        if text is None:
            text = done[id(r.channels)] = json.dumps(r.channels)
        out.append(text)
    return out


def _recipient_arrays(rows: Sequence[RecipientRow]) -> list[list[Any]]:
    return [
        [r.account_id for r in rows],
        [r.notification_id for r in rows],
        [r.user_id for r in rows],
        [r.state for r in rows],
        [r.reason for r in rows],
        # As text: a list of lists would be taken for a two-dimensional array.
        _channels_json(rows),
        [r.held_until for r in rows],
    ]


async def claim_mentions(conn: Conn, claims: Sequence[tuple[str, str, str, uuid.UUID]]) -> set[tuple[str, str, str]]:
    """Record (account, activity, user, notification) mentions; return those that were the first."""
    if not claims:
        return set()
    ordered = sorted(claims)
    rows = await conn.fetch(
        """
        insert into dispatcher.mentions (account_id, activity_id, user_id, notification_id)
        select * from unnest($1::text[], $2::text[], $3::text[], $4::uuid[])
        on conflict do nothing
        returning account_id, activity_id, user_id
        """,
        [c[0] for c in ordered],
        [c[1] for c in ordered],
        [c[2] for c in ordered],
        [c[3] for c in ordered],
    )
    return {(r["account_id"], r["activity_id"], r["user_id"]) for r in rows}


async def insert_recipients(conn: Conn, rows: Sequence[RecipientRow]) -> None:
    """Record every candidate's outcome."""
    if not rows:
        return
    await conn.execute(
        """
        insert into dispatcher.recipients (account_id, notification_id, user_id, state, reason, channels, held_until)
        select a, n, u, s, r, c::jsonb, h
        from unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[])
            as x(a, n, u, s, r, c, h)
        """,
        *_recipient_arrays(rows),
    )


async def visited(pool: asyncpg.Pool, account_id: str, user_ids: Sequence[str]) -> set[str]:
    """Which of ``user_ids`` have visited the conversations inbox."""
    rows = await pool.fetch(
        "select user_id from dispatcher.inbox_visits where account_id = $1 and user_id = any($2::text[])",
        account_id,
        list(user_ids),
    )
    return {r["user_id"] for r in rows}


async def record_visit(pool: asyncpg.Pool, account_id: str, user_id: str) -> datetime:
    """Remember a visit to the conversations inbox; return the first visit's time."""
    when: datetime = await pool.fetchval(
        """
        with ins as (
            insert into dispatcher.inbox_visits (account_id, user_id) values ($1, $2)
            on conflict do nothing returning first_visited_at
        )
        select first_visited_at from ins
        union all
        select first_visited_at from dispatcher.inbox_visits where account_id = $1 and user_id = $2
        limit 1
        """,
        account_id,
        user_id,
    )
    return when


async def purge(pool: asyncpg.Pool, *, key_hours: float, retention_days: float, batch: int = 5000) -> tuple[int, int]:
    """Forget keys older than ``key_hours``, purge records older than ``retention_days``.

    Returns (keys forgotten, recipient rows purged with their notifications).
    """
    keys = await pool.execute(
        """
        update dispatcher.notifications set idempotency_key = null
        where (account_id, notification_id) in (
            select account_id, notification_id from dispatcher.notifications
            where idempotency_key is not null and accepted_at < now() - make_interval(secs => $1)
            limit $2)
        """,
        key_hours * 3600,
        batch,
    )
    old = await pool.execute(
        """
        with gone as (
            delete from dispatcher.notifications where (account_id, notification_id) in (
                select account_id, notification_id from dispatcher.notifications
                where accepted_at < now() - make_interval(secs => $1) limit $2)
            returning account_id, notification_id)
        delete from dispatcher.recipients r using gone
        where r.account_id = gone.account_id and r.notification_id = gone.notification_id
        """,
        retention_days * 86400,
        batch,
    )
    await pool.execute(
        "delete from dispatcher.mentions where mentioned_at < now() - make_interval(secs => $1)", retention_days * 86400
    )
    return int(keys.split()[-1]), int(old.split()[-1])


async def queue_depth(pool: asyncpg.Pool, *, cap: int) -> int:
    """How many deliveries are due and unclaimed, counted up to ``cap`` (the count stops there)."""
    depth: int = await pool.fetchval(
        """
        select count(*) from (select 1 from queue.deliveries
                              where state = 'queued' and available_at <= now() limit $1) d
        """,
        cap,
    )
    return depth


async def queue_lag(pool: asyncpg.Pool, channels: Sequence[str]) -> float:
    """Seconds the oldest due delivery of any channel has waited (one index probe per channel)."""
    lag: float = await pool.fetchval(
        """
        select coalesce(extract(epoch from now() - min(x.available_at)), 0)::float8
        from unnest($1::text[]) as c(channel),
        lateral (select available_at from queue.deliveries
                 where channel = c.channel and state = 'queued' and available_at <= now()
                 order by available_at limit 1) x
        """,
        list(channels),
    )
    return lag
