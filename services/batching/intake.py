"""The ``batching`` queue channel's handler: store each handoff in batching's tables.

Each delivery is applied in one transaction that also records its delivery
id; settling it is a separate statement, so a crash in between makes the
queue deliver it again, and the recorded id turns the second copy into a
no-op. Assignments join their user's window; digest facts update the task
list or the workflow changes of the user's next digest.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
from belfry import handoff, log
from belfry.handoff import Assignment, DigestFact
from belfry.queue import Drop, Fail, Lease, Outcome, Sent

from services.batching import digest_store, store
from services.batching.clock import Clock
from services.batching.store import Conn

_LOG = log.get(__name__)
_CLOSED = {"completed", "complete", "done", "closed", "deleted", "cancelled", "canceled"}


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 instant or date (naive values are UTC); None when absent or unreadable."""
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        try:
            parsed = datetime.combine(date.fromisoformat(value), datetime.min.time())
        except ValueError:
            return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class Intake:
    """Applies ``batching`` deliveries; ``handle`` is given to ``belfry.queue.worker.run``."""

    def __init__(self, pool: asyncpg.Pool, clock: Clock, *, window: timedelta) -> None:
        self._pool = pool
        self._clock = clock
        self._window = window

    async def handle(self, lease: Lease) -> Outcome:
        """Apply one delivery exactly once (by delivery id)."""
        try:
            item = handoff.from_payload(lease.payload)
        except (ValueError, TypeError, KeyError) as exc:
            return Fail(f"unreadable batching payload: {exc!r}")
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            if not await store.mark_received(conn, lease.account_id, lease.delivery_id, now):
                return Sent()  # applied before a crash kept it from being settled
            if isinstance(item, Assignment):
                return await self._assignment(conn, lease, item, now)
            return await self._fact(conn, lease, item)

    async def _assignment(self, conn: Conn, lease: Lease, a: Assignment, now: datetime) -> Outcome:
        if a.message.account_id != lease.account_id or a.message.user_id != lease.user_id:
            return Fail("assignment message names another account or user than its delivery")
        assigned_at = parse_time(a.assigned_at)
        expires_at = parse_time(a.expires_at) or lease.expires_at
        if assigned_at is None:
            return Fail(f"assignment has no readable assigned_at: {a.assigned_at!r}")
        row = store.AssignmentRow(
            account_id=lease.account_id,
            delivery_id=lease.delivery_id,
            notification_id=lease.notification_id,
            user_id=lease.user_id,
            actor_user_id=a.message.actor_user_id,
            object_type=a.object_type,
            object_id=a.object_id,
            topic=a.message.topic,
            assigned_at=assigned_at,
            expires_at=expires_at,
            channels=a.channels,
            message=a.message.to_json(),
        )
        outcome = await store.add_assignment(conn, row, now, self._window)
        if outcome == "stale":
            return Drop("a newer assignment of this object was seen already")
        if outcome == "self":
            return Drop("self-assignment: nobody is told about their own action")
        return Sent()

    async def _fact(self, conn: Conn, lease: Lease, f: DigestFact) -> Outcome:
        if f.account_id != lease.account_id or f.user_id != lease.user_id:
            return Fail("digest fact names another account or user than its delivery")
        occurred = parse_time(f.occurred_at) or self._clock.now()
        category = f.topic.partition(".")[0]
        if category == "tasks" and "mention" in f.topic:
            # A mention in a task note names a user who does not own the task.
            return Drop(f"{f.topic} does not change who owns the task or its state")
        if category == "tasks":
            status = str(f.data.get("status", "")).lower()
            task = digest_store.TaskFact(
                account_id=f.account_id,
                task_id=f.object_id,
                user_id=f.user_id,
                display_name=f.display_name,
                url=f.url,
                due_at=parse_time(f.data.get("due_at") or f.data.get("due_date")),
                is_open=status not in _CLOSED and not f.data.get("completed"),
                updated_at=occurred,
            )
            await digest_store.record_task(conn, task)
            return Sent()
        change = f.data.get("change") or f.data.get("enrolment_change") or f.data.get("enrollment_change")
        if category == "workflows" and change:
            await digest_store.record_change(
                conn,
                digest_store.WorkflowChange(
                    account_id=f.account_id,
                    user_id=f.user_id,
                    delivery_id=lease.delivery_id,
                    workflow_id=str(f.data.get("workflow_id") or f.object_id),
                    workflow_name=str(f.data.get("workflow_name") or f.display_name),
                    change=str(change),
                    display_name=str(f.data.get("record_name") or f.display_name),
                    url=f.url,
                    occurred_at=occurred,
                ),
            )
            return Sent()
        return Drop(f"{f.topic} is not a task or a workflow enrolment change: no digest reports it")
