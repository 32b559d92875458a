"""Each recipient rule through the real gRPC API, on real PostgreSQL, with real preferences."""

from __future__ import annotations

import datetime as dt

from belfry.api.directory.v1 import directory_pb2
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.preferences.v1 import preferences_pb2
from belfry.auth import TokenIssuer
from belfry.handoff import Assignment, DigestFact, from_payload

from tests.dispatcher.conftest import PINNED_NOW, Mesh, deliveries, event, publish, seed


async def recipients(mesh: Mesh, account_id: str, notification_id: str) -> dict[str, tuple[str, str]]:
    answer = await mesh.dispatcher.GetNotification(
        pb.GetNotificationRequest(account_id=account_id, notification_id=notification_id)
    )
    return {r.user_id: (pb.State.Name(r.state), r.reason) for r in answer.notification.recipients}


async def told(mesh: Mesh, account_id: str, notification_id: str) -> set[str]:
    return {r["user_id"] for r in await deliveries(mesh.pool, account_id, notification_id)}


async def test_owner_and_custom_property_users_are_told(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    ev = event(account_id, owner_user_ids=["ana"], custom_property_user_ids=["chloe"])
    answer = await publish(mesh, ev)
    assert await told(mesh, account_id, answer.notification_id) == {"ana", "chloe"}


async def test_self_action_is_recorded_not_sent(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    answer = await publish(mesh, event(account_id, recipient_user_ids=["dan", "ana"]))  # dan is the actor
    assert await told(mesh, account_id, answer.notification_id) == {"ana"}
    assert (await recipients(mesh, account_id, answer.notification_id))["dan"] == ("STATE_SUPPRESSED", "self_action")


async def test_api_created_task_never_notifies_but_feeds_the_digest(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    ev = event(
        account_id, topic="tasks.task_due", recipient_user_ids=["ana"], actor=pb.Actor(source=pb.ACTOR_SOURCE_API)
    )
    answer = await publish(mesh, ev)
    assert (await recipients(mesh, account_id, answer.notification_id))["ana"] == ("STATE_SUPPRESSED", "api_created")
    rows = await mesh.pool.fetch(
        "select payload from queue.whole_deliveries where account_id = $1 and channel = 'batching'", account_id
    )
    facts = [from_payload(r["payload"]) for r in rows]
    assert len(facts) == 1 and isinstance(facts[0], DigestFact)
    assert facts[0].user_id == "ana" and facts[0].topic == "tasks.task_due"


async def test_only_the_first_mention_in_an_activity_notifies(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    first = await publish(
        mesh, event(account_id, topic="contacts.mentioned", mentioned_user_ids=["ana"], activity_id="note-7")
    )
    second = await publish(
        mesh, event(account_id, topic="contacts.mentioned", mentioned_user_ids=["ana", "chloe"], activity_id="note-7")
    )
    assert await told(mesh, account_id, first.notification_id) == {"ana"}
    assert await told(mesh, account_id, second.notification_id) == {"chloe"}
    assert (await recipients(mesh, account_id, second.notification_id))["ana"] == (
        "STATE_SUPPRESSED",
        "not_first_mention",
    )


async def test_quotes_tell_the_owner_only(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    ev = event(
        account_id,
        topic="quotes.paid",
        recipient_user_ids=["ana"],
        object=pb.ObjectRef(type="quote", id="Q-7", owner_user_id="chloe"),
    )
    answer = await publish(mesh, ev)
    assert await told(mesh, account_id, answer.notification_id) == {"chloe"}
    assert (await recipients(mesh, account_id, answer.notification_id))["ana"] == (
        "STATE_SUPPRESSED",
        "not_quote_owner",
    )


async def test_conversations_after_an_inbox_visit_only(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    before = await publish(mesh, event(account_id, topic="conversations.reply", recipient_user_ids=["ben"]))
    assert await told(mesh, account_id, before.notification_id) == set()
    visit = await mesh.dispatcher.RecordInboxVisit(pb.RecordInboxVisitRequest(account_id=account_id, user_id="ben"))
    again = await mesh.dispatcher.RecordInboxVisit(pb.RecordInboxVisitRequest(account_id=account_id, user_id="ben"))
    assert visit.first_visited_at == again.first_visited_at  # the first visit is what counts
    after = await publish(mesh, event(account_id, topic="conversations.reply", recipient_user_ids=["ben"]))
    assert await told(mesh, account_id, after.notification_id) == {"ben"}


async def test_unassigned_team_conversation_reaches_primary_members_only(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    await mesh.directory.UpsertTeam(
        directory_pb2.UpsertTeamRequest(
            team=directory_pb2.Team(
                account_id=account_id,
                team_id="support",
                name="Support",
                members=[
                    directory_pb2.TeamMember(user_id="ana", primary=True),
                    directory_pb2.TeamMember(user_id="chloe", primary=True),
                    directory_pb2.TeamMember(user_id="ben", primary=False),
                ],
            )
        )
    )
    for user in ("ana", "ben", "chloe"):
        await mesh.dispatcher.RecordInboxVisit(pb.RecordInboxVisitRequest(account_id=account_id, user_id=user))
    ev = event(
        account_id, topic="conversations.unassigned_new", team_id="support", unassigned=True, recipient_user_ids=["ben"]
    )
    answer = await publish(mesh, ev)
    assert await told(mesh, account_id, answer.notification_id) == {"ana", "chloe"}
    assert (await recipients(mesh, account_id, answer.notification_id))["ben"] == (
        "STATE_SUPPRESSED",
        "not_primary_team_member",
    )


async def test_website_visits_are_email_only(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    answer = await publish(mesh, event(account_id, topic="website_visits.contact_visited", recipient_user_ids=["ana"]))
    assert {r["channel"] for r in await deliveries(mesh.pool, account_id, answer.notification_id)} == {"email"}


async def test_assignment_goes_to_batching_and_self_assignment_is_handed_over_silently(
    mesh: Mesh, account_id: str
) -> None:
    await seed(mesh, account_id)
    answer = await publish(mesh, event(account_id, topic="deals.deal_assigned", recipient_user_ids=["ana"]))
    rows = await deliveries(mesh.pool, account_id, answer.notification_id)
    assert [r["channel"] for r in rows] == ["batching"]
    item = from_payload(rows[0]["payload"])
    assert isinstance(item, Assignment) and item.object_id == "D-1" and "email" in item.channels
    own = await publish(
        mesh, event(account_id, topic="deals.deal_assigned", recipient_user_ids=["ana"], actor=pb.Actor(user_id="ana"))
    )
    [handed] = await deliveries(mesh.pool, account_id, own.notification_id)
    silent = from_payload(handed["payload"])
    assert isinstance(silent, Assignment) and silent.channels == () and handed["channel"] == "batching"
    assert (await recipients(mesh, account_id, own.notification_id))["ana"] == ("STATE_SUPPRESSED", "self_action")


async def test_quiet_hours_hold_deliveries_and_keep_a_silent_bell(
    mesh: Mesh, account_id: str, token_keys: dict[str, bytes]
) -> None:
    await seed(mesh, account_id)
    start, end = PINNED_NOW - dt.timedelta(hours=1), PINNED_NOW + dt.timedelta(hours=2)
    token = TokenIssuer(token_keys, "k1").issue(account_id, "ana")
    await mesh.preferences.UpdateSettings(
        preferences_pb2.UpdateSettingsRequest(
            settings=preferences_pb2.ChannelSettings(
                quiet_hours=preferences_pb2.QuietHours(
                    enabled=True, days=[1, 2, 3, 4, 5, 6, 7], start=start.strftime("%H:%M"), end=end.strftime("%H:%M")
                )
            )
        ),
        metadata=[("authorization", f"Bearer {token}")],
    )
    answer = await publish(mesh, event(account_id, topic="general.approval_requested", recipient_user_ids=["ana"]))
    rows = {r["channel"]: r for r in await deliveries(mesh.pool, account_id, answer.notification_id)}
    assert rows["email"]["available_at"] == end
    assert rows["bell"]["available_at"] < end
    status = await mesh.dispatcher.GetNotification(
        pb.GetNotificationRequest(account_id=account_id, notification_id=answer.notification_id)
    )
    email = next(c for c in status.notification.recipients[0].channels if c.channel == 1)
    assert (email.state, email.reason) == (pb.STATE_HELD, "quiet_hours")


async def test_unknown_team_fails_the_fan_out_with_a_clear_reason(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    ev = event(account_id, topic="conversations.unassigned_new", team_id="ghosts", unassigned=True)
    # The team is looked up behind the producer's call: the event is accepted, its fan-out fails for good.
    answer = await publish(mesh, ev)
    found = await mesh.dispatcher.GetNotification(
        pb.GetNotificationRequest(account_id=account_id, notification_id=answer.notification_id)
    )
    assert found.notification.fanout_state == pb.STATE_FAILED
    assert "ghosts" in found.notification.fanout_reason
    assert not found.notification.recipients
