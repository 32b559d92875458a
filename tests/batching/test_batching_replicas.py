"""Several replicas, redeliveries and a queue outage: nothing sent twice, nothing lost."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import uuid

import pytest
from belfry.api.batching.v1 import batching_pb2
from belfry.message import Message
from belfry.queue import Lease, Queue, Sent

from services.batching import store
from services.batching.clock import ManualClock
from services.batching.intake import Intake
from services.batching.windows import WINDOWS_CLOSED
from tests.batching.conftest import World


def _sent_count() -> float:
    return float(WINDOWS_CLOSED.labels("sent")._value.get())


async def test_two_replicas_close_every_window_once(world: World, tenant: str) -> None:
    users = [f"u{n:02d}" for n in range(12)]
    for user in users:
        await world.prefs.user(tenant, user)
    await world.start_replica(BELFRY_WORKER_ID="replica-1")
    await world.start_replica(BELFRY_WORKER_ID="replica-2")
    before = _sent_count()
    for user in users:
        for n in range(3):
            await world.handoff(tenant, user, world.assignment(tenant, user, f"{user}-{n}"))
    await world.until(lambda: world.handled(tenant), "handoffs applied")
    world.clock.advance(301)
    await world.until(lambda: world.windows_settled(tenant), "windows closed")

    rows = await world.deliveries(tenant)
    assert sorted((r["user_id"], r["channel"]) for r in rows) == sorted(
        (u, c) for u in users for c in ("bell", "email")
    )
    assert all(len(Message.from_json(r["payload"]).items) == 3 for r in rows)
    windows = await world.pool.fetch("select state, closed_by from batching.windows where account_id = $1", tenant)
    assert [w["state"] for w in windows] == ["sent"] * len(users)
    assert all(w["closed_by"] for w in windows)
    # Each window was closed by exactly one replica: the counter moved once per window.
    assert _sent_count() - before == len(users)


async def test_a_redelivered_handoff_is_applied_once(world: World, tenant: str) -> None:
    # No replica runs: this test plays the queue's redelivery after a crash before settle.
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "1"))
    queue = Queue(world.pool, "batching", worker="crashing", lease_seconds=0.05)
    intake = Intake(world.pool, ManualClock(world.clock.now()), window=dt.timedelta(seconds=300))
    leases = [lease for lease in await queue.claim(100) if lease.account_id == tenant]
    assert len(leases) == 1
    assert await intake.handle(leases[0]) == Sent()
    # The process dies before settling; the lease runs out and the queue hands the delivery out again.
    await asyncio.sleep(0.1)
    await queue.rescue()
    again = [lease for lease in await queue.claim(100) if lease.account_id == tenant]
    assert [lease.delivery_id for lease in again] == [leases[0].delivery_id]
    assert again[0].token != leases[0].token
    assert await intake.handle(again[0]) == Sent()
    await queue.settle([(again[0], Sent())])
    items = await world.pool.fetchval("select count(*) from batching.window_items where account_id = $1", tenant)
    assert items == 1


async def test_a_window_that_closes_while_the_queue_refuses_is_retried_not_lost(world: World, tenant: str) -> None:
    running = await world.start_replica()
    stub = world.stub(running)
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "1"))
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "2"))
    await world.until(lambda: world.handled(tenant), "handoffs applied")
    # The queue refuses this account's sender deliveries (a fault injected in the real table).
    await world.pool.execute(
        f"""
        create function public.refuse_{tenant}() returns trigger language plpgsql as $$
        begin raise exception 'queue unavailable (injected)'; end $$;
        create trigger refuse_{tenant} before insert on queue.deliveries for each row
        when (new.account_id = '{tenant}' and new.channel <> 'batching')
        execute function public.refuse_{tenant}();
        """
    )
    try:
        world.clock.advance(301)

        async def failed() -> bool:
            error = await world.pool.fetchval(
                "select last_error from batching.windows where account_id = $1 and state = 'open'", tenant
            )
            return error is not None and "queue unavailable" in error

        await world.until(failed, "the close to fail")
        status = await stub.GetStatus(batching_pb2.GetStatusRequest(account_id=tenant))
        assert status.open_windows == 1
        assert status.windows_retrying == 1
        assert await world.deliveries(tenant) == []
    finally:
        await world.pool.execute(
            f"drop trigger refuse_{tenant} on queue.deliveries; drop function public.refuse_{tenant}();"
        )
    world.clock.advance(600)  # past the retry backoff
    await world.until(lambda: world.windows_settled(tenant), "the retried close")
    rows = await world.deliveries(tenant)
    assert sorted(r["channel"] for r in rows) == ["bell", "email"]
    assert [i.id for i in Message.from_json(rows[0]["payload"]).items] == ["1", "2"]


async def test_a_window_that_cannot_be_merged_does_not_hold_up_the_others(world: World, tenant: str) -> None:
    await world.start_replica()
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "1"))
    await world.handoff(tenant, "bob", world.assignment(tenant, "bob", "2"))
    await world.until(lambda: world.handled(tenant), "handoffs applied")
    # Damage ana's stored item the way a bad release of the message format would.
    await world.pool.execute(
        "update batching.window_items set message = '{\"title\": 1}'::jsonb where account_id = $1 and object_id = '1'",
        tenant,
    )
    world.clock.advance(301)

    async def bob_sent_and_ana_retrying() -> bool:
        rows = await world.pool.fetch(
            "select user_id, state, last_error from batching.windows where account_id = $1", tenant
        )
        by_user = {r["user_id"]: r for r in rows}
        ana_error = by_user["ana"]["last_error"] or ""
        return by_user["bob"]["state"] == "sent" and by_user["ana"]["state"] == "open" and "merge failed" in ana_error

    await world.until(bob_sent_and_ana_retrying, "bob's window sent while ana's is retried")
    assert {r["user_id"] for r in await world.deliveries(tenant)} == {"bob"}


async def test_windows_wait_for_preferences_when_it_is_unreachable(world: World, tenant: str) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    running = await world.start_replica(BELFRY_PREFERENCES_ADDRESS=dead)
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "1"))
    await world.until(lambda: world.handled(tenant), "handoff applied")
    world.clock.advance(301)

    stub = world.stub(running)

    async def retrying() -> bool:
        status = await stub.GetStatus(batching_pb2.GetStatusRequest(account_id=tenant))
        return bool(status.windows_retrying == 1 and status.HasField("oldest_due_window"))

    await world.until(retrying, "the window to be retried")
    error = await world.pool.fetchval("select last_error from batching.windows where account_id = $1", tenant)
    assert "preferences did not answer" in error
    assert await world.deliveries(tenant) == []


async def _claim(queue: Queue, account_id: str) -> list[Lease]:
    return [lease for lease in await queue.claim(100) if lease.account_id == account_id]


@pytest.mark.parametrize("close", ["commits", "rolls_back"])
async def test_a_reassignment_racing_a_close_is_withdrawn_only_if_the_close_did_not_send(
    world: World, tenant: str, close: str
) -> None:
    # No replica runs: the test is one closer and one intake, through the service's own code,
    # with the reassignment arriving while the closer holds Ana's window.
    queue = Queue(world.pool, "batching", worker="racing", lease_seconds=60)
    intake = Intake(world.pool, ManualClock(world.clock.now()), window=dt.timedelta(seconds=300))
    taken = world.assignment(tenant, "ana", "X")
    await world.handoff(tenant, "ana", taken)
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "Y"))
    leases = await _claim(queue, tenant)
    for lease in leases:
        assert await intake.handle(lease) == Sent()
    await queue.settle([(lease, Sent()) for lease in leases])
    due = await store.claim_due(
        world.pool,
        world.clock.now() + dt.timedelta(seconds=301),
        lease=dt.timedelta(seconds=60),
        worker="c",
        limit=1000,
    )
    [window] = [w for w in due if w.account_id == tenant]

    async with world.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        assert len(await store.lock_for_close(conn, window) or []) == 2
        world.clock.advance(1)
        await world.handoff(tenant, "bob", world.assignment(tenant, "bob", "X"))
        [moved] = await _claim(queue, tenant)
        reassignment = asyncio.create_task(intake.handle(moved))

        async def waiting_for_the_close() -> bool:
            waiting = await world.pool.fetchval(
                "select count(*) from pg_stat_activity where datname = current_database()"
                " and wait_event_type = 'Lock' and query like '%withdrawn%'"
            )
            return bool(waiting)

        await world.until(waiting_for_the_close, "the reassignment to wait for the closer's lock")
        if close == "commits":
            sent = store.Sent(notification_id=uuid.uuid4(), count=2)
            await store.finish(conn, window, state="sent", now=world.clock.now(), worker="c", sent=sent)
            await tx.commit()
        else:
            await tx.rollback()
        assert await reassignment == Sent()

    outcome = await world.pool.fetchval(
        "select outcome from batching.assignment_outcomes where account_id = $1 and notification_id = $2",
        tenant,
        uuid.UUID(taken.message.notification_id),
    )
    assert outcome == ("merged" if close == "commits" else "withdrawn")
