"""Firing the weekly task digest and the Friday workflow digest, once per period.

A runner leases subjects that are due (or not scheduled yet), asks
preferences once per (account, digest topic) for each user's time zone,
email address, opt-in (the digest topic's email switch) and quiet hours,
then for each subject either schedules it (first sight, or the user's time
zone moved the instant later) or fires it: in one transaction it records the
run for the period (the local date; a second attempt finds the row and sends
nothing), enqueues the email when there is something to report and the user
opted in, and schedules the next period.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from typing import cast

import asyncpg
from belfry import log
from belfry.errors import BelfryError
from belfry.message import Message
from belfry.preferences import Preferences, Recipient
from belfry.queue import enqueue
from prometheus_client import Counter

from services.batching import digest_content, digest_store, quiet
from services.batching.clock import Clock, repeat
from services.batching.digest_store import Subject
from services.batching.schedule import Weekly, fire_instant, next_fire, zone
from services.batching.store import Conn
from services.batching.windows import retry_delay

_LOG = log.get(__name__)

DIGESTS_FIRED = Counter(
    "belfry_batching_digests_total", "Digest periods fired, by digest and outcome", ["digest", "outcome"]
)


class Digests:
    """Schedules and fires digests; ``run`` is a background loop, ``tick`` one pass."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        preferences: Preferences,
        clock: Clock,
        *,
        worker: str,
        schedules: Mapping[str, Weekly],
        topics: Mapping[str, str],
        ttl: timedelta,
        lease: timedelta = timedelta(seconds=30),
        batch: int = 200,
        tick_seconds: float = 30.0,
    ) -> None:
        self._pool = pool
        self._preferences = preferences
        self._clock = clock
        self._worker = worker
        self._schedules = schedules
        self._topics = topics
        self._ttl = ttl
        self._lease = lease
        self._batch = batch
        self._tick_seconds = tick_seconds

    async def run(self, stop: asyncio.Event) -> None:
        """Fire digests until ``stop`` is set; a database outage is waited out, not fatal."""
        await repeat(
            self.tick, clock=self._clock, stop=stop, batch=self._batch, every=self._tick_seconds, what="digest pass"
        )

    async def tick(self) -> int:
        """Lease the subjects due now, schedule or fire each; return how many were leased."""
        now = self._clock.now()
        subjects = await digest_store.claim(self._pool, now, lease=self._lease, worker=self._worker, limit=self._batch)
        groups = itertools.groupby(
            sorted(subjects, key=lambda s: (s.account_id, s.digest)), lambda s: (s.account_id, s.digest)
        )
        for (account_id, digest), group in groups:
            batch = list(group)
            try:
                info, recipients = await self._preferences.effective(
                    account_id, self._topics[digest], [s.user_id for s in batch]
                )
            except BelfryError as exc:  # unavailable or refused: try again later
                for s in batch:
                    await digest_store.postpone(self._pool, s, retry_at=now + retry_delay(1), error=exc.message)
                continue
            for s in batch:
                try:
                    await self._one(s, recipients.get(s.user_id), info.locked, now)
                except Exception as exc:  # one user's failure must not stop everyone else's digest
                    _LOG.exception("digest could not fire; retrying", user_id=s.user_id, digest=s.digest)
                    await digest_store.postpone(self._pool, s, retry_at=now + retry_delay(1), error=repr(exc))
        return len(subjects)

    async def _one(self, s: Subject, recipient: Recipient | None, locked: bool, now: datetime) -> None:
        tz_name = recipient.time_zone if recipient is not None else (s.time_zone or "UTC")
        tz = zone(tz_name)
        weekly = self._schedules[s.digest]
        if s.next_fire_at is None or not s.period:
            period, instant = next_fire(now, weekly, tz)
            await digest_store.reschedule(self._pool, s, time_zone=tz_name, period=str(period), next_fire_at=instant)
            return
        instant = fire_instant(date.fromisoformat(s.period), weekly.at, tz)
        if instant > now:
            # The user's time zone changed and puts this period's hour later: wait for it.
            await digest_store.reschedule(self._pool, s, time_zone=tz_name, period=s.period, next_fire_at=instant)
            return
        async with self._pool.acquire() as conn, conn.transaction():
            message = await self._content(conn, s, instant, recipient.locale if recipient else "en")
            if recipient is None or not recipient.known:
                outcome = "unknown_user"
            elif "email" not in recipient.on:
                outcome = "opted_out"
            elif message is None:
                outcome = "nothing"
            else:
                outcome = "sent"
            count = len(message.items) if message is not None else 0
            fresh = await digest_store.record_run(
                conn,
                s,
                fired_at=now,
                outcome=outcome,
                notification_id=uuid.UUID(message.notification_id)
                if message is not None and outcome == "sent"
                else None,
                count=count,
                worker=self._worker,
            )
            if fresh and outcome == "sent" and message is not None:
                deliveries = quiet.deliveries(
                    message, ["email"], recipient=recipient, locked=locked, expires_at=instant + self._ttl
                )
                await enqueue(cast(asyncpg.Connection, conn), deliveries)
            period, next_at = next_fire(max(now, instant), weekly, tz)
            await digest_store.reschedule(
                conn, s, time_zone=tz_name, period=str(period), next_fire_at=next_at, fired_at=instant
            )
        if fresh:
            DIGESTS_FIRED.labels(s.digest, outcome).inc()
            _LOG.info("digest fired", digest=s.digest, user_id=s.user_id, period=s.period, outcome=outcome, items=count)

    async def _content(self, conn: Conn, s: Subject, at: datetime, locale: str) -> Message | None:
        topic = self._topics[s.digest]
        if s.digest == "tasks":
            tasks = await digest_store.open_tasks(conn, s.account_id, s.user_id)
            return digest_content.tasks_message(
                tasks, account_id=s.account_id, user_id=s.user_id, topic=topic, period=s.period, at=at, locale=locale
            )
        since = s.last_fired_at or at - timedelta(days=7)
        changes = await digest_store.changes(conn, s.account_id, s.user_id, since, at)
        return digest_content.workflows_message(
            changes, account_id=s.account_id, user_id=s.user_id, topic=topic, period=s.period, at=at, locale=locale
        )
