"""Idempotency keys are kept 24 hours, records for the retention period."""

from __future__ import annotations

from services.dispatcher import store
from tests.dispatcher.conftest import Mesh, event, publish, seed

_AGE_A_DAY = (
    "update dispatcher.notifications set accepted_at = accepted_at - interval '1441 minutes' where account_id = $1"
)


async def test_keys_older_than_a_day_are_forgotten_then_old_records_purged(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    ev = event(account_id, recipient_user_ids=["ana"])
    first = await publish(mesh, ev)
    assert (await publish(mesh, ev)).replayed
    # A day and a minute pass (for this account's rows only).
    await mesh.pool.execute(_AGE_A_DAY, account_id)
    keys, _ = await store.purge(mesh.pool, key_hours=24, retention_days=30)
    assert keys >= 1
    again = await publish(mesh, ev)
    assert not again.replayed and again.notification_id != first.notification_id
    # Past the retention period the notification and its decisions go.
    await mesh.pool.execute(
        "update dispatcher.notifications set accepted_at = accepted_at - interval '31 days'"
        " where account_id = $1 and notification_id = $2::uuid",
        account_id,
        first.notification_id,
    )
    _, old = await store.purge(mesh.pool, key_hours=24, retention_days=30)
    assert old >= 1
    left = await mesh.pool.fetch(
        "select notification_id::text as id from dispatcher.recipients where account_id = $1", account_id
    )
    assert [r["id"] for r in left] == [again.notification_id]


async def test_a_key_is_free_once_its_day_is_over_even_before_the_purge(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    ev = event(account_id, recipient_user_ids=["ana"])
    first = await publish(mesh, ev)
    await mesh.pool.execute(_AGE_A_DAY, account_id)
    # No purge has run: the key is still on the first notification, past its day.
    assert (
        await mesh.pool.fetchval(
            "select idempotency_key from dispatcher.notifications where account_id = $1", account_id
        )
        == ev.idempotency_key
    )
    again = await publish(mesh, ev)
    assert not again.replayed and again.notification_id != first.notification_id
    # The new notification holds the key now: a retry within its day is a replay of it.
    replay = await publish(mesh, ev)
    assert replay.replayed and replay.notification_id == again.notification_id


async def test_the_purge_keeps_going_until_nothing_is_left(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    events = [event(account_id, recipient_user_ids=["ana"]) for _ in range(7)]
    for ev in events:
        await publish(mesh, ev)
    await mesh.pool.execute(_AGE_A_DAY, account_id)
    # Batches of 2: one run goes through four of them (2, 2, 2, 1) instead of stopping after the first.
    keys, _ = await store.purge(mesh.pool, key_hours=24, retention_days=30, batch=2)
    assert keys >= len(events)
    held = await mesh.pool.fetchval(
        "select count(*) from dispatcher.notifications where account_id = $1 and idempotency_key is not null",
        account_id,
    )
    assert held == 0
    await mesh.pool.execute(
        "update dispatcher.notifications set accepted_at = accepted_at - interval '31 days' where account_id = $1",
        account_id,
    )
    _, old = await store.purge(mesh.pool, key_hours=24, retention_days=30, batch=2)
    assert old >= len(events)
    assert not await mesh.pool.fetchval("select count(*) from dispatcher.recipients where account_id = $1", account_id)
