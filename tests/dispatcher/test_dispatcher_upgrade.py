"""Upgrading a database written before fan-out: rows in flight keep their meaning, the new path works."""

from __future__ import annotations

import uuid

import asyncpg
from belfry import migrate

from services.dispatcher import store
from tests.conftest import fresh_database

_BEFORE_FANOUT = "0002_fanout"


async def test_notifications_written_before_fan_out_are_untouched_and_nothing_is_fanned_out_twice(
    admin_dsn: str,
) -> None:
    async with fresh_database(admin_dsn, before=("dispatcher", _BEFORE_FANOUT)) as url:
        conn = await asyncpg.connect(url)
        try:
            # Yesterday's dispatcher wrote a whole notification synchronously: its record, a recipient, a delivery.
            nid = uuid.uuid4()
            await conn.execute(
                """insert into dispatcher.notifications
                       (account_id, notification_id, idempotency_key, body_hash, topic, occurred_at, object)
                   values ('acc', $1, 'k1', '\\x00', 'deals.stage_changed', now(), '{}')""",
                nid,
            )
            await conn.execute(
                """insert into dispatcher.recipients (account_id, notification_id, user_id, state)
                   values ('acc', $1, 'ana', 'accepted')""",
                nid,
            )
            await conn.execute(
                """insert into queue.deliveries (account_id, notification_id, user_id, channel, topic, payload, expires_at)
                   values ('acc', $1, 'ana', 'email', 'deals.stage_changed', '{}', now() + interval '1 hour')""",
                nid,
            )
            applied = await migrate.migrate(conn)
            assert {m.version for m in applied if m.owner == "dispatcher"} >= {_BEFORE_FANOUT}
            # In place: the old rows are as they were, and fan-out has nothing to redo.
            assert await conn.fetchval("select count(*) from dispatcher.fanout") == 0
            assert (
                await conn.fetchval("select event from dispatcher.notifications where notification_id = $1", nid)
                is None
            )
            assert await conn.fetchval("select state from queue.deliveries where notification_id = $1", nid) == "queued"
            # A replay of the old key is still recognised on the new path.
            found = await store.find_keys(conn, [("acc", "k1")])
            assert found[("acc", "k1")][0] == nid
        finally:
            await conn.close()
