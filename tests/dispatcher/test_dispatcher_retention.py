"""Idempotency keys are kept 24 hours, records for the retention period."""

from __future__ import annotations

from services.dispatcher import store
from tests.dispatcher.conftest import Mesh, event, publish, seed


async def test_keys_older_than_a_day_are_forgotten_then_old_records_purged(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    ev = event(account_id, recipient_user_ids=["ana"])
    first = await publish(mesh, ev)
    assert (await publish(mesh, ev)).replayed
    # A day and a minute pass (for this account's rows only).
    await mesh.pool.execute(
        "update dispatcher.notifications set accepted_at = accepted_at - interval '1441 minutes' where account_id = $1",
        account_id,
    )
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
