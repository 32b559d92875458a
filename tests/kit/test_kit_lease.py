"""Leases with fencing tokens (``belfry.lease``): a stale token changes no row, in each of the three leased tables.

Rows are made far from due (windows close and digests fire a century from
now), so the batching replicas other tests run never claim them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from belfry.lease import Leases
from belfry.queue.store import _CLAIM, DELIVERIES, Lease, Queue, Sent

from services.batching import digest_store, store
from services.batching.digest_store import SUBJECTS
from services.batching.store import WINDOWS

LATER = datetime.now(UTC) + timedelta(days=36500)
ROWS = {
    "deliveries": """
        insert into queue.deliveries (account_id, notification_id, user_id, channel, topic, payload, expires_at, state)
        values ($1, gen_random_uuid(), 'u', 'email', 't', '{}', now() + interval '1 hour', 'leased')
        returning delivery_id""",
    "windows": """
        insert into batching.windows (account_id, window_id, user_id, object_type, topic, opened_at, closes_at)
        values ($1, gen_random_uuid(), 'u', 'deal', 't', now(), $2) returning window_id""",
    "subjects": """
        insert into batching.digest_subjects (account_id, user_id, digest, next_fire_at)
        values ($1, 'u', 'tasks', $2) returning user_id, digest""",
}
TABLES = {"deliveries": DELIVERIES, "windows": WINDOWS, "subjects": SUBJECTS}


async def _row(pool: asyncpg.Pool, table: str, account_id: str) -> list[Any]:
    """A new row of ``table``: its key values."""
    args: list[object] = [account_id] if table == "deliveries" else [account_id, LATER]
    return [account_id, *(await pool.fetchrow(ROWS[table], *args) or [])]


async def _take(pool: asyncpg.Pool, leases: Leases, key: list[object], holder: str) -> int:
    """Lease the row for an hour; its new token."""
    where = " and ".join(f"{k} = ${i}" for i, k in enumerate(leases.keys, 1))
    n = len(key)
    sql = f"update {leases.table} set {leases.take(f'${n + 1}', f'${n + 2}')} where {where} returning {leases.token}"
    token: int = await pool.fetchval(sql, *key, datetime.now(UTC) + timedelta(hours=1), holder)
    return token


@pytest.mark.parametrize("table", sorted(TABLES))
async def test_a_stale_token_changes_nothing(pool: asyncpg.Pool, account_id: str, table: str) -> None:
    leases = TABLES[table]
    key = await _row(pool, table, account_id)
    stale = await _take(pool, leases, key, "paused")
    current = await _take(pool, leases, key, "rescuer")  # the first lease ran out, another replica took the row
    assert current > stale
    read = f"select {leases.token}, {leases.holder} from {leases.table} where {leases.held()}"
    assert await pool.fetchrow(read, *key, stale) is None
    for changes in (leases.release(), leases.hold_off("now()")):
        assert await pool.execute(leases.fenced(changes), *key, stale) == "UPDATE 0"
    assert tuple(await pool.fetchrow(read, *key, current) or ()) == (current, "rescuer")
    assert await pool.execute(leases.fenced(leases.release()), *key, current) == "UPDATE 1"
    assert await pool.fetchrow(read, *key, current) is None  # released: no token fences it any more


async def test_each_store_fences_with_it(pool: asyncpg.Pool, account_id: str) -> None:
    """The stores' own fenced writes: a settle, a window's close and a digest's reschedule."""
    _, delivery_id = await _row(pool, "deliveries", account_id)
    stale, current = [await _take(pool, DELIVERIES, [account_id, delivery_id], w) for w in ("paused", "rescuer")]
    for token, changed in ((stale, 0), (current, 1)):
        lease = Lease(delivery_id, account_id, uuid.uuid4(), "u", "email", "t", {}, 1, 8, token, LATER)
        assert await Queue(pool, "email", worker="w").settle([(lease, Sent())]) == changed

    _, window_id = await _row(pool, "windows", account_id)
    stale, current = [await _take(pool, WINDOWS, [account_id, window_id], w) for w in ("paused", "rescuer")]
    async with pool.acquire() as conn, conn.transaction():
        assert (
            await store.lock_for_close(conn, store.DueWindow(account_id, window_id, "u", "deal", "t", stale, 1)) is None
        )
        assert (
            await store.lock_for_close(conn, store.DueWindow(account_id, window_id, "u", "deal", "t", current, 1)) == []
        )

    _, user_id, digest = await _row(pool, "subjects", account_id)
    stale, current = [await _take(pool, SUBJECTS, [account_id, user_id, digest], w) for w in ("paused", "rescuer")]
    for token, changed in ((stale, False), (current, True)):
        subject = digest_store.Subject(account_id, user_id, digest, "UTC", "", LATER, None, token)
        assert await digest_store.reschedule(pool, subject, time_zone="UTC", period="p", next_fire_at=LATER) is changed


def test_the_delivery_claim_takes_the_lease_as_the_helper_writes_it() -> None:
    """``_CLAIM`` stays hand-written (the hottest statement); its lease is the helper's to the letter."""
    assert DELIVERIES.take("now() + make_interval(secs => $3)", "$4") in " ".join(_CLAIM.split())
