"""The status API's SQL: notifications, their decisions and their deliveries, read back.

The queue's rows are read here, never written (``belfry.queue`` owns them).
Neither are batching's: what became of an assignment handed to batching, and
the merged notifications batching sends, come from the two views batching
keeps as its contract for this API (``batching.assignment_outcomes`` and
``batching.merged_notifications``; see docs/batching.md). The email service
and the gateway keep one view each in the same way: bounces and complaints
per delivery (``email.delivery_feedback``) and the one read state per
notification and user (``gateway.read_state``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

_Conn: TypeAlias = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(frozen=True)
class Feedback:
    """A bounce or complaint the email service learnt of after the relay took the delivery."""

    kind: str  # 'hard bounce' | 'soft bounce' | 'complaint'
    status: str  # RFC 3464 Status, or the ARF Feedback-Type
    detail: str
    at: datetime


@dataclass(frozen=True)
class DeliveryRecord:
    """A queue delivery as the status API reports it."""

    channel: str
    state: str
    attempts: int
    created_at: datetime
    available_at: datetime
    finished_at: datetime | None
    last_error: str
    feedback: tuple[Feedback, ...] = ()


@dataclass(frozen=True)
class BatchingOutcome:
    """What batching did with a recipient's assignment (``batching.assignment_outcomes``)."""

    outcome: str  # held | merged | withdrawn | dropped
    at: datetime
    merged_into: uuid.UUID | None
    reason: str


@dataclass(frozen=True)
class RecipientRecord:
    """A recipient's stored decisions and the deliveries made for them."""

    user_id: str
    state: str
    reason: str
    channels: list[dict[str, str]]
    held_until: datetime | None
    deliveries: tuple[DeliveryRecord, ...]
    batching: BatchingOutcome | None = None
    read_at: datetime | None = None


@dataclass(frozen=True)
class NotificationRecord:
    """A notification with every recipient's timeline."""

    account_id: str
    notification_id: uuid.UUID
    topic: str
    occurred_at: datetime
    accepted_at: datetime
    actor_user_id: str
    actor_source: int
    object: dict[str, Any]
    recipients: tuple[RecipientRecord, ...]
    merged_from: tuple[uuid.UUID, ...] = ()  # a merged notification's sources, oldest first
    fanout: str = ""  # "pending" while recipients are being expanded, "failed" if that ended for good, else ""
    fanout_error: str = ""


_NOTIFICATION_COLUMNS = (
    "account_id, notification_id, topic, occurred_at, accepted_at, actor_user_id, actor_source, object,"
    " (select case when f.not_before = 'infinity' then 'failed' else 'pending' end from dispatcher.fanout f"
    "  where f.account_id = n.account_id and f.notification_id = n.notification_id) as fanout,"
    " (select f.error from dispatcher.fanout f"
    "  where f.account_id = n.account_id and f.notification_id = n.notification_id) as fanout_error"
)


async def get_notification(
    pool: asyncpg.Pool, account_id: str, notification_id: uuid.UUID
) -> NotificationRecord | None:
    """One notification with every recipient and delivery, or None."""
    found = await load_notifications(pool, account_id, [notification_id], user_id=None)
    return found[0] if found else None


async def load_notifications(
    pool: asyncpg.Pool, account_id: str, ids: Sequence[uuid.UUID], *, user_id: str | None
) -> list[NotificationRecord]:
    """Notifications by id (in the given order), recipients limited to ``user_id`` when given.

    An id the dispatcher did not write may be a merged notification of batching's.
    """
    async with pool.acquire() as conn:
        heads = await conn.fetch(
            f"select {_NOTIFICATION_COLUMNS} from dispatcher.notifications n"
            " where account_id = $1 and notification_id = any($2::uuid[])",
            account_id,
            list(ids),
        )
        recipients = await conn.fetch(
            """
            select notification_id, user_id, state, reason, channels, held_until from dispatcher.recipients
            where account_id = $1 and notification_id = any($2::uuid[]) and ($3::text is null or user_id = $3)
            order by notification_id, user_id
            """,
            account_id,
            list(ids),
            user_id,
        )
        # Read-only look at the queue's rows (belfry.queue owns and writes them).
        deliveries = await conn.fetch(
            """
            select delivery_id, notification_id, user_id, channel, state, attempts, created_at, available_at,
                   finished_at, coalesce(errors -> -1 ->> 'error', '') as last_error
            from queue.deliveries
            where account_id = $1 and notification_id = any($2::uuid[]) and ($3::text is null or user_id = $3)
            order by delivery_id
            """,
            account_id,
            list(ids),
            user_id,
        )
        found = {h["notification_id"] for h in heads}
        missing = [i for i in ids if i not in found]
        merged = await _merged(conn, account_id, missing) if missing else []
        handed = [d["notification_id"] for d in deliveries if d["channel"] == "batching"]
        outcomes = await _outcomes(conn, account_id, handed, user_id) if handed else {}
        relayed = [d["delivery_id"] for d in deliveries if d["channel"] == "email" and d["state"] == "sent"]
        feedback = await _feedback(conn, account_id, relayed) if relayed else {}
        reads = await _reads(conn, account_id, list(ids), user_id)
    by_recipient: dict[tuple[uuid.UUID, str], list[DeliveryRecord]] = {}
    for d in deliveries:
        by_recipient.setdefault((d["notification_id"], d["user_id"]), []).append(
            DeliveryRecord(
                d["channel"],
                d["state"],
                d["attempts"],
                d["created_at"],
                d["available_at"],
                d["finished_at"],
                d["last_error"],
                tuple(feedback.get(d["delivery_id"], ())),
            )
        )
    people: dict[uuid.UUID, list[RecipientRecord]] = {}
    for r in recipients:
        key = (r["notification_id"], r["user_id"])
        people.setdefault(r["notification_id"], []).append(
            RecipientRecord(
                r["user_id"],
                r["state"],
                r["reason"],
                r["channels"],
                r["held_until"],
                tuple(by_recipient.get(key, ())),
                outcomes.get(key),
                reads.get(key),
            )
        )
    records = {
        h["notification_id"]: NotificationRecord(
            h["account_id"],
            h["notification_id"],
            h["topic"],
            h["occurred_at"],
            h["accepted_at"],
            h["actor_user_id"],
            h["actor_source"],
            h["object"],
            tuple(people.get(h["notification_id"], ())),
            fanout=h["fanout"] or "",
            fanout_error=h["fanout_error"] or "",
        )
        for h in heads
    }
    for m in merged:
        nid = m["notification_id"]
        people_of = (
            RecipientRecord(
                m["user_id"],
                "accepted",
                "",
                m["channels"],
                None,
                tuple(by_recipient.get((nid, m["user_id"]), ())),
                read_at=reads.get((nid, m["user_id"])),
            ),
        )
        records[nid] = NotificationRecord(
            m["account_id"],
            nid,
            m["topic"],
            m["occurred_at"],
            m["merged_at"],
            "",
            0,
            {"type": m["object_type"], "display_name": m["title"], "url": m["url"]},
            people_of if user_id is None or user_id == m["user_id"] else (),
            tuple(m["source_ids"]),
        )
    return [records[i] for i in ids if i in records]


async def _merged(conn: _Conn, account_id: str, ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    """Batching's merged notifications among ``ids`` (read only: batching owns the view)."""
    return await conn.fetch(
        """
        select account_id, notification_id, user_id, topic, object_type, title, url, channels, merged_at,
               occurred_at, source_ids
        from batching.merged_notifications
        where account_id = $1 and notification_id = any($2::uuid[])
        """,
        account_id,
        list(ids),
    )


async def _outcomes(
    conn: _Conn, account_id: str, ids: Sequence[uuid.UUID], user_id: str | None
) -> dict[tuple[uuid.UUID, str], BatchingOutcome]:
    """What batching did with the assignments of ``ids`` handed to it, per (notification, user)."""
    rows = await conn.fetch(
        """
        select notification_id, user_id, outcome, at, merged_into, reason from batching.assignment_outcomes
        where account_id = $1 and notification_id = any($2::uuid[]) and ($3::text is null or user_id = $3)
        """,
        account_id,
        list(set(ids)),
        user_id,
    )
    return {
        (r["notification_id"], r["user_id"]): BatchingOutcome(r["outcome"], r["at"], r["merged_into"], r["reason"])
        for r in rows
    }


async def _feedback(conn: _Conn, account_id: str, delivery_ids: Sequence[int]) -> dict[int, list[Feedback]]:
    """Bounces and complaints per email delivery, oldest first (read only: the email service owns the view)."""
    found: dict[int, list[Feedback]] = {}
    for r in await conn.fetch(
        """
        select delivery_id, kind, status, detail, at from email.delivery_feedback
        where account_id = $1 and delivery_id = any($2::bigint[])
        order by at
        """,
        account_id,
        list(delivery_ids),
    ):
        found.setdefault(r["delivery_id"], []).append(Feedback(r["kind"], r["status"], r["detail"], r["at"]))
    return found


async def _reads(
    conn: _Conn, account_id: str, ids: Sequence[uuid.UUID], user_id: str | None
) -> dict[tuple[uuid.UUID, str], datetime]:
    """When each recipient read each notification (read only: the gateway owns the view)."""
    rows = await conn.fetch(
        """
        select notification_id, user_id, read_at from gateway.read_state
        where account_id = $1 and notification_id = any($2::uuid[]) and ($3::text is null or user_id = $3)
          and read_at is not null
        """,
        account_id,
        list(ids),
        user_id,
    )
    return {(r["notification_id"], r["user_id"]): r["read_at"] for r in rows}


async def list_for_user(
    pool: asyncpg.Pool, account_id: str, user_id: str, *, before: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[tuple[datetime, uuid.UUID]]:
    """(accepted_at, id) of the user's notifications, newest first, strictly before the cursor."""
    rows = await pool.fetch(
        """
        select accepted_at, notification_id from dispatcher.recipients
        where account_id = $1 and user_id = $2
          and ($3::timestamptz is null or (accepted_at, notification_id) < ($3, $4::uuid))
        order by accepted_at desc, notification_id desc
        limit $5
        """,
        account_id,
        user_id,
        before[0] if before else None,
        before[1] if before else None,
        limit,
    )
    return [(r["accepted_at"], r["notification_id"]) for r in rows]


@dataclass(frozen=True)
class Change:
    """One status change of an account: a delivery's outcome, a bounce or complaint, a read."""

    key: tuple[str, str, str]  # what changed (with ``at``, tells a change read twice from a new one)
    at: datetime
    notification_id: uuid.UUID
    user_id: str
    channel: str  # the delivery's queue channel; "" for a read
    state: str  # a queue state ('sent', 'dead', ...), 'feedback', or 'read'
    reason: str  # a queue state's last error
    what: Feedback | None = None  # a bounce or complaint


async def changes_since(
    pool: asyncpg.Pool, account_id: str, since: datetime, limit: int
) -> tuple[datetime, list[Change], datetime | None]:
    """The account's changes at or after ``since`` (oldest first), the database's time of the reading, and
    where to read on when a source had more than ``limit`` (None: it gave everything it had).

    One snapshot for the three sources (REPEATABLE READ), so the time answers
    for all of them. Read only: the queue, the email service and the gateway
    own these rows (``queue.deliveries``, ``email.delivery_feedback``,
    ``gateway.read_state``).
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        now: datetime = await conn.fetchval("select now()")
        outcomes = await conn.fetch(
            """
            select delivery_id, notification_id, user_id, channel, state, finished_at,
                   coalesce(errors -> -1 ->> 'error', '') as last_error
            from queue.deliveries
            where account_id = $1 and finished_at >= $2
            order by finished_at limit $3
            """,
            account_id,
            since,
            limit,
        )
        feedback = await conn.fetch(
            """
            select f.delivery_id, f.feedback_id, f.kind, f.status, f.detail, f.at, d.notification_id, d.user_id
            from email.delivery_feedback f
            join queue.deliveries d on d.account_id = f.account_id and d.delivery_id = f.delivery_id
            where f.account_id = $1 and f.at >= $2
            order by f.at limit $3
            """,
            account_id,
            since,
            limit,
        )
        reads = await conn.fetch(
            """
            select notification_id, user_id, read_at from gateway.read_state
            where account_id = $1 and read_at >= $2
            order by read_at limit $3
            """,
            account_id,
            since,
            limit,
        )
    changes = [
        Change(("delivery", str(r["delivery_id"]), ""), r["finished_at"], r["notification_id"], r["user_id"],
               r["channel"], r["state"], r["last_error"])
        for r in outcomes
    ] + [
        Change(("feedback", str(r["delivery_id"]), str(r["feedback_id"])), r["at"], r["notification_id"],
               r["user_id"], "email", "feedback", "", Feedback(r["kind"], r["status"], r["detail"], r["at"]))
        for r in feedback
    ] + [
        Change(("read", str(r["notification_id"]), r["user_id"]), r["read_at"], r["notification_id"], r["user_id"],
               "", "read", "")
        for r in reads
    ]  # fmt: skip
    # A source cut at ``limit`` may hold more at its last time: read on from the earliest such time.
    cut = [rows[-1][column] for rows, column in ((outcomes, "finished_at"), (feedback, "at"), (reads, "read_at"))
           if len(rows) >= limit]  # fmt: skip
    return now, sorted(changes, key=lambda c: c.at), min(cut) if cut else None
