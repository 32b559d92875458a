"""Closing assignment windows: one merged notification per window, exactly once.

A closer leases due windows (any number of replicas may run one), asks
preferences about the users once per (account, topic) for quiet hours and
the current email address, then closes each window in one transaction that
locks it, reads what is left in it, enqueues the merged notification on every
channel of the newest assignment and marks the window closed. If anything
fails (preferences or the queue unavailable) the transaction rolls back, the
window stays open and is retried with backoff: it is never lost. The merged
notification's id is derived from the window id, so even a close retried after
an ambiguous commit cannot send twice (the queue ignores duplicates).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import cast

import asyncpg
from belfry import log
from belfry.errors import Unavailable
from belfry.message import Message
from belfry.preferences import REFUSED, Preferences, Recipient
from belfry.queue import NewDelivery, enqueue
from prometheus_client import Counter

from services.batching import merge, quiet, store
from services.batching.clock import Clock, repeat

_LOG = log.get(__name__)

WINDOWS_CLOSED = Counter("belfry_batching_windows_closed_total", "Assignment windows closed, by outcome", ["outcome"])


def retry_delay(attempts: int, cap: float = 300.0) -> timedelta:
    """Exponential backoff for a window or digest that could not be handled."""
    return timedelta(seconds=min(cap, 2.0 ** min(attempts, 16)))


class Closer:
    """Closes due windows; ``run`` is a background loop, ``tick`` one pass (tests call it)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        preferences: Preferences,
        clock: Clock,
        *,
        worker: str,
        lease: timedelta = timedelta(seconds=30),
        batch: int = 100,
        concurrency: int = 8,
        tick_seconds: float = 1.0,
    ) -> None:
        self._pool = pool
        self._preferences = preferences
        self._clock = clock
        self._worker = worker
        self._lease = lease
        self._batch = batch
        # Each close is its own committed transaction: closing several at once
        # lets PostgreSQL group their commits instead of paying one flush each.
        self._limiter = asyncio.Semaphore(concurrency)
        self._tick_seconds = tick_seconds

    async def run(self, stop: asyncio.Event) -> None:
        """Close windows until ``stop`` is set; a database outage is waited out, not fatal."""
        await repeat(
            self.tick, clock=self._clock, stop=stop, batch=self._batch, every=self._tick_seconds, what="closing windows"
        )

    async def tick(self) -> int:
        """Lease and close the windows that are due now; return how many were leased."""
        now = self._clock.now()
        due = await store.claim_due(self._pool, now, lease=self._lease, worker=self._worker, limit=self._batch)
        by_topic = itertools.groupby(
            sorted(due, key=lambda w: (w.account_id, w.topic)), lambda w: (w.account_id, w.topic)
        )
        for (account_id, topic), group in by_topic:
            windows = list(group)
            try:
                info, recipients = await self._preferences.effective(account_id, topic, [w.user_id for w in windows])
                locked = info.locked
            except Unavailable as exc:
                await self._postpone(windows, exc.message)
                continue
            except REFUSED as exc:
                # Preferences refuses the topic: send as the dispatcher decided, without quiet hours.
                _LOG.warning("closing windows without preferences' answer", topic=topic, error=exc.message)
                recipients, locked = {}, False
            await asyncio.gather(*(self._close_limited(w, recipients, locked) for w in windows))
        return len(due)

    async def _close_limited(self, w: store.DueWindow, recipients: Mapping[str, Recipient], locked: bool) -> None:
        async with self._limiter:
            await self._close(w, recipients.get(w.user_id), locked)

    async def _postpone(self, windows: Sequence[store.DueWindow], error: str) -> None:
        for w in windows:
            WINDOWS_CLOSED.labels("retried").inc()
            _LOG.warning("window could not close; retrying", window_id=str(w.window_id), error=error)
            await store.postpone(self._pool, w, retry_at=self._clock.now() + retry_delay(w.attempts), error=error)

    async def _close(self, w: store.DueWindow, recipient: Recipient | None, locked: bool) -> None:
        now = self._clock.now()
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                items = await store.lock_for_close(conn, w)
                if items is None:
                    return  # the lease expired and another replica owns the window now
                if not items or (recipient is not None and not recipient.known):
                    state = "empty" if not items else "dropped"
                    note = "" if not items else "the user is no longer an active member of the account"
                    await store.finish(conn, w, state=state, now=now, worker=self._worker, sent=None, note=note)
                    WINDOWS_CLOSED.labels(state).inc()
                    return
                messages = [(i.object_id, Message.from_json(i.message)) for i in items]
                message = merge.merged(w.account_id, w.window_id, w.object_type, messages)
                deliveries = quiet.deliveries(
                    message,
                    items[-1].channels,
                    recipient=recipient,
                    locked=locked,
                    expires_at=max(i.expires_at for i in items),
                )
                await enqueue(cast(asyncpg.Connection, conn), deliveries)
                # The record behind the merged notification's status (read by the dispatcher
                # through batching.merged_notifications); a window of one sends its own
                # notification, which the dispatcher already has a record of.
                merged = len(items) > 1
                sent = store.Sent(
                    notification_id=_notification_id(message, deliveries),
                    count=len(items),
                    title=message.title if merged else None,
                    url=message.url if merged else None,
                    channels=quiet.decisions(deliveries, recipient) if merged else None,
                )
                await store.finish(conn, w, state="sent", now=now, worker=self._worker, sent=sent)
            WINDOWS_CLOSED.labels("sent").inc()
            _LOG.info("window closed", window_id=str(w.window_id), items=len(items), channels=len(deliveries))
        except (OSError, asyncpg.PostgresError) as exc:
            await self._postpone([w], f"enqueue failed: {exc!r}")
        except Exception as exc:  # a bad row must not stop the closer for every other window
            _LOG.exception("window could not be merged", window_id=str(w.window_id))
            await self._postpone([w], f"merge failed: {exc!r}")


def _notification_id(message: Message, deliveries: Sequence[NewDelivery]) -> uuid.UUID | None:
    """The id the window's notification went out under (also when nobody's channel was on)."""
    if deliveries:
        return deliveries[0].notification_id
    try:
        return uuid.UUID(message.notification_id)
    except ValueError:  # only a handoff the dispatcher did not write; nothing was sent under it
        return None
