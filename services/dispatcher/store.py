"""All of the dispatcher's SQL.

Accepting writes each event once (its notification row, carrying the event
and its idempotency key) with a row in the fan-out backlog, in one statement.
A fan-out worker then writes, inside one transaction of its own, the
recipient records, mention claims and deliveries of the events it claimed
and removes (or advances) their backlog rows: all of it commits or none of
it does. Bulk statements use ``unnest`` so a batch of a thousand events
costs a handful of round trips.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg
from belfry.config import AccountRange

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
    event: dict[str, Any]  # what fan-out needs beyond the columns: recipients, mentions, variables, ...


# The key of ``NotificationRow.event`` holding the publishing call's trace id (32 hex digits), when it had one.
TRACE_FIELD = "trace_id"
# How long an idempotency key is remembered unless configured otherwise (BELFRY_DISPATCHER_IDEMPOTENCY_HOURS).
KEY_SECONDS = 24 * 3600.0

# Fan-out workers LISTEN here; an accept's NOTIFY is sent when it commits.
FANOUT_CHANNEL = "belfry_dispatcher_fanout"


@dataclass(frozen=True)
class Backlog:
    """A claimed fan-out backlog row with its notification."""

    row: NotificationRow
    accepted_at: datetime
    position: int
    attempts: int


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
    conn: Conn | asyncpg.Pool, keys: Sequence[tuple[str, str]], *, key_seconds: float = KEY_SECONDS
) -> dict[tuple[str, str], tuple[uuid.UUID, bytes]]:
    """Notifications recorded under these (account, idempotency key) pairs within the last ``key_seconds``.

    A key older than that is forgotten even before the purge has cleared it (``forget_stale_keys``).
    """
    if not keys:
        return {}
    rows = await conn.fetch(
        """
        select n.account_id, n.idempotency_key, n.notification_id, n.body_hash
        from unnest($1::text[], $2::text[]) as k(a, key)
        join dispatcher.notifications n on n.account_id = k.a and n.idempotency_key = k.key
        where n.accepted_at > now() - make_interval(secs => $3)
        """,
        [a for a, _ in keys],
        [k for _, k in keys],
        key_seconds,
    )
    return {(r["account_id"], r["idempotency_key"]): (r["notification_id"], bytes(r["body_hash"])) for r in rows}


async def forget_stale_keys(pool: asyncpg.Pool, keys: Sequence[tuple[str, str]], *, key_seconds: float) -> int:
    """Clear these keys where they are older than ``key_seconds`` (the purge had not reached them yet).

    Called only for keys whose insert found them taken, so a key is free again
    exactly when its time is up, however far behind the purge runs; returns
    how many were cleared (their events can then be inserted).
    """
    status = await pool.execute(
        """
        update dispatcher.notifications n set idempotency_key = null
        from unnest($1::text[], $2::text[]) as k(a, key)
        where n.account_id = k.a and n.idempotency_key = k.key
          and n.accepted_at <= now() - make_interval(secs => $3)
        """,
        [a for a, _ in keys],
        [k for _, k in keys],
        key_seconds,
    )
    return int(status.split()[-1])


async def accept(conn: Conn | asyncpg.Pool, rows: Sequence[NotificationRow]) -> set[uuid.UUID]:
    """Record events and their fan-out backlog rows in one statement; return the ids inserted.

    A key taken meanwhile by a concurrent publisher is skipped: the concurrent
    insert waits for the other transaction and then skips, which is what makes
    concurrent duplicates produce exactly one notification. The NOTIFY that
    wakes the fan-out workers is part of the statement (sent on commit).
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
                 actor_user_id, actor_source, object, event)
            select * from unnest($1::text[], $2::uuid[], $3::text[], $4::bytea[], $5::text[], $6::timestamptz[],
                                 $7::text[], $8::smallint[], $9::jsonb[], $10::jsonb[])
            on conflict (account_id, idempotency_key) where idempotency_key is not null do nothing
            returning account_id, notification_id, accepted_at
        ),
        f as (
            insert into dispatcher.fanout (account_id, notification_id, accepted_at)
            select account_id, notification_id, accepted_at from n
        )
        select n.notification_id, pg_notify($11, '') from n
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
        [r.event for r in ordered],
        FANOUT_CHANNEL,
    )
    return {r["notification_id"] for r in inserted}


async def claim_fanout(
    conn: Conn, limit: int, after: str, upto: str | None = None, *, accounts: AccountRange = AccountRange.ALL
) -> list[Backlog]:
    """Lock up to ``limit`` due backlog rows (inside the caller's transaction), fairly across accounts.

    Accounts after ``after`` (and up to ``upto`` when given), within
    ``accounts``, are visited in order; each gets an equal share of
    ``limit``, oldest first. Rows other workers hold are skipped; the locks
    last until the caller's transaction ends (so a second claim in it must
    not overlap the first: ``upto``).
    """
    rows = await conn.fetch(_CLAIM_FANOUT, limit, after, upto, accounts.lower, accounts.upper or None)
    return [
        Backlog(
            row=NotificationRow(
                account_id=r["account_id"],
                notification_id=r["notification_id"],
                idempotency_key=r["idempotency_key"] or "",
                body_hash=bytes(r["body_hash"]),
                topic=r["topic"],
                occurred_at=r["occurred_at"],
                actor_user_id=r["actor_user_id"],
                actor_source=r["actor_source"],
                object=r["object"],
                event=r["event"] or {},
            ),
            accepted_at=r["accepted_at"],
            position=r["position"],
            attempts=r["attempts"],
        )
        for r in rows
    ]


async def finish_fanout(
    conn: Conn,
    done: Sequence[tuple[str, uuid.UUID]],
    advanced: Sequence[tuple[str, uuid.UUID, int]],
    retry: Sequence[tuple[str, uuid.UUID, float, str]],
    failed: Sequence[tuple[str, uuid.UUID, str]],
) -> None:
    """Settle claimed backlog rows: fanned out (removed), advanced to a position, retried later, failed for good."""
    if done:
        await conn.execute(
            """
            delete from dispatcher.fanout f using unnest($1::text[], $2::uuid[]) as x(a, n)
            where f.account_id = x.a and f.notification_id = x.n
            """,
            [d[0] for d in done],
            [d[1] for d in done],
        )
    if advanced:
        await conn.execute(
            """
            update dispatcher.fanout f set position = x.p
            from unnest($1::text[], $2::uuid[], $3::int[]) as x(a, n, p)
            where f.account_id = x.a and f.notification_id = x.n
            """,
            [a[0] for a in advanced],
            [a[1] for a in advanced],
            [a[2] for a in advanced],
        )
    if retry or failed:
        await conn.execute(
            """
            update dispatcher.fanout f
            set attempts = f.attempts + 1, error = x.e,
                not_before = case when x.d is null then 'infinity' else now() + make_interval(secs => x.d) end
            from unnest($1::text[], $2::uuid[], $3::float8[], $4::text[]) as x(a, n, d, e)
            where f.account_id = x.a and f.notification_id = x.n
            """,
            [r[0] for r in retry] + [f[0] for f in failed],
            [r[1] for r in retry] + [f[1] for f in failed],
            [r[2] for r in retry] + [None] * len(failed),
            [r[3] for r in retry] + [f[2] for f in failed],
        )


async def fanout_lag(conn: Conn | asyncpg.Pool) -> float:
    """Seconds the oldest event waiting for fan-out has waited (0 when none waits)."""
    lag: float = await conn.fetchval(
        """
        select coalesce(extract(epoch from now() - min(accepted_at)), 0)::float8
        from dispatcher.fanout where not_before < 'infinity'
        """
    )
    return lag


async def fanout_state(
    conn: Conn | asyncpg.Pool, account_id: str, notification_id: uuid.UUID
) -> tuple[str, str] | None:
    """``("pending" | "failed", error)`` while a notification waits for (or failed) fan-out; None once fanned out."""
    row = await conn.fetchrow(
        """select not_before = 'infinity' as failed, error from dispatcher.fanout
           where account_id = $1 and notification_id = $2""",
        account_id,
        notification_id,
    )
    if row is None:
        return None
    return ("failed" if row["failed"] else "pending", row["error"] or "")


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


async def visited(pool: Conn | asyncpg.Pool, account_id: str, user_ids: Sequence[str]) -> set[str]:
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
    """Forget keys older than ``key_hours``, purge records older than ``retention_days``, until none is left.

    Each batch is a statement (and a transaction) of its own, so no lock is
    held long; the loop goes on while batches come back full. (One batch per
    run, as before, forgot and purged at most 5,000 notifications a minute:
    83 a second per replica, far below what the dispatcher accepts.)
    Returns (keys forgotten, notifications purged with their decisions).
    """
    # Purged first: a notification past its retention is deleted, not rewritten without its key and then deleted.
    old = await _in_batches(pool, _PURGE_NOTIFICATIONS, retention_days * 86400, batch)
    keys = await _in_batches(pool, _FORGET_KEYS, key_hours * 3600, batch)
    await pool.execute(
        "delete from dispatcher.mentions where mentioned_at < now() - make_interval(secs => $1)", retention_days * 86400
    )
    return keys, old


async def _in_batches(pool: asyncpg.Pool, statement: str, seconds: float, batch: int) -> int:
    """Run ``statement`` (an age in seconds, a batch size; it returns its count) until a batch comes back short."""
    total = 0
    while True:
        done: int = await pool.fetchval(statement, seconds, batch)
        total += done
        if done < batch:
            return total


# The keys of up to $2 notifications older than $1 seconds (notifications_key_age names them).
_FORGET_KEYS = """
with forgotten as (
    update dispatcher.notifications set idempotency_key = null
    where (account_id, notification_id) in (
        select account_id, notification_id from dispatcher.notifications
        where idempotency_key is not null and accepted_at < now() - make_interval(secs => $1)
        limit $2)
    returning 1)
select count(*) from forgotten
"""

# Up to $2 notifications older than $1 seconds, with their backlog rows and decisions; counts the notifications.
_PURGE_NOTIFICATIONS = """
with gone as (
    delete from dispatcher.notifications where (account_id, notification_id) in (
        select account_id, notification_id from dispatcher.notifications
        where accepted_at < now() - make_interval(secs => $1) limit $2)
    returning account_id, notification_id)
, backlog as (
    delete from dispatcher.fanout f using gone
    where f.account_id = gone.account_id and f.notification_id = gone.notification_id)
, decisions as (
    delete from dispatcher.recipients r using gone
    where r.account_id = gone.account_id and r.notification_id = gone.notification_id)
select count(*) from gone
"""


async def queue_depth(pool: asyncpg.Pool, *, cap: int) -> int:
    """How many deliveries are due and unclaimed, counted up to ``cap`` (the count stops there).

    ``finished_at is null`` lets it read queue.deliveries_due (migration 0005), not the whole table.
    """
    depth: int = await pool.fetchval(
        """
        select count(*) from (select 1 from queue.deliveries
                              where finished_at is null and available_at <= now() and state = 'queued'
                              limit $1) d
        """,
        cap,
    )
    return depth


async def take_quota(
    pool: asyncpg.Pool, wants: dict[str, int], *, rate: float, burst: float
) -> dict[str, tuple[int, float]]:
    """Spend up to ``wants[account]`` tokens of each account's shared bucket: → {account: (granted, tokens left)}.

    One statement for every account of a call. A new account's bucket starts
    full; an account whose first row another replica inserted concurrently is
    missing from the answer (the caller asks again).
    """
    rows = await pool.fetch(
        """
        with want as (select * from unnest($1::text[], $2::int[]) as w(account_id, n)),
        fresh as (
            insert into dispatcher.publish_quota (account_id, tokens, stamp, last_grant)
            select account_id, $3 - least(n, floor($3)), now(), least(n, floor($3)) from want
            on conflict (account_id) do nothing
            returning account_id, last_grant, tokens
        ),
        spent as (
            update dispatcher.publish_quota q
               set tokens = least($3, q.tokens + extract(epoch from now() - q.stamp) * $4)
                            - least(w.n, floor(least($3, q.tokens + extract(epoch from now() - q.stamp) * $4))),
                   last_grant = least(w.n, floor(least($3, q.tokens + extract(epoch from now() - q.stamp) * $4))),
                   stamp = now()
              from want w
             where q.account_id = w.account_id
            returning q.account_id, q.last_grant, q.tokens
        )
        select * from fresh union all select * from spent
        """,
        list(wants),
        list(wants.values()),
        burst,
        rate,
    )
    return {r["account_id"]: (int(r["last_grant"]), float(r["tokens"])) for r in rows}


async def backlog_by_account(
    pool: asyncpg.Pool, *, queue: bool, fanout: bool, sample_rows: int = 20_000
) -> dict[str, float]:
    """Each account's backlog: due deliveries (``queue``) and events awaiting fan-out (``fanout``), estimated.

    Read only while a backlog limit is reached, and only the part whose limit
    is: each from a page sample (TABLESAMPLE SYSTEM) sized for about
    ``sample_rows`` rows, scaled back up, so the cost does not grow with the
    flood it measures (a full count of a 150,000-event fan-out backlog took
    87 ms of the server's time each second, under bench/e2e_sustained.py).
    """
    found: dict[str, float] = {}
    for wanted, table, where in (
        (queue, "queue.deliveries", "finished_at is null and available_at <= now() and state = 'queued'"),
        (fanout, "dispatcher.fanout", "not_before < 'infinity'"),
    ):
        if not wanted:
            continue
        rows_estimate: float = await pool.fetchval(
            "select greatest(reltuples, 1)::float8 from pg_class where oid = $1::regclass", table
        )
        percent = min(100.0, 100.0 * sample_rows / max(rows_estimate, 1.0))
        for r in await pool.fetch(
            f"select account_id, count(*)::float8 as n from {table} tablesample system ($1) where {where} group by 1",
            percent,
        ):
            found[r["account_id"]] = found.get(r["account_id"], 0.0) + r["n"] * 100.0 / percent
    return found


async def queue_lag(pool: asyncpg.Pool, channels: Sequence[str]) -> float:
    """Seconds the oldest due delivery of any channel has waited (one index probe per channel)."""
    lag: float = await pool.fetchval(
        """
        select coalesce(extract(epoch from now() - min(x.available_at)), 0)::float8
        from unnest($1::text[]) as c(channel),
        lateral (select available_at from queue.deliveries
                 where channel = c.channel and finished_at is null and available_at <= now() and state = 'queued'
                 order by available_at limit 1) x
        """,
        list(channels),
    )
    return lag


# One statement: walk the accounts with due backlog (a loose index scan on
# fanout_due: one probe per account), give each an equal share of the limit,
# and lock those rows (skipping other workers' locks).
_CLAIM_FANOUT = """
with recursive walk(account_id, n) as (
    (select account_id, 1 from dispatcher.fanout
     where not_before <= now() and account_id > $2 and ($3::text is null or account_id <= $3)
       and account_id >= $4 and ($5::text is null or account_id < $5)
     order by account_id limit 1)
    union all
    select nxt.account_id, w.n + 1 from walk w,
    lateral (select f.account_id from dispatcher.fanout f
             where f.not_before <= now() and f.account_id > w.account_id and ($3::text is null or f.account_id <= $3)
               and ($5::text is null or f.account_id < $5)
             order by f.account_id limit 1) nxt
    where w.n < $1
),
share as (select greatest(1, ceil($1::float8 / nullif(count(*), 0)))::int as per from walk),
picked as (
    select p.* from walk w, share s,
    lateral (select f.account_id, f.notification_id, f.accepted_at, f.position, f.attempts
             from dispatcher.fanout f
             where f.account_id = w.account_id and f.not_before <= now()
             order by f.not_before limit s.per
             for update skip locked) p
    limit $1
)
select p.accepted_at, p.position, p.attempts, n.*
from picked p join dispatcher.notifications n
    on n.account_id = p.account_id and n.notification_id = p.notification_id
"""
