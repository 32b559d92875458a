"""The daily cap taken for a whole batch in one round trip keeps the one-at-a-time rules."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import asyncpg

from services.email.store import CapRequest, take_cap_slots

_IDS = itertools.count(10_000_000 + uuid.uuid4().int % 1_000_000_000)


def _requests(account_id: str, address: str, n: int, topic: str = "t.one") -> list[CapRequest]:
    return [CapRequest(account_id, next(_IDS), address, topic) for _ in range(n)]


async def _count(pool: asyncpg.Pool, account_id: str, address: str, topic: str = "t.one") -> int | None:
    value = await pool.fetchval(
        "select sent from email.daily_counts where account_id = $1 and address = $2 and topic = $3",
        account_id,
        address.lower(),
        topic,
    )
    return None if value is None else int(value)


async def _slots(pool: asyncpg.Pool, account_id: str) -> set[int]:
    rows = await pool.fetch("select delivery_id from email.cap_slots where account_id = $1", account_id)
    return {r["delivery_id"] for r in rows}


async def test_a_batch_gets_exactly_the_slots_left_and_refused_ones_leave_no_slot(
    pool: asyncpg.Pool, account_id: str
) -> None:
    batch = _requests(account_id, "a@example.test", 10)
    allowed = await take_cap_slots(pool, batch, 3)
    assert allowed == {r.delivery_id for r in batch[:3]}  # the lowest delivery ids win within a key
    assert await _count(pool, account_id, "a@example.test") == 3
    assert await _slots(pool, account_id) == allowed

    # The same deliveries again (a resend after a crash): the holders keep their slot, nothing is counted twice.
    assert await take_cap_slots(pool, batch, 3) == allowed
    assert await _count(pool, account_id, "a@example.test") == 3
    # Later deliveries find the cap reached.
    assert await take_cap_slots(pool, _requests(account_id, "a@example.test", 2), 3) == set()


async def test_keys_in_one_batch_are_counted_apart(pool: asyncpg.Pool, account_id: str) -> None:
    other_account = f"{account_id}-other"
    a = _requests(account_id, "A@Example.test", 4)  # the address is compared lower-cased
    b = _requests(account_id, "a@example.test", 4)
    c = _requests(account_id, "a@example.test", 4, topic="t.two")
    d = _requests(other_account, "a@example.test", 1)
    allowed = await take_cap_slots(pool, [*d, *c, *b, *a], 5)
    assert allowed == {r.delivery_id for r in [*a, *b[:1], *c, *d]}
    assert await _count(pool, account_id, "a@example.test") == 5
    assert await _count(pool, account_id, "a@example.test", "t.two") == 4
    assert await _count(pool, other_account, "a@example.test") == 1


async def test_a_lowered_cap_grants_nothing_and_keeps_the_count(pool: asyncpg.Pool, account_id: str) -> None:
    assert len(await take_cap_slots(pool, _requests(account_id, "b@example.test", 4), 10)) == 4
    assert await take_cap_slots(pool, _requests(account_id, "b@example.test", 3), 2) == set()
    assert await _count(pool, account_id, "b@example.test") == 4


async def test_racing_batches_share_the_cap_exactly(pool: asyncpg.Pool, account_id: str) -> None:
    cap = 7
    batches = [_requests(account_id, "race@example.test", 5) for _ in range(8)]
    results = await asyncio.gather(*(take_cap_slots(pool, batch, cap) for batch in batches))
    granted = set().union(*results)
    assert len(granted) == cap
    assert await _count(pool, account_id, "race@example.test") == cap
    assert await _slots(pool, account_id) == granted


async def test_an_empty_batch_asks_nothing(pool: asyncpg.Pool) -> None:
    assert await take_cap_slots(pool, [], 5) == set()
