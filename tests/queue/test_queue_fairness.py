"""Claims are fair across accounts: a burst in one never starves another."""

from __future__ import annotations

import uuid

import asyncpg
from belfry.queue import Queue, Sent

from tests.queue.queue_helpers import burst, delivery, put


async def test_single_delivery_is_not_held_behind_a_100k_burst(pool: asyncpg.Pool) -> None:
    noisy, quiet = f"a_{uuid.uuid4().hex[:8]}", f"b_{uuid.uuid4().hex[:8]}"
    await burst(pool, noisy, "batching", 100_000)
    single = delivery(quiet, "batching")
    await put(pool, [single])  # enqueued after the whole burst
    queue = Queue(pool, "batching", worker="w")
    try:
        first = await queue.claim(100)
        # The bound: with K accounts due and a claim limit >= K, every account is in the next claim.
        assert single.notification_id in {lease.notification_id for lease in first}
        assert len(first) == 100
        assert sum(lease.account_id == noisy for lease in first) == 99
        await queue.settle([(lease, Sent()) for lease in first])
    finally:
        await pool.execute("delete from queue.deliveries where account_id = any($1::text[])", [noisy, quiet])


async def test_round_robin_when_accounts_outnumber_the_claim(pool: asyncpg.Pool) -> None:
    prefix = uuid.uuid4().hex[:8]
    accounts = [f"rr_{prefix}_{i}" for i in range(7)]
    for account in accounts:
        await burst(pool, account, "batching", 20)
    queue = Queue(pool, "batching", worker="w")
    limit = 3
    served: list[set[str]] = []
    try:
        for _ in range(3):  # ceil(7 / 3) claims must reach every account
            leases = await queue.claim(limit)
            served.append({lease.account_id for lease in leases})
            await queue.settle([(lease, Sent()) for lease in leases])
        assert set().union(*served) == set(accounts)
        assert all(len(s) == limit for s in served[:2])  # one delivery per account while accounts > limit
    finally:
        await pool.execute("delete from queue.deliveries where account_id = any($1::text[])", accounts)
