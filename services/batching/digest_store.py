"""SQL of the digests (schema ``batching``): facts, subjects to schedule, runs.

A *subject* is a user who may get a digest (they have tasks or workflow
changes on record) with the instant it fires next. Firing is claimed with a
lease like windows are, and each run is a row keyed by the period (the local
date), inserted in the transaction that enqueues the email: a period fires at
most once whatever the replicas, retries or daylight-saving changes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from belfry.lease import Leases

from services.batching.store import Conn

# How a subject is leased for firing.
SUBJECTS = Leases("batching.digest_subjects", ("account_id", "user_id", "digest"), "batching.lease_tokens")


@dataclass(frozen=True)
class TaskFact:
    """The latest known state of a task."""

    account_id: str
    task_id: str
    user_id: str
    display_name: str
    url: str
    due_at: datetime | None
    is_open: bool
    updated_at: datetime


@dataclass(frozen=True)
class WorkflowChange:
    """One enrolment change in one of the user's workflows."""

    account_id: str
    user_id: str
    delivery_id: int
    workflow_id: str
    workflow_name: str
    change: str
    display_name: str
    url: str
    occurred_at: datetime


@dataclass(frozen=True)
class Subject:
    """A user's digest, leased by this replica."""

    account_id: str
    user_id: str
    digest: str
    time_zone: str
    period: str
    next_fire_at: datetime | None
    last_fired_at: datetime | None
    token: int


async def record_task(conn: Conn, t: TaskFact) -> None:
    """Keep the task's newest state (an older fact arriving late changes nothing) and track its owner."""
    await conn.execute(
        """
        insert into batching.tasks as t (account_id, task_id, user_id, display_name, url, due_at, is_open, updated_at)
        values ($1, $2, $3, $4, $5, $6, $7, $8)
        on conflict (account_id, task_id) do update
            set user_id = excluded.user_id, display_name = excluded.display_name, url = excluded.url,
                due_at = excluded.due_at, is_open = excluded.is_open, updated_at = excluded.updated_at
            where t.updated_at <= excluded.updated_at
        """,
        t.account_id,
        t.task_id,
        t.user_id,
        t.display_name,
        t.url,
        t.due_at,
        t.is_open,
        t.updated_at,
    )
    await _track(conn, t.account_id, t.user_id, "tasks")


async def record_change(conn: Conn, c: WorkflowChange) -> None:
    """Keep a workflow enrolment change for the user's next Friday digest."""
    await conn.execute(
        """
        insert into batching.workflow_changes
            (account_id, user_id, delivery_id, workflow_id, workflow_name, change, display_name, url, occurred_at)
        values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        on conflict do nothing
        """,
        c.account_id,
        c.user_id,
        c.delivery_id,
        c.workflow_id,
        c.workflow_name,
        c.change,
        c.display_name,
        c.url,
        c.occurred_at,
    )
    await _track(conn, c.account_id, c.user_id, "workflows")


async def _track(conn: Conn, account_id: str, user_id: str, digest: str) -> None:
    await conn.execute(
        "insert into batching.digest_subjects (account_id, user_id, digest) values ($1, $2, $3) on conflict do nothing",
        account_id,
        user_id,
        digest,
    )


async def claim(pool: asyncpg.Pool, now: datetime, *, lease: timedelta, worker: str, limit: int) -> list[Subject]:
    """Lease subjects that are due or not scheduled yet (rows other replicas hold are skipped)."""
    return [Subject(**dict(r)) for r in await pool.fetch(_CLAIM, now, now + lease, worker, limit)]


async def reschedule(
    conn: Conn | asyncpg.Pool,
    s: Subject,
    *,
    time_zone: str,
    period: str,
    next_fire_at: datetime,
    fired_at: datetime | None = None,
) -> bool:
    """Set the subject's next fire and release the lease; False when the lease was lost."""
    status = await conn.execute(
        _RESCHEDULE, s.account_id, s.user_id, s.digest, s.token, time_zone, period, next_fire_at, fired_at
    )
    return status.endswith(" 1")


async def postpone(pool: asyncpg.Pool, s: Subject, *, retry_at: datetime, error: str) -> None:
    """Keep a digest that could not fire due, retried at ``retry_at``."""
    await pool.execute(_POSTPONE, s.account_id, s.user_id, s.digest, s.token, retry_at, error[:2000])


async def record_run(
    conn: Conn,
    s: Subject,
    *,
    fired_at: datetime,
    outcome: str,
    notification_id: uuid.UUID | None,
    count: int,
    worker: str,
) -> bool:
    """Claim the subject's current period for good; False when it already fired."""
    inserted = await conn.fetchval(
        """
        insert into batching.digest_runs
            (account_id, user_id, digest, period, fired_at, outcome, notification_id, item_count, fired_by)
        values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        on conflict do nothing returning true
        """,
        s.account_id,
        s.user_id,
        s.digest,
        s.period,
        fired_at,
        outcome,
        notification_id,
        count,
        worker,
    )
    return bool(inserted)


async def open_tasks(conn: Conn, account_id: str, user_id: str) -> list[TaskFact]:
    """The user's open tasks, soonest due first (undated last)."""
    rows = await conn.fetch(
        """
        select account_id, task_id, user_id, display_name, url, due_at, is_open, updated_at from batching.tasks
        where account_id = $1 and user_id = $2 and is_open
        order by due_at nulls last, display_name, task_id
        """,
        account_id,
        user_id,
    )
    return [TaskFact(**dict(r)) for r in rows]


async def changes(conn: Conn, account_id: str, user_id: str, since: datetime, until: datetime) -> list[WorkflowChange]:
    """The user's workflow enrolment changes in (since, until], oldest first."""
    rows = await conn.fetch(
        """
        select account_id, user_id, delivery_id, workflow_id, workflow_name, change, display_name, url, occurred_at
        from batching.workflow_changes
        where account_id = $1 and user_id = $2 and occurred_at > $3 and occurred_at <= $4
        order by occurred_at, delivery_id
        """,
        account_id,
        user_id,
        since,
        until,
    )
    return [WorkflowChange(**dict(r)) for r in rows]


# The lease statements, built once from the helper.
_CLAIM = SUBJECTS.claim(
    "(next_fire_at is null or next_fire_at <= $1)",
    "next_fire_at nulls first",
    """x.account_id, x.user_id, x.digest, coalesce(x.time_zone, '') as time_zone,
       coalesce(x.period, '') as period, x.next_fire_at, x.last_fired_at""",
)
_RESCHEDULE = SUBJECTS.fenced(
    "time_zone = $5, period = $6, next_fire_at = $7, last_fired_at = coalesce($8, last_fired_at), "
    f"attempts = 0, last_error = null, {SUBJECTS.release()}"
)
_POSTPONE = SUBJECTS.fenced(f"{SUBJECTS.hold_off('$5')}, attempts = attempts + 1, last_error = $6")
