"""SQL of the delivery queue: the only module that touches ``queue.deliveries``.

Delivery is at-least-once with the delivery id as the dedup key. Each claim
takes a lease with an expiry and a fresh fencing token; a settle carrying a
stale token (the lease expired and someone else claimed the row) changes
nothing, so a paused sender that wakes up late cannot overwrite the work of
the replica that rescued its delivery.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from belfry import channels
from belfry.config import AccountRange
from belfry.lease import Leases

CHANNELS = channels.QUEUE_NAMES
# Attempts before a delivery becomes a dead letter, per channel (the channel registry's).
MAX_ATTEMPTS = channels.MAX_ATTEMPTS
# A delivery's lease and its expiry and holder columns (test_kit_lease checks ``_CLAIM`` takes it so).
DELIVERIES = Leases(
    "queue.deliveries", ("account_id", "delivery_id"), "queue.lease_tokens", "lease_expires_at", "leased_by"
)


# The longest a peer's Retry-After may hold a delivery back (seconds), unless
# a sender is configured otherwise (BELFRY_MAX_RETRY_AFTER_SECONDS). A delivery
# is never held past its time to live either way: it expires instead.
MAX_RETRY_AFTER_SECONDS = 3600.0

# The error a delivery carries when its lease expired on its last attempt.
LOST_ON_LAST_ATTEMPT = "sender lost during the last attempt"


def notify_channel(channel: str) -> str:
    """The LISTEN/NOTIFY channel that wakes the senders of ``channel``."""
    return f"belfry_queue_{channel}"


@dataclass(frozen=True)
class NewDelivery:
    """A delivery to enqueue (inside the producer's own transaction).

    ``message``, when given, is what every channel's delivery of this
    notification to this user shares: it is stored once for them all
    (``queue.messages``, migration 0006) and ``payload`` holds only this
    delivery's own fields. A sender's lease carries the two merged (``body``).
    """

    account_id: str
    notification_id: uuid.UUID
    user_id: str
    channel: str
    topic: str
    payload: dict[str, Any]
    expires_at: datetime
    available_at: datetime | None = None
    max_attempts: int | None = None  # None: the channel's MAX_ATTEMPTS
    trace_id: uuid.UUID | None = None  # the publishing call's trace (belfry.trace), logged with the outcome
    message: dict[str, Any] | None = None

    @property
    def body(self) -> dict[str, Any]:
        """The payload a sender gets: the shared message, then this delivery's own fields over it."""
        return {**self.message, **self.payload} if self.message else self.payload


@dataclass(frozen=True)
class Lease:
    """A claimed delivery; ``token`` fences every later state change."""

    delivery_id: int
    account_id: str
    notification_id: uuid.UUID
    user_id: str
    channel: str
    topic: str
    payload: dict[str, Any]
    attempts: int  # including this one
    max_attempts: int
    token: int
    expires_at: datetime

    def log_fields(self) -> dict[str, object]:
        """What names this delivery on a log line (``belfry.log.working_on``)."""
        return {
            "account_id": self.account_id,
            "notification_id": str(self.notification_id),
            "delivery_id": self.delivery_id,
            "channel": self.channel,
        }


@dataclass(frozen=True)
class Sent:
    """Delivered (or handed to the next hop, which owns it now)."""


@dataclass(frozen=True)
class Retry:
    """Transient failure: try again later, no earlier than ``retry_after`` seconds."""

    error: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Fail:
    """Permanent failure: goes to the dead-letter state with its error history."""

    error: str


@dataclass(frozen=True)
class Drop:
    """Nothing to do on purpose (e.g. the user has a live tab): not an error."""

    reason: str


Outcome = Sent | Retry | Fail | Drop


@dataclass(frozen=True)
class Settled:
    """A delivery whose outcome ``settle_rows`` recorded, with what its outcome line and metrics need."""

    account_id: str
    delivery_id: int
    trace_id: uuid.UUID | None
    age_seconds: float  # from the delivery's creation to this settle (both by the database's clock)


def backoff(attempts: int, *, base: float = 2.0, cap: float = 900.0) -> float:
    """Exponential backoff with full jitter (seconds) before attempt ``attempts + 1``."""
    ceiling = min(cap, base * (2 ** max(0, attempts - 1)))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography


async def enqueue(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, deliveries: Sequence[NewDelivery]
) -> int:
    """Insert deliveries (duplicates of (notification, user, channel) are ignored) and wake senders."""
    if not deliveries:
        return 0
    # One message per notification and recipient, written before the deliveries that share it. A message
    # already stored for them is kept: the deliveries' own dedup key makes a second enqueue a no-op anyway.
    messages = {(d.account_id, d.notification_id, d.user_id): d.message for d in deliveries if d.message}
    if messages:
        await conn.execute(
            """
            insert into queue.messages (account_id, notification_id, user_id, message)
            select * from unnest($1::text[], $2::uuid[], $3::text[], $4::jsonb[])
            on conflict do nothing
            """,
            [k[0] for k in messages],
            [k[1] for k in messages],
            [k[2] for k in messages],
            list(messages.values()),
        )
    rows = await conn.fetch(
        """
        insert into queue.deliveries
            (account_id, notification_id, user_id, channel, topic, payload, expires_at, available_at, max_attempts,
             trace_id)
        select a, n, u, c, t, p, e, coalesce(v, now()), m, r
        from unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                    $7::timestamptz[], $8::timestamptz[], $9::int[], $10::uuid[]) as x(a, n, u, c, t, p, e, v, m, r)
        on conflict (account_id, notification_id, user_id, channel) do nothing
        returning channel
        """,
        [d.account_id for d in deliveries],
        [d.notification_id for d in deliveries],
        [d.user_id for d in deliveries],
        [d.channel for d in deliveries],
        [d.topic for d in deliveries],
        [d.payload for d in deliveries],
        [d.expires_at for d in deliveries],
        [d.available_at for d in deliveries],
        [d.max_attempts or MAX_ATTEMPTS.get(d.channel, 8) for d in deliveries],
        [d.trace_id for d in deliveries],
    )
    # NOTIFY is transactional: senders wake only once the producer commits.
    for channel in {r["channel"] for r in rows}:
        await conn.execute("select pg_notify($1, '')", notify_channel(channel))
    return len(rows)


class Queue:
    """One channel's view of the queue, used by that channel's sender replicas."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        channel: str,
        *,
        worker: str,
        lease_seconds: float = 30.0,
        max_attempts: int | None = None,
        max_retry_after: float = MAX_RETRY_AFTER_SECONDS,
        accounts: AccountRange = AccountRange.ALL,
    ) -> None:
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {', '.join(CHANNELS)}")
        self.pool = pool
        self.channel = channel
        self.worker = worker
        self.lease_seconds = lease_seconds
        # The channel's ceiling applies even to rows enqueued with a higher one.
        self.max_attempts = max_attempts or MAX_ATTEMPTS[channel]
        self.max_retry_after = max_retry_after
        # Claims, rescues and expiries touch only these accounts' rows (a sharded deployment's share).
        self.accounts = accounts
        self._bounds = (accounts.lower, accounts.upper or None)
        # Round-robin position: the next claim starts after the last account served.
        self._cursor = ""

    async def claim(self, limit: int) -> list[Lease]:
        """Lease up to ``limit`` due deliveries, shared fairly across accounts.

        Accounts are visited round-robin from where the previous claim stopped;
        each gets an equal share of ``limit`` (oldest first within the account),
        so a burst in one account delays another account's delivery by at most
        ``ceil(active accounts / limit)`` claims. Rows other replicas hold are skipped.
        """
        rows = list(
            await self.pool.fetch(
                _CLAIM, self.channel, limit, self.lease_seconds, self.worker, self._cursor, *self._bounds
            )
        )
        served = {r["account_id"] for r in rows}
        # More accounts may wait past the last one served when each got one slot.
        next_cursor = max(served) if len(served) >= limit else ""
        # Wrap around to the accounts before the cursor, then top up from the
        # accounts that had more than their share (a few rounds at most).
        for _ in range(3):
            want = limit - len(rows)
            if want <= 0:
                break
            more = await self.pool.fetch(_CLAIM, self.channel, want, self.lease_seconds, self.worker, "", *self._bounds)
            if not more:
                break
            rows += more
        self._cursor = next_cursor
        return [
            Lease(
                delivery_id=r["delivery_id"],
                account_id=r["account_id"],
                notification_id=r["notification_id"],
                user_id=r["user_id"],
                channel=r["channel"],
                topic=r["topic"],
                payload={**r["message"], **r["payload"]} if r["message"] else r["payload"],
                attempts=r["attempts"],
                max_attempts=r["max_attempts"],
                token=r["lease_token"],
                expires_at=r["expires_at"],
            )
            for r in rows
        ]

    async def settle(self, results: Sequence[tuple[Lease, Outcome]]) -> int:
        """Record outcomes in one statement; rows whose token is stale are left alone.

        Returns how many rows changed (fewer than given means some leases were lost).
        """
        return len(await self.settle_rows(results))

    async def settle_rows(self, results: Sequence[tuple[Lease, Outcome]]) -> list[Settled]:
        """``settle``, giving back the rows it changed with their trace id and age.

        The claim does not return the trace id (a claim is the hottest
        statement and stays as it is); the settle's own update returns it,
        with the age the end-to-end histogram observes, in the same round trip.
        """
        if not results:
            return []
        accounts: list[str] = []
        ids: list[int] = []
        tokens: list[int] = []
        states: list[str] = []
        delays: list[float] = []
        errs: list[str | None] = []
        for lease, outcome in results:
            accounts.append(lease.account_id)
            ids.append(lease.delivery_id)
            tokens.append(lease.token)
            if isinstance(outcome, Sent):
                states.append("sent")
                delays.append(0.0)
                errs.append(None)
            elif isinstance(outcome, Drop):
                states.append("dropped")
                delays.append(0.0)
                errs.append(outcome.reason)
            elif isinstance(outcome, Fail) or lease.attempts >= min(lease.max_attempts, self.max_attempts):
                states.append("dead")
                delays.append(0.0)
                errs.append(outcome.error)
            else:
                states.append("queued")
                delays.append(self.retry_delay(lease.attempts, outcome.retry_after))
                errs.append(outcome.error)
        # A peer's error text may hold NUL, which PostgreSQL's jsonb refuses.
        errs = [None if e is None else e.replace("\x00", "\\x00") for e in errs]
        rows = await self.pool.fetch(
            _SETTLE,
            ids,
            tokens,
            states,
            delays,
            errs,
            self.worker,
            accounts,
        )
        return [Settled(r["account_id"], r["delivery_id"], r["trace_id"], r["age"]) for r in rows]

    def retry_delay(self, attempts: int, retry_after: float | None) -> float:
        """Seconds before the next attempt: our backoff, or the peer's Retry-After when longer, capped.

        A peer's value is clamped to ``max_retry_after`` (and anything not a
        finite number is ignored), so no answer can push a delivery's next
        attempt out of range or hold it longer than an operator allows.
        """
        delay = backoff(attempts)
        if retry_after is not None and math.isfinite(retry_after):
            delay = max(delay, retry_after)
        return min(max(delay, 0.0), self.max_retry_after)

    async def rescue(self) -> int:
        """Make deliveries whose lease expired (their sender died or stalled) claimable again.

        The attempt that was under way counts: a delivery whose lease expired on
        its last attempt is dead (``LOST_ON_LAST_ATTEMPT``), so a payload that
        kills its sender ends in the dead letters instead of being retried forever.
        """
        status = await self.pool.execute(_RESCUE, self.channel, self.max_attempts, LOST_ON_LAST_ATTEMPT, *self._bounds)
        return int(status.split()[-1])

    async def expire(self) -> int:
        """Deliveries past their time to live are expired, never sent late."""
        status = await self.pool.execute(
            """
            update queue.deliveries set state = 'expired', finished_at = now()
            where channel = $1 and finished_at is null and expires_at <= now() and state = 'queued'
              and account_id >= $2 and ($3::text is null or account_id < $3)
            """,
            self.channel,
            *self._bounds,
        )
        return int(status.split()[-1])


# Statements built once from the lease helper (their text is constant: asyncpg's statement cache keys on it).
#
# The settle finds its rows by key and fencing token alone: only a claim sets a token and every other
# change of state clears it, so a matching token means the row is still leased to this lease. A
# `state = 'leased'` test here would add nothing but an estimate: the statistics usually see almost no
# leased rows (few are leased at any instant), and on a table of up to a few hundred thousand rows the
# planner then scanned the whole table and compared every leased row with every outcome (a nested loop
# over the unnest: 553 ms for 1,000 outcomes on 20,000 rows, against 20 ms by key; docs/benchmarks.md).
_SETTLE = f"""
    update queue.deliveries d
    set state = case when x.state = 'queued' and now() + make_interval(secs => x.delay) >= d.expires_at
                     then 'expired' else x.state end,
        available_at = case when x.state = 'queued' then now() + make_interval(secs => x.delay) else d.available_at end,
        finished_at = case when x.state = 'queued' and now() + make_interval(secs => x.delay) < d.expires_at
                           then null else now() end,
        {DELIVERIES.release()},
        errors = case when x.err is null then d.errors
                      else d.errors || jsonb_build_array(jsonb_build_object(
                          'at', now(), 'attempt', d.attempts, 'error', x.err, 'worker', $6::text)) end
    from unnest($1::bigint[], $2::bigint[], $3::text[], $4::float8[], $5::text[], $7::text[])
        as x(id, token, state, delay, err, account)
    where d.account_id = x.account and d.delivery_id = x.id and {DELIVERIES.fence("x.token", "d.")}
    returning d.account_id, d.delivery_id, d.trace_id,
              extract(epoch from now() - d.created_at)::float8 as age
"""

# The attempt under way counts (see ``Queue.rescue``).
_RESCUE = f"""
    update queue.deliveries d
    set state = case when last then 'dead' else 'queued' end,
        finished_at = case when last then now() end, {DELIVERIES.release()},
        errors = d.errors || jsonb_build_array(jsonb_build_object(
            'at', now(), 'attempt', d.attempts, 'worker', d.{DELIVERIES.holder},
            'error', case when last then $3::text else 'lease expired before the outcome was recorded' end))
    from (select delivery_id, account_id, attempts >= least(max_attempts, $2) as last
          from queue.deliveries
          where channel = $1 and finished_at is null and available_at <= now()
            and account_id >= $4 and ($5::text is null or account_id < $5)
            and state = 'leased' and {DELIVERIES.expired("now()")}
          for update skip locked) x
    where d.account_id = x.account_id and d.delivery_id = x.delivery_id
"""


# One statement: walk the accounts with due work (a loose index scan on
# deliveries_pending: one probe per account) within the queue's account range
# ($6 inclusive, $7 exclusive or null), give each an equal share of the
# limit, lock those rows (skipping other replicas' locks) and lease them.
# Leased rows keep their place in deliveries_pending (so that a claim is a HOT
# update, see migration 0003): the state test skips them, and the TTL test is
# answered by the index.
#
# The rows picked are updated by their ctid (a TID scan), not joined back by
# key: the join made the planner hash the whole table on small tables (a
# sequential scan per claim) or probe the primary key once per row on large
# ones; by ctid the statement takes 18 ms per 1,000 rows against 21 to 32 ms on
# 20,000 rows, and 18 to 20 against 25 ms on 520,000. A row's ctid cannot change
# between the pick and the update: this statement holds the row's lock
# (FOR UPDATE) from one to the other.
_CLAIM = """
with recursive walk(account_id, n) as (
    (select account_id, 1 from queue.deliveries
     where channel = $1 and finished_at is null and available_at <= now() and expires_at > now()
       and account_id > $5 and account_id >= $6 and ($7::text is null or account_id < $7) and state = 'queued'
     order by account_id limit 1)
    union all
    select nxt.account_id, w.n + 1 from walk w,
    lateral (select d.account_id from queue.deliveries d
             where d.channel = $1 and d.finished_at is null and d.available_at <= now() and d.expires_at > now()
               and d.account_id > w.account_id and ($7::text is null or d.account_id < $7) and d.state = 'queued'
             order by d.account_id limit 1) nxt
    where w.n < $2
),
share as (select greatest(1, ceil($2::float8 / nullif(count(*), 0)))::int as per from walk),
picked as (
    select p.ctid from walk w, share s,
    lateral (select d.ctid from queue.deliveries d
             where d.channel = $1 and d.account_id = w.account_id and d.finished_at is null
               and d.available_at <= now() and d.expires_at > now() and d.state = 'queued'
             order by d.available_at limit s.per
             for update skip locked) p
    limit $2
),
leased as (
    update queue.deliveries d
    set state = 'leased', attempts = d.attempts + 1, lease_token = nextval('queue.lease_tokens'),
        lease_expires_at = now() + make_interval(secs => $3), leased_by = $4
    where d.ctid = any (array(select ctid from picked))
    returning d.delivery_id, d.account_id, d.notification_id, d.user_id, d.channel, d.topic,
              d.payload, d.attempts, d.max_attempts, d.lease_token, d.expires_at
)
-- The shared message (migration 0006), merged by the caller: PostgreSQL only reads it.
select l.*, m.message from leased l
left join queue.messages m
       on m.account_id = l.account_id and m.notification_id = l.notification_id and m.user_id = l.user_id
"""
