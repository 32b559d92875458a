"""The unread count kept beside each user's feed (migration 0004) stays equal to counting the feed.

Every path that writes ``gateway.feed`` moves the count: storing items
(``store.add_many``), every mark and its reverse, read-all, an email's open
link, a hand-made insert and a delete (an operator's erasure). Writers that
share users store concurrently without deadlocking, and a database upgraded
with items in the feed starts from their true count.
"""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from belfry import migrate
from belfry.message import Message

from services.gateway import store
from tests.conftest import fresh_database


def _message(account_id: str, user_id: str, *, bell: bool = True) -> Message:
    return Message(
        notification_id=str(uuid.uuid4()),
        account_id=account_id,
        user_id=user_id,
        topic="deals.stage_changed",
        title="Deal moved",
        body="",
        url="https://app.example/d/1",
        occurred_at=datetime.datetime.now(datetime.UTC).isoformat(),
        bell=bell,
    )


async def _counted(pool: asyncpg.Pool, account_id: str, user_id: str) -> int:
    """The count the long way: what the kept count must always equal."""
    value = await pool.fetchval(
        "select count(*) from gateway.unread_items where account_id = $1 and user_id = $2", account_id, user_id
    )
    return int(value)


async def _assert_kept(pool: asyncpg.Pool, account_id: str, user_id: str, expected: int) -> None:
    assert await _counted(pool, account_id, user_id) == expected
    assert await store.unread_count(pool, account_id, user_id) == expected
    assert (await store.position(pool, account_id, user_id)).unread == expected


async def test_every_write_of_the_feed_moves_the_kept_count(pool: asyncpg.Pool) -> None:
    account_id = f"acc_{uuid.uuid4().hex[:8]}"
    await _assert_kept(pool, account_id, "ana", 0)  # no feed yet: zero, not an error

    # Four bell items and one pop-up-only item (not behind the bell, never unread).
    stored = [_message(account_id, "ana") for _ in range(4)] + [_message(account_id, "ana", bell=False)]
    assert await store.add_many(pool, stored) == 5
    await _assert_kept(pool, account_id, "ana", 4)
    assert await store.add_many(pool, stored[:2]) == 0  # redelivered: nothing new, nothing counted twice
    await _assert_kept(pool, account_id, "ana", 4)

    ids = [item.id for item in await store.page(pool, account_id, "ana", before_id=None, limit=10, archived=False)]
    assert len(ids) == 4
    await store.mark(pool, account_id, "ana", ids[:2], "read")
    await _assert_kept(pool, account_id, "ana", 2)
    await store.mark(pool, account_id, "ana", ids[:2], "read")  # already read: no change
    await _assert_kept(pool, account_id, "ana", 2)
    await store.mark(pool, account_id, "ana", ids[:1], "unread")
    await _assert_kept(pool, account_id, "ana", 3)
    await store.mark(pool, account_id, "ana", ids[2:4], "seen")  # seen is not read
    await _assert_kept(pool, account_id, "ana", 3)
    await store.mark(pool, account_id, "ana", ids[2:3], "archive")
    await _assert_kept(pool, account_id, "ana", 2)
    await store.mark(pool, account_id, "ana", ids[1:2], "archive")  # read and archived: was not counted
    await _assert_kept(pool, account_id, "ana", 2)
    await store.mark(pool, account_id, "ana", ids[1:3], "unarchive")  # one read (stays out), one unread (back in)
    await _assert_kept(pool, account_id, "ana", 3)

    assert await store.mark_notification_read(pool, account_id, "ana", stored[3].notification_id) == 1
    await _assert_kept(pool, account_id, "ana", 2)
    await store.mark_all_read(pool, account_id, "ana")
    await _assert_kept(pool, account_id, "ana", 0)
    await store.mark(pool, account_id, "ana", ids[1:2], "archive")
    await store.mark(pool, account_id, "ana", ids, "unread")
    await _assert_kept(pool, account_id, "ana", 3)  # the archived one stays out

    # An operator's erasure of some rows takes their unread share with them.
    await pool.execute(
        "delete from gateway.feed where account_id = $1 and user_id = 'ana' and id = any($2::bigint[])",
        account_id,
        ids[:2],
    )
    await _assert_kept(pool, account_id, "ana", 2)
    # Another user's count never moves with ana's writes.
    await _assert_kept(pool, account_id, "ben", 0)


async def test_writers_sharing_users_store_concurrently_and_the_counts_add_up(pool: asyncpg.Pool) -> None:
    """Claims of two sender processes name the same users in different orders: both commit, nothing is lost.

    Each batch locks its users' counters; taken in key order, two batches with
    users in common queue up instead of deadlocking (PostgreSQL would abort
    one, and the delivery would be retried, after a second's wait).
    """
    account_id = f"acc_{uuid.uuid4().hex[:8]}"
    users = [f"u{i:02d}" for i in range(20)]
    rounds = 15

    async def writer(order: list[str]) -> None:
        for _ in range(rounds):
            await store.add_many(pool, [_message(account_id, u) for u in order])

    deadlocks_before = await _deadlocks(pool)
    await asyncio.gather(writer(users), writer(users[::-1]), writer(users[7:] + users[:7]))
    assert await _deadlocks(pool) == deadlocks_before
    for user in users:
        await _assert_kept(pool, account_id, user, 3 * rounds)
        # The ids handed out are exactly 1..n: the counter and the items agree.
        assert (await store.position(pool, account_id, user)).last_id == 3 * rounds


async def _deadlocks(pool: asyncpg.Pool) -> int:
    value = await pool.fetchval("select deadlocks from pg_stat_database where datname = current_database()")
    return int(value)


async def test_reads_and_stores_racing_on_one_user_keep_the_count_exact(pool: asyncpg.Pool) -> None:
    account_id = f"acc_{uuid.uuid4().hex[:8]}"
    await store.add_many(pool, [_message(account_id, "ana") for _ in range(10)])

    async def reader() -> None:
        for _ in range(20):
            ids = [i.id for i in await store.page(pool, account_id, "ana", before_id=None, limit=50, archived=False)]
            await store.mark(pool, account_id, "ana", ids, "read")
            await store.mark(pool, account_id, "ana", ids[::2], "unread")

    async def storer() -> None:
        for _ in range(20):
            await store.add_many(pool, [_message(account_id, "ana") for _ in range(3)])

    await asyncio.gather(reader(), reader(), storer())
    left = await _counted(pool, account_id, "ana")
    assert left > 0  # the race left some unread, so the check below compares real counts
    await _assert_kept(pool, account_id, "ana", left)


@pytest.fixture
async def before_counter(admin_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A database migrated up to, not including, the kept count."""
    async with fresh_database(admin_dsn, before=("gateway", "0004_unread_counter")) as url:
        conn = await asyncpg.connect(url)
        try:
            yield conn
        finally:
            await conn.close()


async def test_the_upgrade_counts_the_items_already_in_the_feed(before_counter: asyncpg.Connection) -> None:
    conn = before_counter
    # Yesterday's feed: ana has 3 items (one read, one archived), ben 1 pop-up-only item.
    await conn.execute(
        """insert into gateway.feed_seq (account_id, user_id, last_id) values ('acc', 'ana', 3), ('acc', 'ben', 1)"""
    )
    await conn.execute(
        """
        insert into gateway.feed (account_id, user_id, id, notification_id, topic, title, body, url,
                                  in_feed, popup, browser, sound, read_at, archived_at)
        values ('acc', 'ana', 1, gen_random_uuid(), 't', 'x', '', '', true, false, false, '', null, null),
               ('acc', 'ana', 2, gen_random_uuid(), 't', 'x', '', '', true, false, false, '', now(), null),
               ('acc', 'ana', 3, gen_random_uuid(), 't', 'x', '', '', true, false, false, '', null, now()),
               ('acc', 'ben', 1, gen_random_uuid(), 't', 'x', '', '', false, true, false, '', null, null)
        """
    )
    applied = await migrate.migrate(conn, migrate.discover())
    assert [m.version for m in applied] == ["0004_unread_counter"]
    counts = {r["user_id"]: r["unread"] for r in await conn.fetch("select user_id, unread from gateway.unread_counts")}
    assert counts == {"ana": 1, "ben": 0}
    # And from then on the triggers keep it.
    await conn.execute("update gateway.feed set read_at = null where user_id = 'ana' and id = 2")
    assert await conn.fetchval("select unread from gateway.unread_counts where user_id = 'ana'") == 2
