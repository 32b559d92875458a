"""Fan-out: accepted events become recipient records and deliveries, behind the producer's call.

A worker claims a batch of backlog rows (fairly across accounts, skipping
rows other workers hold), plans them — recipient rules, preferences,
rendering — and in the same transaction writes the recipient records,
mention claims and deliveries and removes the backlog rows. A crash anywhere
rolls all of it back and the rows are claimed again: every accepted event
is fanned out exactly once. A large audience goes in chunks of ``chunk``
candidates, each chunk committed with the backlog row's new position, so a
crash midway resumes where the last chunk ended.

Planning that fails because a dependency is away (preferences unreachable)
is retried with backoff; a refusal that will not change (the account was
deleted since) ends the row as failed, visible in the status API.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import asyncpg
from belfry import errors, log, trace
from belfry.config import AccountRange
from belfry.queue import NewDelivery, enqueue

from services.dispatcher import follow_store, rules, store
from services.dispatcher.model import stored_event
from services.dispatcher.planning import Job, Plan, Planner

_LOG = log.get(__name__)

# Backoff for an event whose planning hit an unavailable dependency.
_RETRY_BASE = 1.0
_RETRY_CAP = 60.0


@dataclass(frozen=True)
class Tuning:
    """How a fan-out worker claims work."""

    batch: int = 200  # backlog rows per transaction
    chunk: int = 1000  # candidates of one event per transaction
    poll_seconds: float = 1.0  # fallback when a NOTIFY is missed (and rows due after a backoff)
    assist_lag_seconds: float = 1.0  # fan-out lag from which a publishing call fans out as much as it accepted


class Fanout:
    """A process's fan-out: ``workers`` claim loops sharing one LISTEN connection (replicas share the backlog)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        planner: Planner,
        tuning: Tuning = Tuning(),
        *,
        workers: int = 1,
        accounts: AccountRange = AccountRange.ALL,
    ) -> None:
        self._pool = pool
        self._accounts = accounts  # whose events this process fans out (BELFRY_ACCOUNT_RANGE)
        self._planner = planner
        self._tuning = tuning
        self._workers = workers
        self._cursor = ""  # round-robin position over accounts, shared by the loops
        # Publishing calls that assist at once: each holds a connection, and the pool also serves the accepts.
        self._assists = asyncio.Semaphore(workers)

    async def run(self, stop: asyncio.Event) -> None:
        """Background loop: fan out until ``stop``; a lost LISTEN connection ends it with an error (restarted).

        Each loop holds at most one pool connection (its transaction): with
        the listener, the process needs ``workers + 1`` connections, and
        planning reads on the transaction's own connection.
        """
        wakes = [asyncio.Event() for _ in range(self._workers)]
        lost = asyncio.Event()

        def on_notify(*_: object) -> None:
            for wake in wakes:
                wake.set()

        def on_lost(*_: object) -> None:
            lost.set()
            on_notify()

        conn: asyncpg.pool.PoolConnectionProxy = await self._pool.acquire()
        conn.add_termination_listener(on_lost)
        try:
            await conn.add_listener(store.FANOUT_CHANNEL, on_notify)
            await asyncio.gather(*(self._loop(stop, wake, lost) for wake in wakes))
        finally:
            if not lost.is_set():
                conn.remove_termination_listener(on_lost)
                await conn.remove_listener(store.FANOUT_CHANNEL, on_notify)
            with contextlib.suppress(Exception):  # a connection the database dropped is already gone
                await self._pool.release(conn, timeout=5)

    async def _loop(self, stop: asyncio.Event, wake: asyncio.Event, lost: asyncio.Event) -> None:
        while not stop.is_set():
            # Clear before claiming: an accept that commits meanwhile must wake the next wait.
            wake.clear()
            claimed, advanced = await self._step()
            # A full batch may leave more due; an event expanded in part (a large audience) has its next
            # chunk due at once: either way claim again now, not after the next NOTIFY or poll.
            if claimed >= self._tuning.batch or advanced:
                continue
            if lost.is_set():
                raise ConnectionResetError("the fan-out LISTEN connection was closed by the database")
            waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiters, timeout=self._tuning.poll_seconds, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    def lags(self, lag_seconds: float) -> bool:
        """Whether a fan-out lag this long calls for publishing calls to assist (``assist_lag_seconds``; 0: never)."""
        return 0 < self._tuning.assist_lag_seconds <= lag_seconds

    async def assist(self, accepted: int) -> None:
        """Fan out about ``accepted`` backlog rows (any accounts') on behalf of a publishing call.

        Called by a publishing call, after its commit, while fan-out lags
        (``Tuning.assist_lag_seconds``). Accepting costs a fraction of fanning
        out and both share the process: unassisted, a producer that publishes
        as fast as it is answered fills the backlog until the fan-out lag limit
        refuses it, then nothing is accepted until fan-out catches up. A call
        that fans out as much as it accepted slows its producer to the pace
        at which notifications are actually told, and the lag stays short.
        """
        async with self._assists:
            while accepted > 0:
                claimed = await self.step()
                if claimed < self._tuning.batch:
                    return  # nothing more due
                accepted -= claimed

    async def step(self) -> int:
        """Claim and fan out one batch in one transaction; return how many backlog rows were claimed."""
        claimed, _ = await self._step()
        return claimed

    async def _step(self) -> tuple[int, int]:
        """``step``, also saying how many of the claimed events were expanded only in part (their next chunk due)."""
        async with self._pool.acquire() as conn, conn.transaction():
            # Read once: the process's other workers move the cursor while this one awaits its claim, and a
            # wrap-around bounded by a newer cursor would claim again rows this transaction already holds
            # (SKIP LOCKED skips other transactions' locks, not its own): the same event twice in one batch.
            cursor = self._cursor
            claimed = await store.claim_fanout(conn, self._tuning.batch, cursor, accounts=self._accounts)
            if len(claimed) < self._tuning.batch and cursor:
                # Wrap around to the accounts the first pass did not visit.
                claimed += await store.claim_fanout(
                    conn, self._tuning.batch - len(claimed), "", cursor, accounts=self._accounts
                )
            self._cursor = max((b.row.account_id for b in claimed), default="")
            if not claimed:
                return 0, 0
            jobs = [_job(b, self._tuning.chunk) for b in claimed]
            plans = await self._planner.plan(jobs, conn)
            ready = [p for p in plans if isinstance(p, Plan)]
            traces = {b.row.notification_id: _trace_of(b.row) for b in claimed}
            written = await _write(conn, ready, traces)
            done, advanced, retry, failed = _settle(claimed, plans)
            await store.finish_fanout(conn, done, advanced, retry, failed)
        # After the commit: the one line that ties a notification to its trace and its deliveries.
        for plan in ready:
            _LOG.info(
                "fanned out",
                account_id=plan.event.account_id,
                notification_id=str(plan.notification_id),
                trace_id=traces.get(plan.notification_id),
                deliveries=written.get(plan.notification_id, 0),
            )
        if retry or failed:
            _LOG.warning("fan-out deferred or failed", retried=len(retry), failed=len(failed))
        return len(claimed), len(advanced)


def _trace_of(row: store.NotificationRow) -> str | None:
    found = row.event.get(store.TRACE_FIELD)
    # Checked, not trusted: a value that is not a trace id must not stop the event's fan-out.
    return found if trace.is_trace_id(found) else None


def _job(backlog: store.Backlog, chunk: int) -> Job:
    row = backlog.row
    event = stored_event(
        account_id=row.account_id,
        topic=row.topic,
        occurred_at=row.occurred_at,
        idempotency_key=row.idempotency_key,
        body_hash=row.body_hash,
        actor_user_id=row.actor_user_id,
        obj=row.object,
        fields=row.event,
    )
    return Job(event, row.notification_id, backlog.position, chunk)


Key = tuple[str, uuid.UUID]


def _settle(
    claimed: Sequence[store.Backlog], plans: Sequence[Plan | errors.BelfryError]
) -> tuple[
    list[Key],
    list[tuple[str, uuid.UUID, int]],
    list[tuple[str, uuid.UUID, float, str]],
    list[tuple[str, uuid.UUID, str]],
]:
    done: list[Key] = []
    advanced: list[tuple[str, uuid.UUID, int]] = []
    retry: list[tuple[str, uuid.UUID, float, str]] = []
    failed: list[tuple[str, uuid.UUID, str]] = []
    for backlog, plan in zip(claimed, plans, strict=True):
        key = (backlog.row.account_id, backlog.row.notification_id)
        if isinstance(plan, Plan):
            if plan.next_position is None:
                done.append(key)
            else:
                advanced.append((*key, plan.next_position))
        elif isinstance(plan, errors.Unavailable | errors.ResourceExhausted):
            delay = min(_RETRY_CAP, _RETRY_BASE * 2 ** min(backlog.attempts, 10))
            retry.append((*key, delay, plan.message))
        else:
            failed.append((*key, plan.message))
    return done, advanced, retry, failed


async def _write(
    conn: asyncpg.pool.PoolConnectionProxy, plans: list[Plan], traces: Mapping[uuid.UUID, str | None]
) -> dict[uuid.UUID, int]:
    """Write the plans' recipient records, mention claims and deliveries (inside the caller's transaction).

    Each delivery carries its notification's trace id (``traces``); returns the deliveries per notification.
    """
    if not plans:
        return {}
    claims = [
        (p.event.account_id, p.event.activity_id, v.user_id, p.notification_id)
        for p in plans
        for v in p.verdicts
        if v.mention_only and not v.reason
    ]
    # Who is told depends on which mentions are first: claim them, then decide.
    firsts = await store.claim_mentions(conn, claims)
    await follow_store.auto_follow(
        conn,
        [
            (p.event.account_id, p.event.object.type, p.event.object.id, user_id, source)
            for p in plans
            for user_id, source in p.follows
        ],
    )
    recipients, deliveries = _rows(plans, firsts, traces)
    await store.insert_recipients(conn, recipients)
    # enqueue is typed for a bare connection; a pooled one behaves the same.
    await enqueue(cast(asyncpg.Connection, conn), deliveries)
    counts: dict[uuid.UUID, int] = {}
    for d in deliveries:
        counts[d.notification_id] = counts.get(d.notification_id, 0) + 1
    return counts


def _rows(
    plans: Sequence[Plan], firsts: set[tuple[str, str, str]], traces: Mapping[uuid.UUID, str | None]
) -> tuple[list[store.RecipientRow], list[NewDelivery]]:
    """Every candidate's record, and the deliveries (with their notification's trace id)."""
    recipients: list[store.RecipientRow] = []
    deliveries: list[NewDelivery] = []
    for plan in plans:
        e = plan.event
        planned = len(deliveries)
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
                deliveries.extend(routed.deliveries)
        deliveries.extend(plan.digest)
        trace_id = trace.as_uuid(traces.get(plan.notification_id))
        if trace_id is not None:
            # Planning knows nothing of traces; the plan's deliveries get it here, on their way out.
            deliveries[planned:] = [dataclasses.replace(d, trace_id=trace_id) for d in deliveries[planned:]]
    return recipients, deliveries
