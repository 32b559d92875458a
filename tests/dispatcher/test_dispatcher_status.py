"""The status API: timelines per recipient and channel, and a user's list, paged."""

from __future__ import annotations

import asyncio
import uuid

import grpc
from belfry.api.common.v1 import common_pb2
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb

from services.email import store as email_store
from tests.dispatcher.conftest import Mesh, event, publish, refused, seed


async def get(mesh: Mesh, account_id: str, notification_id: str) -> pb.Notification:
    answer = await mesh.dispatcher.GetNotification(
        pb.GetNotificationRequest(account_id=account_id, notification_id=notification_id)
    )
    notification: pb.Notification = answer.notification
    return notification


async def test_timeline_follows_the_queue(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    answer = await publish(mesh, event(account_id, recipient_user_ids=["ana"]))
    n = await get(mesh, account_id, answer.notification_id)
    assert n.topic == "deals.stage_changed" and n.object.display_name == "Big <b>deal</b>"
    (ana,) = n.recipients
    channels = {c.channel: (c.state, c.reason) for c in ana.channels}
    assert channels[common_pb2.CHANNEL_EMAIL] == (pb.STATE_ACCEPTED, "")
    assert channels[common_pb2.CHANNEL_MOBILE][0] == pb.STATE_SUPPRESSED and channels[common_pb2.CHANNEL_MOBILE][1]
    assert {d.queue_channel: [e.state for e in d.timeline] for d in ana.deliveries} == {
        "email": [pb.STATE_QUEUED],
        "bell": [pb.STATE_QUEUED],
    }
    # What senders record when they settle (done here for this account only: claiming from
    # the shared queue would take other tests' deliveries).
    await mesh.pool.execute(
        """
        update queue.deliveries set state = case channel when 'email' then 'sent' else 'dropped' end,
            attempts = 1, finished_at = now(),
            errors = case channel when 'bell' then '[{"error": "no live tab"}]'::jsonb else errors end
        where account_id = $1
        """,
        account_id,
    )
    n = await get(mesh, account_id, answer.notification_id)
    last = {d.queue_channel: d.timeline[-1] for d in n.recipients[0].deliveries}
    assert (last["email"].state, last["email"].reason) == (pb.STATE_RELAYED, "accepted by the SMTP relay")
    assert (last["bell"].state, last["bell"].reason) == (pb.STATE_DROPPED, "no live tab")


async def test_bounces_and_complaints_follow_the_relay_in_the_email_timeline(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    answer = await publish(mesh, event(account_id, recipient_user_ids=["ana"]))
    await mesh.pool.execute(
        "update queue.deliveries set state = 'sent', attempts = 1, finished_at = now() where account_id = $1",
        account_id,
    )
    email_id = await mesh.pool.fetchval(
        "select delivery_id from queue.deliveries where account_id = $1 and channel = 'email'", account_id
    )
    # What the bounce receiver records, through the email service's own store: a soft bounce, a hard one, a complaint.
    for kind, status, detail in (
        ("soft bounce", "4.2.2", "mailbox full"),
        ("hard bounce", "5.1.1", "user unknown"),
        ("complaint", "abuse", "marked as spam"),
    ):
        feedback = email_store.NewFeedback(account_id, email_id, kind, "ana@example.test", status, detail)
        await email_store.record_feedback(mesh.pool, feedback, window_seconds=3600)
    n = await get(mesh, account_id, answer.notification_id)
    email = next(d for d in n.recipients[0].deliveries if d.queue_channel == "email")
    assert [(e.state, e.reason) for e in email.timeline[1:]] == [
        (pb.STATE_RELAYED, "accepted by the SMTP relay"),
        (pb.STATE_BOUNCED, "soft bounce 4.2.2: mailbox full"),
        (pb.STATE_BOUNCED, "hard bounce 5.1.1: user unknown"),
        (pb.STATE_COMPLAINED, "complaint abuse: marked as spam"),
    ]
    bell = next(d for d in n.recipients[0].deliveries if d.queue_channel == "bell")
    assert [e.state for e in bell.timeline] == [pb.STATE_QUEUED, pb.STATE_SENT]  # no feedback on other channels


async def test_get_unknown_or_malformed_notification(mesh: Mesh, account_id: str) -> None:
    error = await refused(get(mesh, account_id, str(uuid.uuid4())))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await refused(get(mesh, account_id, "not-a-uuid"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_another_account_cannot_read_a_notification(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    answer = await publish(mesh, event(account_id, recipient_user_ids=["ana"]))
    error = await refused(get(mesh, f"acc_{uuid.uuid4().hex[:12]}", answer.notification_id))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_list_notifications_pages_newest_first(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    ids = []
    for _ in range(7):
        ids.append((await publish(mesh, event(account_id, recipient_user_ids=["ana", "chloe"]))).notification_id)
        await asyncio.sleep(0)
    await publish(mesh, event(account_id, recipient_user_ids=["chloe"]))  # not ana's
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await mesh.dispatcher.ListNotifications(
            pb.ListNotificationsRequest(
                account_id=account_id, user_id="ana", page=common_pb2.PageRequest(page_size=3, page_token=token)
            )
        )
        pages += 1
        seen += [n.notification_id for n in page.notifications]
        assert all([r.user_id for r in n.recipients] == ["ana"] for n in page.notifications)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == list(reversed(ids))
    error = await refused(
        mesh.dispatcher.ListNotifications(
            pb.ListNotificationsRequest(
                account_id=account_id, user_id="ana", page=common_pb2.PageRequest(page_token="zz")
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
