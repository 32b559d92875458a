"""Assignment windows through the real services: merge, undo, self-assignment, empty and late windows."""

from __future__ import annotations

import datetime as dt
import uuid

from belfry.message import Message

from tests.batching.conftest import World


async def _closed(world: World, account_id: str) -> bool:
    return await world.handled(account_id) and await world.windows_settled(account_id)


async def test_three_assignments_in_the_window_become_one_notification_per_channel(world: World, tenant: str) -> None:
    await world.start_replica()
    for n in ("1", "2", "3"):
        await world.handoff(tenant, "ana", world.assignment(tenant, "ana", n))
        world.clock.advance(60)
    await world.until(lambda: world.handled(tenant), "handoffs applied")
    assert await world.deliveries(tenant) == []  # held for the window

    world.clock.advance(300)
    await world.until(lambda: _closed(world, tenant), "window closed")
    rows = await world.deliveries(tenant)
    assert sorted(r["channel"] for r in rows) == ["bell", "email"]
    assert len({r["notification_id"] for r in rows}) == 1
    message = Message.from_json(rows[0]["payload"])
    assert message.title == "3 contacts were assigned to you"
    assert [i.id for i in message.items] == ["1", "2", "3"]
    assert message.body == "Contact 1, Contact 2 and Contact 3"
    assert message.url == "https://app.example.test/contacts/"
    assert message.user_id == "ana"
    assert message.recipient_email == "ana@example.test"


async def test_the_window_is_per_user_and_object_type_and_french_titles(world: World, tenant: str) -> None:
    await world.start_replica()
    await world.prefs.user(tenant, "bob", locale="fr")
    for n in ("1", "2"):
        await world.handoff(tenant, "bob", world.assignment(tenant, "bob", n, object_type="company", locale="fr"))
    await world.handoff(tenant, "bob", world.assignment(tenant, "bob", "9", object_type="deal", locale="fr"))
    await world.handoff(tenant, "cy", world.assignment(tenant, "cy", "5"))
    await world.until(lambda: world.handled(tenant), "handoffs applied")
    world.clock.advance(301)
    await world.until(lambda: _closed(world, tenant), "windows closed")
    emails = {
        (r["user_id"], r["topic"]): Message.from_json(r["payload"])
        for r in await world.deliveries(tenant, channel="email")
    }
    assert emails[("bob", "contacts.company_assigned")].title == "2 entreprises vous ont été attribuées"
    assert emails[("bob", "contacts.company_assigned")].body == "Company 1 et Company 2"
    # A window holding one assignment sends that assignment's own notification.
    assert emails[("bob", "deals.deal_assigned")].title == "Deal 9 was assigned to you"
    assert emails[("cy", "contacts.contact_assigned")].title == "Contact 5 was assigned to you"
    assert len(emails) == 3


async def test_reassignment_inside_the_window_takes_the_object_out_of_the_first_users_merge(
    world: World, tenant: str
) -> None:
    await world.start_replica()
    for n in ("1", "2", "3"):
        await world.handoff(tenant, "ana", world.assignment(tenant, "ana", n))
    await world.until(lambda: world.handled(tenant), "first assignments applied")
    world.clock.advance(30)
    await world.handoff(tenant, "bob", world.assignment(tenant, "bob", "2"))
    await world.until(lambda: world.handled(tenant), "reassignment applied")
    world.clock.advance(300)
    await world.until(lambda: _closed(world, tenant), "windows closed")
    by_user = {r["user_id"]: Message.from_json(r["payload"]) for r in await world.deliveries(tenant, channel="email")}
    assert [i.id for i in by_user["ana"].items] == ["1", "3"]
    assert by_user["ana"].title == "2 contacts were assigned to you"
    assert by_user["bob"].items[0].id == "2"


async def test_an_older_assignment_arriving_late_does_not_undo_a_newer_one(world: World, tenant: str) -> None:
    await world.start_replica()
    newer = world.assignment(tenant, "bob", "7")
    older = world.assignment(tenant, "ana", "7", at=world.clock.now() - dt.timedelta(minutes=1))
    await world.handoff(tenant, "bob", newer)
    await world.until(lambda: world.handled(tenant), "newer applied")
    await world.handoff(tenant, "ana", older)
    await world.until(lambda: world.handled(tenant), "older applied")
    dropped = await world.pool.fetchval(
        "select count(*) from queue.deliveries where account_id = $1 and channel = 'batching' and state = 'dropped'",
        tenant,
    )
    assert dropped == 1
    world.clock.advance(301)
    await world.until(lambda: _closed(world, tenant), "windows closed")
    assert {r["user_id"] for r in await world.deliveries(tenant)} == {"bob"}


async def test_self_assignment_never_notifies_and_undoes_the_previous_assignee(world: World, tenant: str) -> None:
    await world.start_replica()
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "1"))
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "2"))
    await world.until(lambda: world.handled(tenant), "assignments applied")
    world.clock.advance(10)
    # Bob takes contact 2 for himself.
    await world.handoff(tenant, "bob", world.assignment(tenant, "bob", "2", actor="bob"))
    await world.until(lambda: world.handled(tenant), "self-assignment applied")
    world.clock.advance(300)
    await world.until(lambda: _closed(world, tenant), "windows closed")
    rows = await world.deliveries(tenant, channel="email")
    assert [r["user_id"] for r in rows] == ["ana"]
    assert [i.id for i in Message.from_json(rows[0]["payload"]).items] == ["1"]


async def test_a_window_left_empty_sends_nothing(world: World, tenant: str) -> None:
    await world.start_replica()
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "1"))
    await world.until(lambda: world.handled(tenant), "assignment applied")
    world.clock.advance(5)
    await world.handoff(tenant, "bob", world.assignment(tenant, "bob", "1", actor="bob"))
    await world.until(lambda: world.handled(tenant), "undo applied")
    world.clock.advance(300)
    await world.until(lambda: _closed(world, tenant), "window closed")
    assert await world.deliveries(tenant) == []
    states = await world.pool.fetch("select user_id, state from batching.windows where account_id = $1", tenant)
    assert [(r["user_id"], r["state"]) for r in states] == [("ana", "empty")]


async def test_an_assignment_after_the_window_closed_opens_a_new_window(world: World, tenant: str) -> None:
    await world.start_replica()
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "1"))
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "2"))
    await world.until(lambda: world.handled(tenant), "first assignments applied")
    world.clock.advance(301)
    await world.until(lambda: _closed(world, tenant), "first window closed")
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "3"))
    await world.until(lambda: world.handled(tenant), "late assignment applied")
    assert len(await world.deliveries(tenant, channel="email")) == 1  # the new window waits its five minutes
    world.clock.advance(301)
    await world.until(lambda: _closed(world, tenant), "second window closed")
    emails = [Message.from_json(r["payload"]) for r in await world.deliveries(tenant, channel="email")]
    assert [[i.id for i in m.items] for m in emails] == [["1", "2"], ["3"]]


async def test_what_became_of_each_assignment_is_kept_for_the_status_api(world: World, tenant: str) -> None:
    await world.start_replica()
    first = world.assignment(tenant, "ana", "1")
    await world.handoff(tenant, "ana", first)
    await world.until(lambda: world.handled(tenant), "first assignment applied")
    later = []
    for n in ("1", "2", "3"):  # contact 1 again: the newer assignment carries it
        world.clock.advance(1)
        later.append(world.assignment(tenant, "ana", n))
        await world.handoff(tenant, "ana", later[-1])
    await world.until(lambda: world.handled(tenant), "assignments applied")
    await world.handoff(tenant, "bob", world.assignment(tenant, "bob", "3"))  # contact 3 taken back
    await world.until(lambda: world.handled(tenant), "reassignment applied")
    again, other, gone = (uuid.UUID(a.message.notification_id) for a in later)
    source = uuid.UUID(first.message.notification_id)

    held = await world.pool.fetch(
        "select outcome, at from batching.assignment_outcomes where account_id = $1 and user_id = 'ana'"
        " and outcome = 'held'",
        tenant,
    )
    assert len(held) == 3
    assert {r["at"] for r in held} == {world.clock.now() - dt.timedelta(seconds=3) + dt.timedelta(seconds=300)}

    world.clock.advance(300)
    await world.until(lambda: _closed(world, tenant), "windows closed")
    [merged] = {r["notification_id"] for r in await world.deliveries(tenant) if r["user_id"] == "ana"}
    outcomes = {
        r["notification_id"]: (r["outcome"], r["merged_into"], r["reason"])
        for r in await world.pool.fetch(
            "select * from batching.assignment_outcomes where account_id = $1 and user_id = 'ana'", tenant
        )
    }
    assert outcomes == {
        source: ("merged", merged, ""),
        again: ("merged", merged, ""),
        other: ("merged", merged, ""),
        gone: ("withdrawn", None, "withdrawn by reassignment"),
    }
    record = await world.pool.fetchrow(
        "select * from batching.merged_notifications where account_id = $1 and notification_id = $2", tenant, merged
    )
    assert record is not None
    assert (record["user_id"], record["title"]) == ("ana", "2 contacts were assigned to you")
    assert record["source_ids"] == [source, again, other]
    assert {"c": "email", "s": "accepted", "r": ""} in record["channels"]
    [email] = [r for r in await world.deliveries(tenant, channel="email") if r["user_id"] == "ana"]
    assert [i.id for i in Message.from_json(email["payload"]).items] == ["1", "2"]
