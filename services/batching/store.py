"""SQL of assignment windows (schema ``batching``): intake, undo, claim and close.

Times come from the service's clock as parameters, never from ``now()``, so
a test's manual clock drives windows exactly as the wall clock does in
production. Closing is claimed with a lease (``FOR UPDATE SKIP LOCKED`` plus a
fencing token), so any number of replicas can run the closer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
from belfry.lease import Leases

# A connection, or one borrowed from a pool.
Conn: TypeAlias = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
# How a window is leased for closing (the digests' subjects draw tokens from the same sequence).
WINDOWS = Leases("batching.windows", ("account_id", "window_id"), "batching.lease_tokens")


@dataclass(frozen=True)
class AssignmentRow:
    """One assignment as the intake stores it."""

    account_id: str
    delivery_id: int
    notification_id: uuid.UUID  # the source notification (the handoff delivery's)
    user_id: str
    actor_user_id: str
    object_type: str
    object_id: str
    topic: str
    assigned_at: datetime
    expires_at: datetime
    channels: tuple[str, ...]
    message: dict[str, Any]


@dataclass(frozen=True)
class DueWindow:
    """A window this replica leased for closing."""

    account_id: str
    window_id: uuid.UUID
    user_id: str
    object_type: str
    topic: str
    token: int
    attempts: int


@dataclass(frozen=True)
class WindowItem:
    """One assignment still in a window at close time."""

    object_id: str
    assigned_at: datetime
    expires_at: datetime
    channels: tuple[str, ...]
    message: dict[str, Any]


async def mark_received(conn: Conn, account_id: str, delivery_id: int, now: datetime) -> bool:
    """Record a delivery as applied; False when it was applied before (a redelivery)."""
    row = await conn.fetchval(
        """
        insert into batching.received (account_id, delivery_id, received_at) values ($1, $2, $3)
        on conflict do nothing returning true
        """,
        account_id,
        delivery_id,
        now,
    )
    return bool(row)


async def add_assignment(conn: Conn, a: AssignmentRow, now: datetime, window: timedelta) -> str:
    """Apply one assignment in the caller's transaction; returns what happened.

    ``stale``: a newer assignment of the object was seen already. Otherwise the
    object is withdrawn from every other user's open window (the assignment was
    undone), then ``self`` (self-assignment: nothing to tell) or ``added`` to the
    user's open window for the object type, opening it if needed. Items are
    never deleted here: a withdrawn or replaced item stays as the record of what
    became of its notification (``batching.assignment_outcomes``).
    """
    newest = await conn.fetchval(
        """
        insert into batching.assignees as x (account_id, object_type, object_id, user_id, assigned_at)
        values ($1, $2, $3, $4, $5)
        on conflict (account_id, object_type, object_id) do update
            set user_id = excluded.user_id, assigned_at = excluded.assigned_at
            where x.assigned_at <= excluded.assigned_at
        returning true
        """,
        a.account_id,
        a.object_type,
        a.object_id,
        a.user_id,
        a.assigned_at,
    )
    if not newest:
        return "stale"
    # The windows are key-share locked first: a closer holds its window FOR UPDATE
    # while it merges, so a withdrawal waits for that close and then skips the
    # window it finds sent (an item already merged is never marked withdrawn),
    # or withdraws the item when the close rolled back. Intakes lock their own
    # window FOR NO KEY UPDATE, which a key-share lock does not wait for, so two
    # intakes that take objects from each other's windows cannot deadlock.
    await conn.execute(
        """
        with held as materialized (
            select w.account_id, w.window_id from batching.windows w
            where w.account_id = $1 and w.object_type = $2 and w.state = 'open' and w.user_id <> $3
              and exists (select 1 from batching.window_items i
                          where i.account_id = w.account_id and i.window_id = w.window_id
                            and i.object_id = $4 and i.state <> 'withdrawn')
            for key share of w
        )
        update batching.window_items i set state = 'withdrawn', left_at = $5
        from held
        where i.account_id = held.account_id and i.window_id = held.window_id
          and i.object_id = $4 and i.state <> 'withdrawn'
        """,
        a.account_id,
        a.object_type,
        a.user_id,
        a.object_id,
        now,
    )
    if a.actor_user_id and a.actor_user_id == a.user_id:
        return "self"
    window_id = await _open_window(conn, a, now, window)
    # The same object assigned again to the same user inside the window: the newer
    # assignment carries it, the older one is kept as 'replaced' (it goes out in
    # the same notification). The assignees row above is newest-wins, so the row
    # inserted here is always the newest.
    await conn.execute(
        """
        with replaced as (
            update batching.window_items set state = 'replaced', left_at = $10
            where account_id = $1 and window_id = $2 and object_id = $3 and state = 'in' and notification_id <> $4
        )
        insert into batching.window_items
            (account_id, window_id, object_id, notification_id, delivery_id, assigned_at, expires_at, channels, message)
        values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        on conflict (account_id, window_id, object_id, notification_id) do nothing
        """,
        a.account_id,
        window_id,
        a.object_id,
        a.notification_id,
        a.delivery_id,
        a.assigned_at,
        a.expires_at,
        list(a.channels),
        a.message,
        now,
    )
    return "added"


async def _open_window(conn: Conn, a: AssignmentRow, now: datetime, window: timedelta) -> uuid.UUID:
    """The user's open window for the object type, locked; opened at the assignment when there is none."""
    opened = min(a.assigned_at, now)
    while True:
        await conn.execute(
            """
            insert into batching.windows (account_id, window_id, user_id, object_type, topic, opened_at, closes_at)
            values ($1, $2, $3, $4, $5, $6, $7)
            on conflict (account_id, user_id, object_type) where state = 'open' do nothing
            """,
            a.account_id,
            uuid.uuid4(),
            a.user_id,
            a.object_type,
            a.topic,
            opened,
            opened + window,
        )
        # A closer may have closed it between the insert and this lock: then open another.
        found: uuid.UUID | None = await conn.fetchval(
            """
            select window_id from batching.windows
            where account_id = $1 and user_id = $2 and object_type = $3 and state = 'open'
            for no key update
            """,
            a.account_id,
            a.user_id,
            a.object_type,
        )
        if found is not None:
            return found


async def claim_due(pool: asyncpg.Pool, now: datetime, *, lease: timedelta, worker: str, limit: int) -> list[DueWindow]:
    """Lease up to ``limit`` windows whose time is up (rows other replicas hold are skipped)."""
    return [DueWindow(**dict(r)) for r in await pool.fetch(_CLAIM, now, now + lease, worker, limit)]


async def lock_for_close(conn: Conn, w: DueWindow) -> list[WindowItem] | None:
    """Lock a leased window and its items (oldest first); None when the lease was lost."""
    if not await conn.fetchval(_HELD, w.account_id, w.window_id, w.token):
        return None
    rows = await conn.fetch(
        """
        select object_id, assigned_at, expires_at, channels, message from batching.window_items
        where account_id = $1 and window_id = $2 and state = 'in'
        order by assigned_at, object_id
        for update
        """,
        w.account_id,
        w.window_id,
    )
    return [
        WindowItem(r["object_id"], r["assigned_at"], r["expires_at"], tuple(r["channels"]), r["message"]) for r in rows
    ]


@dataclass(frozen=True)
class Sent:
    """What a closed window sent, kept as the merged notification's record."""

    notification_id: uuid.UUID | None
    count: int
    title: str | None = None  # merged notifications only (two or more items)
    url: str | None = None
    channels: list[dict[str, str]] | None = None


async def finish(
    conn: Conn, w: DueWindow, *, state: str, now: datetime, worker: str, sent: Sent | None, note: str = ""
) -> None:
    """Close a window for good (in the transaction that enqueued its notification)."""
    await conn.execute(
        f"""
        update batching.windows
        set state = $3, closed_at = $4, closed_by = $5, notification_id = $6, item_count = $7,
            last_error = nullif($8, ''), title = $9, url = $10, channels = $11, {WINDOWS.release()}
        where account_id = $1 and window_id = $2
        """,
        w.account_id,
        w.window_id,
        state,
        now,
        worker,
        sent.notification_id if sent else None,
        sent.count if sent else 0,
        note,
        sent.title if sent else None,
        sent.url if sent else None,
        sent.channels if sent else None,
    )


async def postpone(pool: asyncpg.Pool, w: DueWindow, *, retry_at: datetime, error: str) -> None:
    """Keep a window that could not close open, retried at ``retry_at`` (it is never dropped)."""
    await pool.execute(_POSTPONE, w.account_id, w.window_id, w.token, retry_at, error[:2000])


async def purge(pool: asyncpg.Pool, before: datetime) -> int:
    """Forget applied delivery ids and closed windows older than ``before`` (the queue keeps its own record)."""
    a = await pool.execute("delete from batching.received where received_at < $1", before)
    b = await pool.execute("delete from batching.windows where state <> 'open' and closed_at < $1", before)
    c = await pool.execute("delete from batching.workflow_changes where occurred_at < $1", before)
    return sum(int(s.split()[-1]) for s in (a, b, c))


# The lease statements, built once from the helper.
_CLAIM = WINDOWS.claim(
    "state = 'open' and closes_at <= $1",
    "closes_at",
    "x.account_id, x.window_id, x.user_id, x.object_type, x.topic, x.attempts",
    ", attempts = x.attempts + 1",
)
_HELD = f"select true from batching.windows where {WINDOWS.held()} and state = 'open' for update"
_POSTPONE = WINDOWS.fenced(f"{WINDOWS.hold_off('$4')}, last_error = $5", " and state = 'open'")
