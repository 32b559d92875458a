"""Read-only SQL behind the operator RPCs: counts and open windows.

Held deliveries are read from ``queue.deliveries`` (read only: the queue
module owns that table): rows queued with ``available_at`` in the future are
held by quiet hours or a retry backoff.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from belfry import channels

from services.batching.clock import Clock

# The queue channels that deliver to users (batching's own intake channel is not a "held" delivery).
_SENDERS = list(channels.queue_channels(frozenset(channels.NAMES)))


@dataclass(frozen=True)
class Status:
    """What GetStatus reports."""

    open_windows: int
    held_deliveries: int
    windows_retrying: int
    digest_subjects: int
    digests_sent: int
    oldest_due_window: datetime | None


@dataclass(frozen=True)
class OpenWindow:
    """An open window as operators see it."""

    account_id: str
    window_id: uuid.UUID
    user_id: str
    object_type: str
    topic: str
    opened_at: datetime
    closes_at: datetime
    object_ids: tuple[str, ...]
    attempts: int
    last_error: str


class Reader:
    """The queries of the operator RPCs."""

    def __init__(self, pool: asyncpg.Pool, clock: Clock) -> None:
        self._pool = pool
        self._clock = clock

    async def status(self, account_id: str | None) -> Status:
        """Counts for one account, or every account when ``account_id`` is None."""
        now = self._clock.now()
        row = await self._pool.fetchrow(
            """
            select
              (select count(*) from batching.windows
               where state = 'open' and ($1::text is null or account_id = $1)) as open_windows,
              (select count(*) from batching.windows
               where state = 'open' and attempts > 0 and last_error is not null
                 and ($1::text is null or account_id = $1)) as windows_retrying,
              (select min(closes_at) from batching.windows
               where state = 'open' and closes_at <= $2 and ($1::text is null or account_id = $1)) as oldest_due,
              (select count(*) from batching.digest_subjects
               where next_fire_at is not null and ($1::text is null or account_id = $1)) as digest_subjects,
              (select count(*) from batching.digest_runs
               where outcome = 'sent' and ($1::text is null or account_id = $1)) as digests_sent,
              (select count(*) from queue.deliveries
               where finished_at is null and available_at > now() and state = 'queued'
                 and channel = any($3::text[])
                 and ($1::text is null or account_id = $1)) as held
            """,
            account_id,
            now,
            _SENDERS,
        )
        assert row is not None
        return Status(
            open_windows=row["open_windows"],
            held_deliveries=row["held"],
            windows_retrying=row["windows_retrying"],
            digest_subjects=row["digest_subjects"],
            digests_sent=row["digests_sent"],
            oldest_due_window=row["oldest_due"],
        )

    async def open_windows(self, account_id: str, user_id: str, limit: int) -> list[OpenWindow]:
        """An account's open windows (one user's when ``user_id`` is set), soonest to close first."""
        rows = await self._pool.fetch(
            """
            select w.account_id, w.window_id, w.user_id, w.object_type, w.topic, w.opened_at, w.closes_at,
                   w.attempts, coalesce(w.last_error, '') as last_error,
                   coalesce(array_agg(i.object_id order by i.assigned_at) filter (where i.object_id is not null),
                            '{}') as object_ids
            from batching.windows w
            left join batching.window_items i
              on i.account_id = w.account_id and i.window_id = w.window_id and i.state = 'in'
            where w.account_id = $1 and w.state = 'open' and ($2 = '' or w.user_id = $2)
            group by w.account_id, w.window_id
            order by w.closes_at, w.window_id
            limit $3
            """,
            account_id,
            user_id,
            limit,
        )
        return [
            OpenWindow(
                r["account_id"],
                r["window_id"],
                r["user_id"],
                r["object_type"],
                r["topic"],
                r["opened_at"],
                r["closes_at"],
                tuple(r["object_ids"]),
                r["attempts"],
                r["last_error"],
            )
            for r in rows
        ]
