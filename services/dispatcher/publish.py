"""Accepting events: idempotency, backpressure, and the one write per event.

A call's events are planned together and written in one transaction; each
event's rows (notification, decisions, mention claims, deliveries) are all
in it or all out, so every event is atomic on its own while a batch of a
thousand costs a handful of statements. The idempotency key is claimed by
the notification insert itself (``on conflict do nothing``): of any number
of concurrent duplicates exactly one inserts, the others wait for it and
answer as replays.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import cast

import asyncpg
from belfry import errors, metrics
from belfry.queue import NewDelivery, enqueue

from services.dispatcher import rules, store
from services.dispatcher.backpressure import Backpressure
from services.dispatcher.model import SOURCES, Accepted, Event
from services.dispatcher.planning import Plan, Planner

Result = Accepted | errors.BelfryError


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Dispatcher:
    """The publish path shared by Publish, PublishBatch and PublishStream."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        planner: Planner,
        backpressure: Backpressure,
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._pool = pool
        self._planner = planner
        self.backpressure = backpressure
        self.clock = clock

    async def publish(self, items: Sequence[Event | errors.BelfryError]) -> list[Result]:
        """One result per item, in order; items that are already errors stay errors."""
        self.backpressure.check_queue()
        results: list[Result | None] = [x if isinstance(x, errors.BelfryError) else None for x in items]
        firsts, repeats = self._admit(items, results)
        # No look-up of the keys first: a new event (the common case) costs no extra
        # round trip; a replay is recognised when its insert finds the key taken, or
        # when it cannot be planned any more (e.g. a recipient left since).
        todo = list(firsts.values())
        plans = await self._planner.plan([_event(items[i]) for i in todo])
        ready = [p for p in plans if isinstance(p, Plan)]
        try:
            written = await self._write(ready) if ready else set()
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.DeadlockDetectedError) as exc:
            # Nothing was committed: the whole call may be retried as is (the keys make it safe).
            raise errors.Unavailable(
                f"the database could not take these events now ({type(exc).__name__}); retry"
            ) from exc
        for i, plan in zip(todo, plans, strict=True):
            if isinstance(plan, Plan) and plan.notification_id in written:
                results[i] = Accepted(plan.notification_id)
            else:
                if not isinstance(plan, Plan):
                    results[i] = plan  # unless the key turns out to be a replay
                repeats.append(i)
        await self._resolve(items, results, firsts, repeats)
        final = [r if r is not None else errors.Unavailable("event was not processed; retry it") for r in results]
        outcomes = Counter(
            "rejected" if isinstance(r, errors.BelfryError) else "replayed" if r.replayed else "accepted" for r in final
        )
        for outcome, count in outcomes.items():
            metrics.EVENTS_PUBLISHED.labels(outcome).inc(count)
        return final

    def _admit(
        self, items: Sequence[Event | errors.BelfryError], results: list[Result | None]
    ) -> tuple[dict[tuple[str, str], int], list[int]]:
        """Apply the account rate; split events into first uses of a key and repeats within the call."""
        firsts: dict[tuple[str, str], int] = {}
        repeats: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, errors.BelfryError):
                continue
            wait = self.backpressure.take(item.account_id)
            if wait:
                results[i] = errors.ResourceExhausted(
                    f"account {item.account_id!r} publishes faster than its limit of "
                    f"{self.backpressure.limits.account_rate:g} events/s",
                    retry_after=wait,
                )
                continue
            key = (item.account_id, item.idempotency_key)
            if key in firsts:
                repeats.append(i)  # resolved against the first once it is written
            else:
                firsts[key] = i
        return firsts, repeats

    async def _resolve(
        self,
        items: Sequence[Event | errors.BelfryError],
        results: list[Result | None],
        firsts: dict[tuple[str, str], int],
        repeats: list[int],
    ) -> None:
        """Answer events whose key another event (in this call or a concurrent one) used."""
        if not repeats:
            return
        keys = [(_event(items[i]).account_id, _event(items[i]).idempotency_key) for i in repeats]
        found = await store.find_keys(self._pool, keys)
        for i, key in zip(repeats, keys, strict=True):
            if key in found:
                results[i] = _replay(_event(items[i]), found[key])
            elif results[i] is None and firsts[key] != i:
                # The first event with this key was refused: the repeat gets the same answer.
                results[i] = results[firsts[key]]

    async def _write(self, plans: list[Plan]) -> set[uuid.UUID]:
        """Write the plans in one transaction; return the notification ids inserted."""
        claims = [
            (p.event.account_id, p.event.activity_id, v.user_id, p.notification_id)
            for p in plans
            for v in p.verdicts
            if v.mention_only and not v.reason
        ]
        notifications = [_notification_row(p) for p in plans]
        async with self._pool.acquire() as conn, conn.transaction():
            if claims:
                # Who is told depends on which mentions are first: claim them, then decide.
                inserted = await store.insert_notifications(conn, notifications)
                plans = [p for p in plans if p.notification_id in inserted]
                firsts = await store.claim_mentions(conn, [c for c in claims if c[3] in inserted])
                recipients, tagged = _rows(plans, firsts)
                await store.insert_recipients(conn, recipients)
            else:
                # Nothing depends on the insert: notifications and decisions in one statement.
                recipients, tagged = _rows(plans, set())
                inserted = await store.insert_notifications(conn, notifications, recipients)
            deliveries = [d for plan_id, d in tagged if plan_id in inserted]
            # enqueue is typed for a bare connection; a pooled one behaves the same.
            await enqueue(cast(asyncpg.Connection, conn), deliveries)
        return inserted


def _rows(
    plans: Sequence[Plan], firsts: set[tuple[str, str, str]]
) -> tuple[list[store.RecipientRow], list[tuple[uuid.UUID, NewDelivery]]]:
    """Every candidate's record, and the deliveries with the notification they belong to."""
    recipients: list[store.RecipientRow] = []
    deliveries: list[tuple[uuid.UUID, NewDelivery]] = []
    for plan in plans:
        e = plan.event
        first = {u for (a, act, u) in firsts if a == e.account_id and act == e.activity_id}
        for v in rules.first_mentions(plan.verdicts, first):
            routed = plan.routed.get(v.user_id) if not v.reason else None
            recipients.append(
                store.RecipientRow(
                    e.account_id,
                    plan.notification_id,
                    v.user_id,
                    "accepted" if routed else "suppressed",
                    v.reason,
                    routed.channels if routed else [],
                    routed.held_until if routed else None,
                )
            )
            if routed:
                deliveries.extend((plan.notification_id, d) for d in routed.deliveries)
        deliveries.extend((plan.notification_id, d) for d in plan.digest)
    return recipients, deliveries


def _event(item: Event | errors.BelfryError) -> Event:
    assert isinstance(item, Event)
    return item


def _replay(event: Event, found: tuple[uuid.UUID, bytes]) -> Result:
    """Same key and body: the original answer; same key, other body: a conflict."""
    notification_id, body_hash = found
    if body_hash == event.body_hash:
        return Accepted(notification_id, replayed=True)
    return errors.AlreadyExists(
        f"idempotency key {event.idempotency_key!r} was already used in account {event.account_id!r} "
        f"for a different event (notification {notification_id}); give each new event a new key",
        field="event.idempotency_key",
    )


def _notification_row(plan: Plan) -> store.NotificationRow:
    e = plan.event
    return store.NotificationRow(
        account_id=e.account_id,
        notification_id=plan.notification_id,
        idempotency_key=e.idempotency_key,
        body_hash=e.body_hash,
        topic=e.topic,
        occurred_at=e.occurred_at,
        actor_user_id=e.actor_user_id,
        actor_source=SOURCES.index(e.source) if e.source in SOURCES else 0,
        object={
            "type": e.object.type,
            "id": e.object.id,
            "display_name": e.object.display_name,
            "url": e.object.url,
            "owner_user_id": e.object.owner_user_id,
        },
    )
