"""The message stored once per notification and recipient (migration 0006), shared by its channels' deliveries."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from belfry import delivery
from belfry.message import Message
from belfry.queue import NewDelivery, Queue, Sent, ops

from tests.queue.queue_helpers import put


def _message(account_id: str, user_id: str) -> Message:
    return Message(
        account_id=account_id,
        notification_id=str(uuid.uuid4()),
        user_id=user_id,
        topic="contacts.contact_assigned",
        title="Contact assigned: Ada",
        body="Ada Lovelace, by Chloé",
        url="https://app.example.test/contacts/1",
        occurred_at=datetime.now(UTC).isoformat(),
        recipient_email=f"{user_id}@example.test",
    )


def _deliveries(message: Message, channels: tuple[str, ...]) -> list[NewDelivery]:
    return delivery.build(
        message,
        channels,
        on={"bell", "popup", "email"},
        sound="chime",
        held_until=None,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )


def _as_stored(payload: dict[str, Any]) -> Any:
    return json.loads(json.dumps(payload))  # JSON has lists where the message has tuples


async def _messages(pool: asyncpg.Pool, account_id: str) -> int:
    return int(await pool.fetchval("select count(*) from queue.messages where account_id = $1", account_id))


async def test_each_channel_gets_the_whole_message_with_its_own_fields_from_one_stored_copy(
    pool: asyncpg.Pool, account_id: str
) -> None:
    message = _message(account_id, "u1")
    built = _deliveries(message, ("email", "bell"))
    await put(pool, built)
    assert await _messages(pool, account_id) == 1
    # The rows hold only their own fields; the message is not repeated in them.
    own = await pool.fetch("select channel, payload from queue.deliveries where account_id = $1", account_id)
    assert all("title" not in r["payload"] for r in own)
    leases = {}
    for channel in ("email", "bell"):
        [lease] = [x for x in await Queue(pool, channel, worker="w").claim(1000) if x.account_id == account_id]
        leases[channel] = lease
    # What a sender gets is what the dispatcher built: the message, then the delivery's own fields.
    assert leases["email"].payload == _as_stored(next(d.body for d in built if d.channel == "email"))
    assert leases["bell"].payload == _as_stored(next(d.body for d in built if d.channel == "bell"))
    assert Message.from_json(leases["email"].payload).title == message.title
    assert leases["bell"].payload["popup"] is True and leases["email"].payload["popup"] is False
    # The view people and tools read shows the same payloads.
    whole = {
        r["channel"]: r["payload"]
        for r in await pool.fetch(
            "select channel, payload from queue.whole_deliveries where account_id = $1", account_id
        )
    }
    assert whole == {c: lease.payload for c, lease in leases.items()}


async def test_a_delivery_enqueued_whole_is_claimed_as_it_was_written(pool: asyncpg.Pool, account_id: str) -> None:
    # Rows written before migration 0006 (and handoffs, notices) carry their whole payload and no message row.
    [email] = _deliveries(_message(account_id, "u1"), ("email",))
    whole = replace(email, payload=email.body, message=None)
    await put(pool, [whole])
    assert await _messages(pool, account_id) == 0
    [lease] = [x for x in await Queue(pool, "email", worker="w").claim(1000) if x.account_id == account_id]
    assert lease.payload == _as_stored(email.body)


async def test_retention_removes_a_message_with_its_last_delivery_only(pool: asyncpg.Pool, account_id: str) -> None:
    message = _message(account_id, "u1")
    await put(pool, _deliveries(message, ("email", "bell")))
    email_queue = Queue(pool, "email", worker="w")
    [email] = [x for x in await email_queue.claim(1000) if x.account_id == account_id]
    await email_queue.settle([(email, Sent())])
    age = (
        "update queue.deliveries set finished_at = now() - interval '2 hours'"
        " where account_id = $1 and finished_at is not null"
    )
    await pool.execute(age, account_id)
    # The email is purged; the bell delivery, still queued, keeps the message its sender will need.
    assert await ops.purge(pool, older_than_seconds=3600) >= 1
    assert await _messages(pool, account_id) == 1
    bell_queue = Queue(pool, "bell", worker="w")
    [bell] = [x for x in await bell_queue.claim(1000) if x.account_id == account_id]
    assert bell.payload["title"] == message.title
    await bell_queue.settle([(bell, Sent())])
    await pool.execute(age, account_id)
    assert await ops.purge(pool, older_than_seconds=3600) >= 1
    assert await _messages(pool, account_id) == 0
    assert await pool.fetchval("select count(*) from queue.deliveries where account_id = $1", account_id) == 0


async def test_two_purges_of_a_messages_last_deliveries_at_once_leave_no_orphan(
    pool: asyncpg.Pool, account_id: str
) -> None:
    # Two replicas each delete one of the message's two deliveries; each checks for the other while the
    # other's delete is not committed. The message's lock makes the second check wait for the first commit.
    message = _message(account_id, "u1")
    await put(pool, _deliveries(message, ("email", "bell")))
    key = {(account_id, uuid.UUID(message.notification_id), "u1")}
    ids = [r["delivery_id"] for r in await pool.fetch(_IDS, account_id)]
    first, second = await pool.acquire(), await pool.acquire()
    try:
        t1, t2 = first.transaction(), second.transaction()
        await t1.start()
        await t2.start()
        await first.execute(_DELETE, account_id, ids[0])
        await second.execute(_DELETE, account_id, ids[1])
        await ops.free_messages(first, key)  # the other delivery still shows: the message stays
        freeing = asyncio.create_task(ops.free_messages(second, key))  # waits for the first's lock
        await asyncio.sleep(0.2)
        assert not freeing.done()
        await t1.commit()
        await freeing
        await t2.commit()
    finally:
        await pool.release(first)
        await pool.release(second)
    assert await _messages(pool, account_id) == 0


_IDS = "select delivery_id from queue.deliveries where account_id = $1 order by delivery_id"
_DELETE = "delete from queue.deliveries where account_id = $1 and delivery_id = $2"
