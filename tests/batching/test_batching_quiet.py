"""Quiet hours on what batching enqueues: held until they end, bell at once and silent, locked bypass."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import cast
from zoneinfo import ZoneInfo

import asyncpg
from belfry.api.batching.v1 import batching_pb2
from belfry.message import Message
from belfry.preferences import ChannelChoice, Recipient
from belfry.queue import Lease, Queue, enqueue

from services.batching import quiet
from tests.batching.conftest import World


def _next_evening() -> dt.datetime:
    """22:30 UTC (23:30 in Paris) on the day after today: inside 22:00-07:00 Paris quiet hours, in the future."""
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    return dt.datetime.combine(tomorrow, dt.time(22, 30), tzinfo=dt.UTC)


async def test_a_merged_notification_in_quiet_hours_is_held_except_the_silent_bell(world: World, tenant: str) -> None:
    evening = _next_evening()
    world.clock.set(evening)
    running = await world.start_replica()
    await world.prefs.quiet_hours(tenant, "ana", "22:00", "07:00")
    for n in ("1", "2"):
        item = world.assignment(tenant, "ana", n, channels=("email", "bell", "mobile"), ttl=dt.timedelta(days=4))
        await world.handoff(tenant, "ana", item)
    await world.until(lambda: world.handled(tenant), "handoffs applied")
    world.clock.advance(301)
    await world.until(lambda: world.windows_settled(tenant), "window closed")

    rows = {r["channel"]: r for r in await world.deliveries(tenant)}
    assert set(rows) == {"email", "bell", "mobile"}
    quiet_end = rows["email"]["available_at"]
    assert quiet_end == rows["mobile"]["available_at"]
    paris = ZoneInfo("Europe/Paris")
    local_morning = dt.datetime.combine(evening.astimezone(paris).date() + dt.timedelta(days=1), dt.time(7), paris)
    assert quiet_end == local_morning  # 07:00 in Paris the next morning
    assert rows["bell"]["available_at"] < quiet_end  # the bell is not held
    bell = Message.from_json(rows["bell"]["payload"])
    assert (bell.bell, bell.popup, bell.sound, bell.browser) == (True, False, "", False)
    assert Message.from_json(rows["email"]["payload"]).items[1].id == "2"
    status = await world.stub(running).GetStatus(batching_pb2.GetStatusRequest(account_id=tenant))
    assert status.held_deliveries == 2


async def test_outside_quiet_hours_nothing_is_held(world: World, tenant: str) -> None:
    world.clock.set(_next_evening() + dt.timedelta(hours=9))  # 08:30 in Paris (07:30 in summer)
    await world.start_replica()
    await world.prefs.quiet_hours(tenant, "ana", "22:00", "07:00")
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "1"))
    await world.until(lambda: world.handled(tenant), "handoff applied")
    world.clock.advance(301)
    await world.until(lambda: world.windows_settled(tenant), "window closed")
    rows = await world.deliveries(tenant)
    now = await world.pool.fetchval("select now()")
    assert all(r["available_at"] <= now for r in rows)
    bell = Message.from_json(next(r["payload"] for r in rows if r["channel"] == "bell"))
    assert bell.popup
    assert bell.sound  # the user's pop-up sound, as preferences chose it
    assert bell.browser


def test_locked_topics_bypass_quiet_hours() -> None:
    message = Message(
        notification_id=str(uuid.uuid4()),
        account_id="a",
        user_id="u",
        topic="account.billing",
        title="Invoice",
        body="",
        url="",
        occurred_at="2027-01-01T00:00:00+00:00",
        sound="chime",
    )
    until = dt.datetime(2027, 1, 1, 6, tzinfo=dt.UTC)
    recipient = Recipient(
        "u",
        known=True,
        in_quiet_hours=True,
        quiet_until=until,
        channels=(
            ChannelChoice("email", True),
            ChannelChoice("bell", True),
            ChannelChoice("popup", True, sound="chime"),
        ),
    )
    expires = until + dt.timedelta(days=1)
    held = quiet.deliveries(message, ["email", "bell"], recipient=recipient, locked=False, expires_at=expires)
    assert [d.available_at for d in held] == [until, None]
    assert held[1].payload["sound"] == ""
    bypass = quiet.deliveries(message, ["email", "bell"], recipient=recipient, locked=True, expires_at=expires)
    assert [d.available_at for d in bypass] == [None, None]
    assert bypass[1].payload["sound"] == "chime"


async def test_a_held_delivery_is_claimable_only_once_its_quiet_hours_end(world: World, tenant: str) -> None:
    db_now = await world.pool.fetchval("select now()")
    until = db_now + dt.timedelta(seconds=0.5)
    message = Message(
        notification_id=str(uuid.uuid4()),
        account_id=tenant,
        user_id="ana",
        topic="deals.deal_assigned",
        title="Deal 1 was assigned to you",
        body="",
        url="",
        occurred_at=db_now.isoformat(),
    )
    recipient = Recipient("ana", known=True, in_quiet_hours=True, quiet_until=until)
    held = quiet.deliveries(
        message, ["other_apps"], recipient=recipient, locked=False, expires_at=db_now + dt.timedelta(hours=1)
    )
    async with world.pool.acquire() as conn:
        await enqueue(cast(asyncpg.Connection, conn), held)
    queue = Queue(world.pool, "other_apps", worker="release-test")

    async def mine() -> list[Lease]:
        return [lease for lease in await queue.claim(1000) if lease.account_id == tenant]

    assert await mine() == []
    claimed = await world.until(mine, "the delivery to be released")
    assert await world.pool.fetchval("select now()") >= until
    assert len(claimed) == 1
