"""All SQL of the email sender: the daily cap, the suppression list, the bounce record.

The cap is counted when a message is handed to SMTP, per (account, address,
topic, UTC day). A conditional upsert per counter takes the slots, so replicas
racing for the last slot cannot both win: PostgreSQL serialises them on the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

# Suppression reasons. A complaint stops notifications but not the locked
# account topics (support, billing); a mailbox that does not exist stops all.
HARD_BOUNCE = "hard bounce"
SOFT_BOUNCES = "soft bounces"
COMPLAINT = "complaint"
REASONS = (HARD_BOUNCE, SOFT_BOUNCES, COMPLAINT)


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


@dataclass(frozen=True)
class Suppression:
    """An address the account no longer mails, and why."""

    account_id: str
    address: str
    reason: str
    detail: str
    source_delivery: int | None
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True)
class Feedback:
    """One bounce or complaint learnt of a delivery."""

    account_id: str
    delivery_id: int
    kind: str  # "hard bounce" | "soft bounce" | "policy bounce" (5.7.x: recorded, never suppresses) | "complaint"
    address: str
    status: str
    detail: str
    at: datetime


_ACTIVE = "(s.reason <> 'soft bounces' or s.last_seen > now() - make_interval(secs => $3::float8))"


async def suppressed(
    pool: asyncpg.Pool, keys: Sequence[tuple[str, str]], *, soft_expiry_seconds: float
) -> dict[tuple[str, str], str]:
    """Which of ``(account_id, address)`` are suppressed, with the reason; one round trip for a batch.

    Entries for soft bounces lapse ``soft_expiry_seconds`` after they were last seen.
    """
    if not keys:
        return {}
    rows = await pool.fetch(
        f"""
        select s.account_id, s.address, s.reason
        from email.suppressions s
        join unnest($1::text[], $2::text[]) as k(account_id, address)
          on s.account_id = k.account_id and s.address = lower(k.address)
        where {_ACTIVE}
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
        soft_expiry_seconds,
    )
    lowered = {(a, addr.lower()): (a, addr) for a, addr in keys}
    return {lowered[r["account_id"], r["address"]]: r["reason"] for r in rows}


async def suppress(
    pool: asyncpg.Pool, account_id: str, address: str, reason: str, detail: str, source_delivery: int | None
) -> None:
    """Add the address to the account's suppression list, or refresh its entry (first seen is kept).

    A complaint or a hard bounce is never downgraded by a later soft-bounce entry.
    """
    await pool.execute(
        """
        insert into email.suppressions as s (account_id, address, reason, detail, source_delivery)
        values ($1, lower($2), $3, $4, $5)
        on conflict (account_id, address) do update
            set last_seen = now(),
                reason = case when excluded.reason = 'soft bounces' and s.reason <> 'soft bounces'
                              then s.reason else excluded.reason end,
                detail = excluded.detail,
                source_delivery = coalesce(excluded.source_delivery, s.source_delivery)
        """,
        account_id,
        address,
        reason,
        detail.replace("\x00", ""),
        source_delivery,
    )


async def list_suppressions(
    pool: asyncpg.Pool,
    account_id: str,
    *,
    search: str,
    after_address: str,
    limit: int,
    soft_expiry_seconds: float,
) -> list[Suppression]:
    """The account's suppressions in force, in address order, those containing ``search`` (case-insensitive).

    A soft-bounce entry that lapsed is not listed (the sender mails the
    address again) even before the hourly purge deletes it.
    """
    rows = await pool.fetch(
        f"""
        select account_id, address, reason, detail, source_delivery, first_seen, last_seen
        from email.suppressions s
        where account_id = $1 and address > $2 and strpos(address, lower($4)) > 0 and {_ACTIVE}
        order by address
        limit $5
        """,
        account_id,
        after_address.lower(),
        soft_expiry_seconds,
        search,
        limit,
    )
    return [Suppression(**dict(r)) for r in rows]


async def purge_lapsed(pool: asyncpg.Pool, *, soft_expiry_seconds: float) -> int:
    """Delete the soft-bounce entries that lapsed (already ignored by the sender); how many.

    Hard bounces and complaints never lapse. The feedback that led to an
    entry stays in ``email.feedback`` (the deliveries' timelines).
    """
    status = await pool.execute(
        """
        delete from email.suppressions
        where reason = 'soft bounces' and last_seen <= now() - make_interval(secs => $1::float8)
        """,
        soft_expiry_seconds,
    )
    return int(status.split()[-1])


@dataclass(frozen=True)
class Imported:
    """What an import did: addresses newly suppressed, changed to the given reason, or left as they were."""

    added: list[str]
    updated: list[str]
    unchanged: list[str]


async def import_suppressions(
    pool: asyncpg.Pool, account_id: str, entries: Sequence[tuple[str, str, str]], *, soft_expiry_seconds: float
) -> Imported:
    """Suppress ``(address, reason, detail)`` entries (checked, lower-cased, distinct addresses) in one statement.

    An import never weakens an entry: one is replaced only when it was for
    soft bounces (lapsed, or the import gives a reason that never lapses) or
    a complaint that the import says is a hard bounce (which also stops
    the locked topics); first seen and the source delivery are kept.
    Otherwise the entry is left untouched, so importing a list twice
    changes nothing the second time.
    """
    if not entries:
        return Imported([], [], [])
    rows = await pool.fetch(
        """
        insert into email.suppressions as s (account_id, address, reason, detail)
        select $1, i.address, i.reason, i.detail
        from unnest($2::text[], $3::text[], $4::text[]) as i(address, reason, detail)
        on conflict (account_id, address) do update
            set reason = excluded.reason, detail = excluded.detail, last_seen = now()
            where (s.reason = 'soft bounces'
                   and (excluded.reason <> 'soft bounces'
                        or s.last_seen <= now() - make_interval(secs => $5::float8)))
               or (s.reason = 'complaint' and excluded.reason = 'hard bounce')
        returning s.address, (s.xmax = 0) as inserted
        """,
        account_id,
        [e[0] for e in entries],
        [e[1] for e in entries],
        [e[2].replace("\x00", "") for e in entries],
        soft_expiry_seconds,
    )
    # xmax is 0 on a row version this statement inserted, set on one it updated.
    added = sorted(r["address"] for r in rows if r["inserted"])
    updated = sorted(r["address"] for r in rows if not r["inserted"])
    touched = {r["address"] for r in rows}
    return Imported(added, updated, sorted(e[0] for e in entries if e[0] not in touched))


async def remove_suppressions(pool: asyncpg.Pool, account_id: str, addresses: Sequence[str]) -> list[str]:
    """Lift the account's suppression of ``addresses``; the (lower-cased) addresses that were suppressed."""
    rows = await pool.fetch(
        "delete from email.suppressions where account_id = $1 and address = any($2::text[]) returning address",
        account_id,
        [a.lower() for a in addresses],
    )
    return sorted(r["address"] for r in rows)


@dataclass(frozen=True)
class NewFeedback:
    """A bounce or complaint to record: which delivery, what happened to which address."""

    account_id: str
    delivery_id: int
    kind: str
    address: str
    status: str
    detail: str


async def record_feedback(pool: asyncpg.Pool, feedback: NewFeedback, *, window_seconds: float) -> int:
    """Record a bounce or complaint of a delivery; the address's soft bounces within the window, this one included."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            insert into email.feedback (account_id, delivery_id, kind, address, status, detail)
            values ($1, $2, $3, lower($4), $5, $6)
            """,
            feedback.account_id,
            feedback.delivery_id,
            feedback.kind,
            feedback.address,
            feedback.status,
            feedback.detail.replace("\x00", ""),
        )
        count: int = await conn.fetchval(
            """
            select count(*) from email.feedback
            where account_id = $1 and address = lower($2) and kind = 'soft bounce'
              and at > now() - make_interval(secs => $3::float8)
            """,
            feedback.account_id,
            feedback.address,
            window_seconds,
        )
    return count


async def feedback_of(pool: asyncpg.Pool, account_id: str, delivery_id: int) -> list[Feedback]:
    """A delivery's bounces and complaints, oldest first."""
    rows = await pool.fetch(
        """
        select account_id, delivery_id, kind, address, status, detail, at
        from email.feedback where account_id = $1 and delivery_id = $2 order by feedback_id
        """,
        account_id,
        delivery_id,
    )
    return [Feedback(**dict(r)) for r in rows]
