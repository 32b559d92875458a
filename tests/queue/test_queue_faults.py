"""Faults at the queue: absurd Retry-After, lost leases on the last attempt, hung sends, hostile error text."""

from __future__ import annotations

import asyncio
import email.utils
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from belfry import ssrf
from belfry.queue import Lease, Outcome, Queue, Retry, Sent, worker
from belfry.queue.store import LOST_ON_LAST_ATTEMPT

from tests.queue.queue_helpers import delivery, put, states


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("99999999999999999999", 99999999999999999999.0),
        ("9" * 400, 1e20),
        ("1e5", None),
        ("-5", None),
        ("+5", None),
        ("\u00b2", None),  # str.isdigit() says yes; float() refuses it
        ("\u0661\u0662", None),  # Arabic-Indic digits
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_parses_strictly(header: str | None, expected: float | None) -> None:
    assert ssrf.retry_after_seconds(header, time.time()) == expected


def test_retry_after_http_dates_count_from_now_and_never_go_negative() -> None:
    now = time.time()
    later = email.utils.formatdate(now + 300, usegmt=True)
    assert 298 <= (ssrf.retry_after_seconds(later, now) or 0) <= 301
    assert ssrf.retry_after_seconds(email.utils.formatdate(now - 300, usegmt=True), now) == 0.0
    # "-0000" yields a date without a zone: it is still read as UTC.
    assert 298 <= (ssrf.retry_after_seconds(email.utils.formatdate(now + 300), now) or 0) <= 301


async def _claim_own(queue: Queue, account_ids: set[str]) -> list[Lease]:
    return [x for x in await queue.claim(1000) if x.account_id in account_ids]


async def test_absurd_retry_after_is_clamped_and_spares_the_other_account(pool: asyncpg.Pool, account_id: str) -> None:
    other = f"{account_id}_b"
    hostile, huge, calm = (
        delivery(account_id, "other_apps", ttl=86400, user_id="u1"),
        delivery(account_id, "other_apps", ttl=86400, user_id="u2"),
        delivery(other, "other_apps", ttl=86400),
    )
    await put(pool, [hostile, huge, calm])
    queue = Queue(pool, "other_apps", worker="w", max_retry_after=600)
    leases = {x.notification_id: x for x in await _claim_own(queue, {account_id, other})}
    header = ssrf.retry_after_seconds("99999999999999999999", time.time())
    settled = await queue.settle(
        [
            (leases[hostile.notification_id], Retry("429", retry_after=header)),
            (leases[huge.notification_id], Retry("429", retry_after=1e12)),
            (leases[calm.notification_id], Sent()),
        ]
    )
    assert settled == 3
    assert await states(pool, other) == {"sent": 1}
    rows = await pool.fetch(
        "select state, available_at - now() as wait from queue.deliveries where account_id = $1", account_id
    )
    assert [r["state"] for r in rows] == ["queued", "queued"]
    assert all(timedelta(seconds=0) < r["wait"] <= timedelta(seconds=600) for r in rows)


async def test_a_clamped_retry_past_the_ttl_expires(pool: asyncpg.Pool, account_id: str) -> None:
    item = delivery(account_id, "other_apps", ttl=120)
    await put(pool, [item])
    queue = Queue(pool, "other_apps", worker="w")  # default maximum: one hour, past this TTL
    [lease] = await _claim_own(queue, {account_id})
    assert await queue.settle([(lease, Retry("429", retry_after=1e20))]) == 1
    assert await states(pool, account_id) == {"expired": 1}


async def test_error_text_with_nul_is_recorded(pool: asyncpg.Pool, account_id: str) -> None:
    item = delivery(account_id, "mobile")
    await put(pool, [item])
    queue = Queue(pool, "mobile", worker="w")
    [lease] = await _claim_own(queue, {account_id})
    assert await queue.settle([(lease, Retry("peer said \x00 here"))]) == 1
    errors = await pool.fetchval("select errors from queue.deliveries where account_id = $1", account_id)
    assert errors[-1]["error"] == "peer said \\x00 here"


async def _expire_leases(pool: asyncpg.Pool, account_id: str) -> None:
    await pool.execute(
        "update queue.deliveries set lease_expires_at = now() - interval '1 second' where account_id = $1",
        account_id,
    )


async def test_a_lease_lost_on_the_last_attempt_is_dead_not_retried(pool: asyncpg.Pool, account_id: str) -> None:
    item = delivery(account_id, "bell", max_attempts=2)
    await put(pool, [item])
    queue = Queue(pool, "bell", worker="w")
    # Attempt 1: the sender dies holding the lease; the rescue queues it again.
    await _claim_own(queue, {account_id})
    await _expire_leases(pool, account_id)
    assert await queue.rescue() >= 1
    assert await states(pool, account_id) == {"queued": 1}
    # Attempt 2, the last: the sender dies again; the rescue ends it.
    [lease] = await _claim_own(queue, {account_id})
    assert lease.attempts == 2
    await _expire_leases(pool, account_id)
    assert await queue.rescue() >= 1
    row = await pool.fetchrow(
        "select state, errors, finished_at from queue.deliveries where account_id = $1", account_id
    )
    assert row is not None and row["state"] == "dead" and row["finished_at"] is not None
    assert [e["error"] for e in row["errors"]][-1] == LOST_ON_LAST_ATTEMPT
    assert await _claim_own(queue, {account_id}) == []


async def test_the_channel_cap_ends_rows_enqueued_with_more_attempts_on_rescue(
    pool: asyncpg.Pool, account_id: str
) -> None:
    await put(pool, [delivery(account_id, "bell", max_attempts=50)])
    queue = Queue(pool, "bell", worker="w", max_attempts=1)
    await _claim_own(queue, {account_id})
    await _expire_leases(pool, account_id)
    await queue.rescue()
    assert await states(pool, account_id) == {"dead": 1}


async def _wait_for_states(pool: asyncpg.Pool, account_id: str, wanted: dict[str, int]) -> None:
    while await states(pool, account_id) != wanted:  # noqa: ASYNC110 - the state lives in the database; no event to await
        await asyncio.sleep(0.02)


async def test_a_hung_send_holds_back_only_its_own_delivery(pool: asyncpg.Pool, account_id: str) -> None:
    await put(pool, [delivery(account_id, "browser", user_id=f"u{i}") for i in range(5)])
    release = asyncio.Event()

    async def handle(lease: Lease) -> Outcome:
        if lease.account_id == account_id and lease.user_id == "u0":
            await release.wait()  # a peer that never answers (until the test lets it)
        return Sent()

    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(Queue(pool, "browser", worker="w"), handle, stop=stop, batch=10))
    try:
        # The four others are recorded while the first is still in flight.
        await asyncio.wait_for(_wait_for_states(pool, account_id, {"sent": 4, "leased": 1}), timeout=30)
        release.set()
        await asyncio.wait_for(_wait_for_states(pool, account_id, {"sent": 5}), timeout=30)
    finally:
        release.set()
        stop.set()
        await task


async def test_a_send_is_bounded_by_its_lease(pool: asyncpg.Pool, account_id: str) -> None:
    await put(pool, [delivery(account_id, "mobile")])
    never = asyncio.Event()

    async def handle(lease: Lease) -> Outcome:
        if lease.account_id == account_id:
            await never.wait()
        return Sent()

    stop = asyncio.Event()
    queue = Queue(pool, "mobile", worker="w", lease_seconds=0.5)
    task = asyncio.create_task(worker.run(queue, handle, stop=stop, rescue_seconds=3600))
    try:
        # The send is cut before the lease runs out, so the retry is ours to record (no rescue needed).
        await asyncio.wait_for(_wait_for_states(pool, account_id, {"queued": 1}), timeout=30)
    finally:
        stop.set()
        await task
    row = await pool.fetchrow("select errors, available_at from queue.deliveries where account_id = $1", account_id)
    assert row is not None
    assert row["errors"][-1]["error"].startswith("send timed out")
    assert row["available_at"] > datetime.now(UTC) - timedelta(seconds=5)


async def test_a_lost_listener_is_replaced_and_work_still_wakes_the_worker(pool: asyncpg.Pool, account_id: str) -> None:
    seen = asyncio.Event()

    async def handle(lease: Lease) -> Outcome:
        if lease.account_id == account_id:
            seen.set()
        return Sent()

    stop = asyncio.Event()
    queue = Queue(pool, "other_apps", worker="w")
    # Polling every hour: only a NOTIFY on a live listener can wake it in time.
    task = asyncio.create_task(worker.run(queue, handle, stop=stop, poll_seconds=3600, rescue_seconds=3600))
    try:
        pids: list[int] = []
        while not pids:
            pids = list(
                await pool.fetchval(
                    """select coalesce(array_agg(pid), '{}') from pg_stat_activity
                       where datname = current_database() and query = 'LISTEN "belfry_queue_other_apps"'"""
                )
            )
            await asyncio.sleep(0.02)
        # The database drops the listening connection (as a restart or a reset would).
        await pool.execute("select pg_terminate_backend(pid) from unnest($1::int[]) as pid", pids)
        await asyncio.sleep(0.2)  # give it time to listen again: the wake-up below must come from a NOTIFY
        await put(pool, [delivery(account_id, "other_apps")])
        await asyncio.wait_for(seen.wait(), timeout=30)
    finally:
        stop.set()
        await task
