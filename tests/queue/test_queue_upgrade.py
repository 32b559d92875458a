"""Upgrading a queue written before HOT claims (migration 0003): rows in flight keep their meaning.

The migration rewrites ``queue.deliveries`` in place (a stored generated
column, a new fillfactor) and swaps its indexes. A delivery queued, leased,
or dead before the upgrade must be claimed, settled under its old fencing
token, rescued and listed exactly as before.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from belfry import db, migrate
from belfry.queue import Lease, Queue, Sent, ops

from tests.conftest import fresh_database

_HOT_CLAIMS = "0003_hot_claims"


@pytest.fixture
async def old_queue(admin_dsn: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A database migrated up to, not including, the HOT-claims migration; (connection, dsn)."""
    async with fresh_database(admin_dsn, before=("queue", _HOT_CLAIMS)) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            yield conn, dsn
        finally:
            await conn.close()


async def _row(conn: asyncpg.Connection, user: str, state: str, **columns: object) -> int:
    """A delivery as yesterday's senders left it; its id."""
    values: dict[str, object] = {
        "account_id": "acc",
        "notification_id": uuid.uuid4(),
        "user_id": user,
        "channel": "email",
        "topic": "deals.stage_changed",
        "payload": "{}",
        "expires_at": _in(3600),
        "state": state,
        **columns,
    }
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    delivery_id: int = await conn.fetchval(
        f"insert into queue.deliveries ({', '.join(values)}) values ({placeholders}) returning delivery_id",
        *values.values(),
    )
    return delivery_id


def _in(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


async def test_deliveries_in_flight_are_claimed_settled_rescued_and_listed_after_the_upgrade(
    old_queue: tuple[asyncpg.Connection, str],
) -> None:
    conn, dsn = old_queue
    queued = await _row(conn, "ana", "queued")
    # Leased before the upgrade by a sender that is still sending: its token must still settle it.
    held = await _row(
        conn,
        "ben",
        "leased",
        attempts=1,
        lease_token=41,
        lease_expires_at=_in(600),
        leased_by="old-pod",
    )
    # Leased by a sender that died: its lease ran out, rescue must queue it again.
    lost = await _row(
        conn,
        "chloe",
        "leased",
        attempts=1,
        lease_token=42,
        lease_expires_at=_in(-60),
        leased_by="dead-pod",
    )
    dead = await _row(conn, "dan", "dead", attempts=8, finished_at=_in(0))

    applied = await migrate.migrate(conn)
    assert next(m.version for m in applied if m.owner == "queue") == _HOT_CLAIMS

    pool = await db.create_pool(dsn, application_name="test-upgrade", min_size=1, max_size=2)
    try:
        queue = Queue(pool, "email", worker="new-pod")
        # The old sender settles its lease with the token it was given before the upgrade.
        old_lease = Lease(
            held, "acc", uuid.uuid4(), "ben", "email", "deals.stage_changed", {}, 1, 8, 41, dt.datetime.now(dt.UTC)
        )
        assert await queue.settle([(old_lease, Sent())]) == 1
        assert await conn.fetchval("select state from queue.deliveries where delivery_id = $1", held) == "sent"
        # The expired lease goes back to the queue; then both queued rows are claimed, and only they.
        assert await queue.rescue() == 1
        claimed = await queue.claim(10)
        assert sorted(lease.delivery_id for lease in claimed) == sorted([queued, lost])
        assert await queue.settle([(lease, Sent()) for lease in claimed]) == 2
        assert await queue.claim(10) == []
        # Yesterday's dead letter is listed (now found through the generated `dead` column).
        letters = await ops.list_dead(pool, "acc")
        assert [letter.delivery_id for letter in letters] == [dead]
    finally:
        await pool.close()
