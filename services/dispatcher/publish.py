"""Accepting events: validation, idempotency, backpressure, and the one lean write per event.

A producer's call commits the least that makes its events durable and
idempotent: each event once, on its notification row with its key, and a
fan-out backlog row, all in one statement for the whole call. Who is told,
on which channels and with what text is decided behind, by the fan-out
workers (``services.dispatcher.fanout``). The idempotency key is claimed by
the notification insert itself (``on conflict do nothing``): of any number
of concurrent duplicates exactly one inserts, the others wait for it and
answer as replays. What can be refused without the recipients' records
(schema, sizes, an unknown account or topic, an event naming nobody) is
refused here, synchronously, per event.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import asyncpg
from belfry import errors, log, metrics, trace

from services.dispatcher import store
from services.dispatcher.backpressure import Backpressure
from services.dispatcher.fanout import Fanout
from services.dispatcher.model import SOURCES, Accepted, Event, event_fields
from services.dispatcher.planning import Planner

Result = Accepted | errors.BelfryError

_LOG = log.get(__name__)


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
        fanout: Fanout | None = None,
        key_seconds: float = store.KEY_SECONDS,
    ) -> None:
        self._pool = pool
        self._key_seconds = key_seconds  # how long an idempotency key is remembered
        self._planner = planner
        self.backpressure = backpressure
        self.clock = clock
        self._fanout = fanout  # assists while fan-out lags (Fanout.assist); None: never

    async def publish(
        self, items: Sequence[Event | errors.BelfryError], traces: Sequence[str | None] | None = None
    ) -> list[Result]:
        """One result per item, in order; items that are already errors stay errors.

        ``traces``: each item's trace id, when the items come from several calls (the group commit of single
        publishes); else every item is this call's (``belfry.trace.current``).
        """
        self.backpressure.check_queue()
        results: list[Result | None] = [x if isinstance(x, errors.BelfryError) else None for x in items]
        self._refuse_heavy(items, results)
        wants = Counter(
            item.account_id for item, r in zip(items, results, strict=True) if isinstance(item, Event) and r is None
        )
        grants = await self.backpressure.take_shared(dict(wants)) if wants else {}
        firsts, repeats = self._admit(items, results, grants)
        # No look-up of the keys first: a new event (the common case) costs no extra
        # round trip; a replay is recognised when its insert finds the key taken.
        todo = list(firsts.values())
        refusals = await self._planner.admit([_event(items[i]) for i in todo])
        # Each event's trace (belfry.trace) rides with it to its fan-out, which writes it on the deliveries.
        traced = list(traces) if traces is not None else [trace.current()] * len(items)
        rows = {
            i: _notification_row(_event(items[i]), traced[i])
            for i, refused in zip(todo, refusals, strict=True)
            if not refused
        }
        written = await self._accept(list(rows.values()))
        taken = [row for row in rows.values() if row.notification_id not in written]
        # A key found taken is a replay, unless its time is up and the purge has not cleared it yet: then
        # it is cleared now and the event inserted, so a key is free again exactly when its time is up.
        keys = [(row.account_id, row.idempotency_key) for row in taken]
        if taken and await store.forget_stale_keys(self._pool, keys, key_seconds=self._key_seconds):
            written |= await self._accept(taken)
        for i, refused in zip(todo, refusals, strict=True):
            row = rows.get(i)
            if row is not None and row.notification_id in written:
                results[i] = Accepted(row.notification_id)
            else:
                results[i] = refused  # unless the key turns out to be a replay
                repeats.append(i)
        await self._resolve(items, results, firsts, repeats)
        final = [r if r is not None else errors.Unavailable("event was not processed; retry it") for r in results]
        outcomes = Counter(
            "rejected" if isinstance(r, errors.BelfryError) else "replayed" if r.replayed else "accepted" for r in final
        )
        for outcome, count in outcomes.items():
            metrics.EVENTS_PUBLISHED.labels(outcome).inc(count)
        if self._fanout is not None and outcomes["accepted"] and self._fanout.lags(self.backpressure.fanout_lag):
            try:
                await self._fanout.assist(outcomes["accepted"])
            except Exception:  # what this call accepted is committed: its answer stands, the backlog keeps the rest
                _LOG.warning("fan-out assist failed; the background workers carry on", exc_info=True)
        return final

    async def _accept(self, rows: list[store.NotificationRow]) -> set[uuid.UUID]:
        """``store.accept``; a database that cannot take them is Unavailable (nothing was committed)."""
        try:
            return await store.accept(self._pool, rows) if rows else set()
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.DeadlockDetectedError) as exc:
            # Nothing was committed: the whole call may be retried as is (the keys make it safe).
            raise errors.Unavailable(
                f"the database could not take these events now ({type(exc).__name__}); retry"
            ) from exc

    def _refuse_heavy(self, items: Sequence[Event | errors.BelfryError], results: list[Result | None]) -> None:
        """While the backlog is over a limit: refuse the events of accounts holding more than an equal share of it."""
        for i, item in enumerate(items):
            if results[i] is None and isinstance(item, Event) and (wait := self.backpressure.heavy(item.account_id)):
                results[i] = errors.ResourceExhausted(
                    f"the delivery backlog is over its limit and account {item.account_id!r} holds more than "
                    "an equal share of it; its publishing is paused until senders catch up",
                    retry_after=wait,
                )

    def _admit(
        self,
        items: Sequence[Event | errors.BelfryError],
        results: list[Result | None],
        grants: dict[str, tuple[int, float]],
    ) -> tuple[dict[tuple[str, str], int], list[int]]:
        """Apply the account rate (``grants``: events allowed per account, and the wait for the rest);
        split events into first uses of a key and repeats within the call."""
        firsts: dict[tuple[str, str], int] = {}
        repeats: list[int] = []
        left = {account: granted for account, (granted, _) in grants.items()}
        for i, item in enumerate(items):
            if isinstance(item, errors.BelfryError) or results[i] is not None:
                continue
            if left.get(item.account_id, 0) <= 0:
                results[i] = errors.ResourceExhausted(
                    f"account {item.account_id!r} publishes faster than its limit of "
                    f"{self.backpressure.limits.account_rate:g} events/s",
                    retry_after=grants.get(item.account_id, (0, 1.0))[1] or 1.0,
                )
                continue
            left[item.account_id] -= 1
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
        found = await store.find_keys(self._pool, keys, key_seconds=self._key_seconds)
        for i, key in zip(repeats, keys, strict=True):
            if key in found:
                results[i] = _replay(_event(items[i]), found[key])
            elif results[i] is None and firsts[key] != i:
                # The first event with this key was refused: the repeat gets the same answer.
                results[i] = results[firsts[key]]


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


def _notification_row(e: Event, trace_id: str | None) -> store.NotificationRow:
    fields = event_fields(e)
    if trace_id is not None:
        # In the event's fields, not a column of its own: fan-out reads them anyway, and a replay
        # (its insert skipped) keeps the first call's trace, as it keeps the first call's event.
        fields[store.TRACE_FIELD] = trace_id
    return store.NotificationRow(
        account_id=e.account_id,
        notification_id=uuid.uuid4(),
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
        event=fields,
    )
