"""The loop every sender runs: wait for work, claim, handle, settle each as it finishes.

Three parts run side by side in one worker:

* the **claimer** leases due deliveries whenever handlers have room (up to
  ``batch`` leases held at once), rescues expired leases and expires
  deliveries past their time to live; idle, it sleeps on LISTEN/NOTIFY and
  wakes within milliseconds of a commit (``poll_seconds`` is the fallback
  when a notification is missed);
* ``concurrency`` **handlers** take leases one at a time; each send is
  bounded so it ends before its lease does, so a hung peer holds only its own
  delivery;
* the **settler** records outcomes as they arrive: whatever finished while
  the previous statement ran is written by the next one, so a slow send never
  holds back the settle of its neighbours, and under load outcomes are still
  written many to a statement.

The database going away (a restart, a reset connection) stops nothing: the
claimer waits with backoff and listens again, the settler keeps finished
outcomes and writes them once the database is back (fencing tokens make a
late write of a lease someone else has since taken change nothing).

What an operator sees (docs/observability.md): while a lease is handled its
``account_id``, ``notification_id``, ``delivery_id`` and ``channel`` are on
every line the handler logs (``belfry.log.working_on``); every outcome is
counted in ``belfry_deliveries_total{channel,outcome}`` once it is known
(by the settler, as it takes the outcome to write: before the write, so an
outcome whose write fails is counted all the same), and once
recorded it gets one info line ("delivery settled", with the publishing
call's ``trace_id``) and an observation of ``belfry_end_to_end_seconds``
(the delivery's age). The outcome labels are ``OUTCOMES``, the only
vocabulary every one of them uses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg

from belfry import background, db, log, metrics, trace
from belfry.queue import ops
from belfry.queue.store import Drop, Fail, Lease, Outcome, Queue, Retry, Sent, Settled, notify_channel

_LOG = log.get(__name__)

# The one outcome vocabulary: the ``outcome`` label of every delivery metric and log line.
OUTCOMES: dict[type[Outcome], str] = {Sent: "sent", Retry: "retry", Fail: "fail", Drop: "dropped"}

Handler = Callable[[Lease], Awaitable[Outcome]]
Preparer = Callable[[list[Lease]], Awaitable[None]]

# A send must end this share of the lease before the lease expires, so its
# outcome is written while the lease is still ours.
_SEND_SHARE = 0.8
# At shutdown, how many times the settler tries to write what is left before
# leaving it to lease expiry (the deliveries are then retried, never lost).
_FINAL_SETTLE_TRIES = 5

Result = tuple[Lease, Outcome]


async def run(
    queue: Queue,
    handle: Handler,
    *,
    stop: asyncio.Event,
    batch: int = 100,
    concurrency: int = 20,
    poll_seconds: float = 1.0,
    rescue_seconds: float = 1.0,
    prepare: Preparer | None = None,
) -> None:
    """Drain ``queue`` with ``handle`` until ``stop`` is set; a database outage is waited out.

    Deliveries past their time to live are expired every ``rescue_seconds``,
    and expired leases rescued as often but no more than four times per lease
    (not on every claim: under load the claim loop runs thousands of times a
    second, and a rescue reads every due row of the channel).

    ``prepare``, when given, sees each claimed batch once before its leases
    are handled (e.g. to take per-batch database decisions in one round trip);
    if it fails, the handlers still run and must cope on their own.
    """
    worker = _Worker(queue, handle, batch=batch, concurrency=concurrency, prepare=prepare)
    await worker.run(stop, poll_seconds=poll_seconds, rescue_seconds=rescue_seconds)


class _Worker:
    def __init__(
        self, queue: Queue, handle: Handler, *, batch: int, concurrency: int, prepare: Preparer | None
    ) -> None:
        self.queue = queue
        self.handle = handle
        self.batch = max(1, batch)
        self.concurrency = max(1, concurrency)
        self.prepare = prepare
        # Claim again once this many leases are free: small claims cost a round trip each.
        self.min_claim = max(1, min(self.concurrency, self.batch // 2))
        self.inbox: asyncio.Queue[tuple[Lease, float]] = asyncio.Queue()
        self.held = 0  # leases claimed whose handler has not finished
        self.room = asyncio.Event()  # a handler finished: the claimer may have room again
        self.wake = asyncio.Event()  # a NOTIFY arrived (or the listener was lost)
        self.listener_lost = False
        self.finished: list[Result] = []
        self.settle_wake = asyncio.Event()
        self.closing = False
        channel = queue.channel
        self.counted = {kind: metrics.DELIVERIES.labels(channel, label) for kind, label in OUTCOMES.items()}
        self.tally: collections.Counter[type[Outcome]] = collections.Counter()  # outcomes not yet counted
        self.aged = {kind: metrics.END_TO_END.labels(channel, label) for kind, label in OUTCOMES.items()}

    async def run(self, stop: asyncio.Event, *, poll_seconds: float, rescue_seconds: float) -> None:
        handlers = [asyncio.create_task(self._handle_forever()) for _ in range(self.concurrency)]
        settler = asyncio.create_task(self._settle_forever())
        try:
            await self._claim_forever(stop, poll_seconds, rescue_seconds)
        finally:
            # Drain: every claimed lease is handled and its outcome written before we return.
            with contextlib.suppress(asyncio.CancelledError):
                await self.inbox.join()
            for task in handlers:
                task.cancel()
            self.closing = True
            self.settle_wake.set()
            await asyncio.gather(*handlers, settler, return_exceptions=True)

    # -- claimer ----------------------------------------------------------

    async def _claim_forever(self, stop: asyncio.Event, poll_seconds: float, rescue_seconds: float) -> None:
        delays = background.Backoff(base=0.1, cap=10.0)
        listener: asyncpg.pool.PoolConnectionProxy | None = None
        last_rescue = last_expire = float("-inf")
        # A rescue reads every due row of the channel (no index can name leased rows without making the
        # claims non-HOT updates, migration 0003): 34 ms with 100,000 rows due, 358 ms with a million
        # (bench/queue_upkeep.py), every second, in every replica, while a backlog is what it must drain.
        # A lease that ran out is found at most a quarter of a lease late instead of a second late. An
        # expiry costs 3 ms with a million due and keeps its pace.
        rescue_every = max(rescue_seconds, self.queue.lease_seconds / 4)
        try:
            while not stop.is_set():
                try:
                    if listener is None or self.listener_lost:
                        listener = await self._listen(listener)
                    if time.monotonic() - last_rescue >= rescue_every:
                        await self.queue.rescue()
                        last_rescue = time.monotonic()
                    if time.monotonic() - last_expire >= rescue_seconds:
                        await self.queue.expire()
                        last_expire = time.monotonic()
                    claimed = await self._claim()
                except Exception as exc:
                    if stop.is_set():
                        break
                    wait = delays.next()
                    if db.is_disconnect(exc):
                        _LOG.warning("queue unreachable; retrying", channel=self.queue.channel, error=repr(exc))
                    else:
                        _LOG.exception("queue step failed; retrying", channel=self.queue.channel)
                    await self._unlisten(listener)
                    listener = None
                    await background.sleep(stop, wait)
                    continue
                delays.reset()
                if claimed:
                    continue
                await self._idle(stop, poll_seconds)
        finally:
            await self._unlisten(listener)

    async def _claim(self) -> bool:
        """Lease what there is room for; True when the claim came back full (claim again at once)."""
        room = self.batch - self.held
        if room < self.min_claim:
            return False
        # Clear before claiming: a NOTIFY that lands while we claim must wake the next wait.
        self.wake.clear()
        leases = await self.queue.claim(room)
        if not leases:
            return False
        deadline = time.monotonic() + self.queue.lease_seconds * _SEND_SHARE
        self.held += len(leases)
        if self.prepare is not None:
            try:
                await self.prepare(leases)
            except Exception:  # the handlers fall back to their per-lease path
                _LOG.exception("batch preparation failed", count=len(leases))
        for lease in leases:
            self.inbox.put_nowait((lease, deadline))
        return len(leases) == room

    async def _idle(self, stop: asyncio.Event, poll_seconds: float) -> None:
        """Sleep until there is work (a NOTIFY, or room after a full claim), ``stop``, or the poll timeout."""
        # Full: only a finished handler can change that. Otherwise only new work can.
        self.room.clear()
        full = self.batch - self.held < self.min_claim
        events = [self.room, stop] if full else [self.wake, stop]
        waiters = [asyncio.ensure_future(event.wait()) for event in events]
        try:
            await asyncio.wait(waiters, timeout=poll_seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _on_notify(self, *_: object) -> None:
        self.wake.set()

    def _on_lost(self, *_: object) -> None:
        # The database closed the listening connection (a restart, a reset): listen again, and claim
        # at once, since NOTIFYs sent meanwhile are gone.
        self.listener_lost = True
        self.wake.set()

    async def _listen(self, old: asyncpg.pool.PoolConnectionProxy | None) -> asyncpg.pool.PoolConnectionProxy:
        """(Re)acquire the listening connection; a claim follows at once, so nothing committed meanwhile is missed."""
        await self._unlisten(old)
        conn: asyncpg.pool.PoolConnectionProxy = await self.queue.pool.acquire()
        self.listener_lost = False
        try:
            conn.add_termination_listener(self._on_lost)
            await conn.add_listener(notify_channel(self.queue.channel), self._on_notify)
        except BaseException:
            await self._release(conn)
            raise
        return conn

    async def _unlisten(self, conn: asyncpg.pool.PoolConnectionProxy | None) -> None:
        if conn is None:
            return
        if not self.listener_lost:
            with contextlib.suppress(Exception):
                conn.remove_termination_listener(self._on_lost)
                await conn.remove_listener(notify_channel(self.queue.channel), self._on_notify)
        await self._release(conn)

    async def _release(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        # A connection the database dropped is discarded by the pool; nothing to clean up here.
        with contextlib.suppress(Exception):
            await self.queue.pool.release(conn, timeout=5)

    # -- handlers ---------------------------------------------------------

    async def _handle_forever(self) -> None:
        bound = _Bound()
        while True:
            lease, deadline = await self.inbox.get()
            try:
                # Every line the handler logs names the delivery: one context variable set over the previous
                # lease's (this task has a context of its own, asyncio gives each task a copy, and handles
                # one lease at a time), its fields built only if a line is written. Binding the four names
                # with structlog's contextvars cost a twentieth of a no-op sender's CPU, bound_contextvars
                # (save and restore around each lease) a fifth.
                log.working_on(lease)
                outcome = await self._handle_one(lease, deadline, bound)
                # Counted here, not around the handler: the worker's own outcomes (a send that
                # timed out or crashed) are outcomes too. Tallied, and added to the counters by the
                # settler (``_count``): a counter's increment takes a lock, a dict's does not.
                self.tally[type(outcome)] += 1
                # Append after the await: the settler swaps ``finished`` for a new list meanwhile.
                self.finished.append((lease, outcome))
                self.settle_wake.set()
            finally:
                self.held -= 1
                self.room.set()
                self.inbox.task_done()

    async def _handle_one(self, lease: Lease, deadline: float, bound: _Bound) -> Outcome:
        budget = deadline - time.monotonic()
        if budget <= 0:
            return Retry("the lease ran out before the send started")
        timer = bound.arm(budget)
        try:
            return await self.handle(lease)
        except asyncio.CancelledError:
            if not bound.expired():
                raise  # the worker is being cancelled, not this send
            _LOG.warning("send timed out", delivery_id=lease.delivery_id, seconds=round(budget, 1))
            return Retry(f"send timed out after {budget:.1f}s (bounded by the lease)")
        except Exception as exc:  # a bug in one delivery must not stop the sender
            _LOG.exception("handler crashed", delivery_id=lease.delivery_id)
            return Retry(f"handler crashed: {exc!r}")
        finally:
            timer.cancel()

    # -- settler ----------------------------------------------------------

    def _count(self) -> None:
        """Add the tallied outcomes to ``belfry_deliveries_total`` (once per settle, not once per delivery)."""
        for kind, n in self.tally.items():
            self.counted[kind].inc(n)
        self.tally.clear()

    async def _settle_forever(self) -> None:
        delays = background.Backoff(base=0.1, cap=10.0)
        while True:
            await self.settle_wake.wait()
            self.settle_wake.clear()
            while self.finished:
                self._count()  # the handlers tally as they append to ``finished``
                results, self.finished = self.finished, []
                try:
                    await self._settle(results)
                except Exception as exc:
                    self.finished[:0] = results  # keep them: written once the database is back
                    if self.closing and delays.failures >= _FINAL_SETTLE_TRIES:
                        _LOG.error(
                            "outcomes not recorded at shutdown; their leases will expire and they will be retried",
                            count=len(self.finished),
                            error=repr(exc),
                        )
                        self._count()
                        return
                    wait = delays.next()
                    _LOG.warning("settle failed; retrying", count=len(results), error=repr(exc), retry_in=wait)
                    await asyncio.sleep(wait)
                    continue
                delays.reset()
            if self.closing:
                self._count()
                return

    async def _settle(self, results: list[Result]) -> None:
        try:
            settled = await self.queue.settle_rows(results)
        except Exception as exc:
            if db.is_disconnect(exc) or len(results) == 1:
                raise
            # A statement error caused by one outcome must not cost the others theirs.
            _LOG.exception("batch settle failed; settling one by one", count=len(results))
            for result in results:
                await self._settle_alone(result)
            return
        self._report(results, settled)

    async def _settle_alone(self, result: Result) -> None:
        lease, outcome = result
        try:
            settled = await self.queue.settle_rows([result])
        except Exception as exc:
            if db.is_disconnect(exc):
                raise
            _LOG.exception("outcome could not be recorded", delivery_id=lease.delivery_id, outcome=repr(outcome))
            result = (lease, Fail(f"outcome could not be recorded: {exc!r}"))
            settled = await self.queue.settle_rows([result])
        self._report([result], settled)

    def _report(self, results: list[Result], settled: list[Settled]) -> None:
        """One line and one end-to-end observation per recorded outcome; a warning for leases lost."""
        recorded = {(s.account_id, s.delivery_id): s for s in settled}
        # A line per delivery only where info lines are kept: its fields are not built for nothing on a hot path.
        lines = _LOG.is_enabled_for(logging.INFO)
        for lease, outcome in results:
            row = recorded.get((lease.account_id, lease.delivery_id))
            if row is None:
                continue  # its lease was lost: the replica that holds it now reports it
            self.aged[type(outcome)].observe(row.age_seconds)
            if not lines:
                continue
            _LOG.info(
                "delivery settled",
                outcome=OUTCOMES[type(outcome)],
                account_id=lease.account_id,
                notification_id=str(lease.notification_id),
                delivery_id=lease.delivery_id,
                channel=lease.channel,
                trace_id=trace.as_hex(row.trace_id),
                attempt=lease.attempts,
                age_seconds=round(row.age_seconds, 3),
                error=_reason(outcome),
            )
        lost = len(results) - len(recorded)
        if lost:
            _LOG.warning("leases lost before settle (another replica owns them now)", count=lost)


class _Bound:
    """One handler task's bound on each of its sends: the task is cancelled when the time is up.

    What ``asyncio.timeout`` does, without it looking up the running loop and
    the current task again for every lease (each look-up asks the OS for the
    process id: with the timer, 12 % of a no-op sender's samples, py-spy of
    bench/queue_drain.py). Made inside the handler task, which sends one
    lease at a time.
    """

    def __init__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._fired = False

    def arm(self, seconds: float) -> asyncio.TimerHandle:
        """Cancel this task in ``seconds`` unless the returned timer is cancelled first (once the send ends)."""
        self._fired = False
        return self._loop.call_later(seconds, self._fire)

    def _fire(self) -> None:
        self._fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """After a CancelledError from the send: True when the timer caused it (and nothing else asked too)."""
        return self._fired and self._task.uncancel() == 0


def _reason(outcome: Outcome) -> str | None:
    """What an outcome says went wrong (a drop's why), for its log line."""
    if isinstance(outcome, Sent):
        return None
    return outcome.reason if isinstance(outcome, Drop) else outcome.error


async def maintain(
    pool: asyncpg.Pool,
    *,
    stop: asyncio.Event,
    retention_seconds: float = 7 * 86400.0,
    every_seconds: float = 60.0,
    gauges_seconds: float = 5.0,
) -> None:
    """Keep the queue table small and its gauges fresh until ``stop`` is set.

    Every ``every_seconds`` finished deliveries older than ``retention_seconds``
    are purged; every ``gauges_seconds`` QUEUE_DEPTH / QUEUE_AGE are refreshed.
    Any number of replicas may run it (purges skip each other's locked rows).
    """

    async def purge() -> None:
        purged = await ops.purge(pool, older_than_seconds=retention_seconds)
        if purged:
            _LOG.info("purged finished deliveries", count=purged)

    await asyncio.gather(
        background.every("queue gauges", gauges_seconds, lambda: ops.update_gauges(pool), stop),
        background.every("queue purge", every_seconds, purge, stop),
    )
