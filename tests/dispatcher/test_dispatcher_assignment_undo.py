"""Assignments through dispatcher and batching: undone assignments leave the merge, and merges can be followed.

The real preferences service, dispatcher and a batching replica (manual clock) run
in-process; the tests publish through the dispatcher's gRPC API, read what batching
enqueued for the senders when a window closed, and follow every assignment with
the dispatcher's ``GetNotification`` (the merged notification included; the real
email sender, with a daily cap of one, shows a cap drop in its record).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc
import pytest
from aiosmtpd.controller import Controller
from belfry import service
from belfry.api.common.v1 import common_pb2
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.preferences.v1 import preferences_pb2
from belfry.auth import TokenIssuer
from belfry.message import Message

from services.batching.clock import ManualClock
from services.batching.server import build_for as batching_build_for
from services.batching.settings import load_settings as batching_settings
from services.email.server import build_for as email_build_for
from services.email.settings import load_settings as email_settings
from tests.conftest import common_env
from tests.dispatcher.conftest import Mesh, event, publish, refused, seed
from tests.email.email_helpers import Capture, email_env

TOPIC = "contacts.contact_assigned"
USERS = (("ana", "Ana Lopez", "en", ()), ("bob", "Bob Stone", "en", ()), ("dan", "Dan Wu", "en", ()))
WINDOW = 300


@pytest.fixture
async def batching(mesh: Mesh, token_keys: dict[str, bytes]) -> AsyncIterator[ManualClock]:
    """One batching replica on the session's database and preferences, with a manual clock."""
    clock = ManualClock(dt.datetime.now(dt.UTC))
    env = common_env(
        mesh.database_url,
        token_keys,
        identity="batching",
        BELFRY_PREFERENCES_ADDRESS=mesh.preferences_address,
        BELFRY_BATCHING_WINDOW_SECONDS=str(WINDOW),
        BELFRY_BATCHING_TICK_SECONDS="0.05",
        # Digests are not under test: keep that loop out of the way.
        BELFRY_BATCHING_DIGEST_TICK_SECONDS="3600",
    )
    settings = batching_settings(env)
    running = await service.start("batching", settings.common, batching_build_for(settings, clock=clock))
    yield clock
    await running.stop(0.1)


async def _handed_over(pool: asyncpg.Pool, account_id: str) -> None:
    """Wait until batching applied every handoff of the account (it settles them)."""
    for _ in range(750):
        pending = await pool.fetchval(
            "select count(*) from queue.deliveries where account_id = $1 and channel = 'batching'"
            " and state in ('queued', 'leased')",
            account_id,
        )
        if pending == 0:
            return
        await _pause()
    raise AssertionError("batching did not apply the handoffs")


async def _pause() -> None:
    await asyncio.sleep(0.02)


async def _merged_for_ana(pool: asyncpg.Pool, account_id: str) -> Message:
    """The merged notification batching enqueued for Ana's email once her window closed."""
    for _ in range(750):
        row = await pool.fetchrow(
            "select payload from queue.whole_deliveries where account_id = $1 and user_id = 'ana' and channel = 'email'",
            account_id,
        )
        if row is not None:
            return Message.from_json(row["payload"])
        await _pause()
    raise AssertionError("Ana's window did not close")


async def _assign(mesh: Mesh, account_id: str, user: str, contact: str, actor: str = "dan") -> str:
    ev = event(
        account_id,
        topic=TOPIC,
        recipient_user_ids=[user],
        actor=pb.Actor(user_id=actor, source=pb.ACTOR_SOURCE_UI),
        object=pb.ObjectRef(type="contact", id=contact, display_name=f"Contact {contact}", url=f"/contacts/{contact}"),
    )
    return (await publish(mesh, ev)).notification_id


async def _all_off(mesh: Mesh, account_id: str, user: str, token_keys: dict[str, bytes]) -> None:
    token = TokenIssuer(token_keys, "k1").issue(account_id, user)
    for channel in (
        common_pb2.CHANNEL_EMAIL,
        common_pb2.CHANNEL_BELL,
        common_pb2.CHANNEL_POPUP,
        common_pb2.CHANNEL_BROWSER,
        common_pb2.CHANNEL_MOBILE,
    ):
        await mesh.preferences.SetPreference(
            preferences_pb2.SetPreferenceRequest(
                choice=preferences_pb2.Choice(topic=TOPIC, channel=channel, enabled=False)
            ),
            metadata=[("authorization", f"Bearer {token}")],
        )


@pytest.mark.parametrize("how", ["bob_has_every_channel_off", "bob_assigns_it_to_himself"])
async def test_a_reassignment_nobody_is_told_about_still_leaves_anas_merge(
    mesh: Mesh, account_id: str, token_keys: dict[str, bytes], batching: ManualClock, how: str
) -> None:
    await seed(mesh, account_id, USERS)
    if how == "bob_has_every_channel_off":
        await _all_off(mesh, account_id, "bob", token_keys)
    await _assign(mesh, account_id, "ana", "X")
    await _assign(mesh, account_id, "ana", "Y")
    await _handed_over(mesh.pool, account_id)

    actor = "bob" if how == "bob_assigns_it_to_himself" else "dan"
    moved = await _assign(mesh, account_id, "bob", "X", actor=actor)
    await _handed_over(mesh.pool, account_id)

    # The dispatcher records that Bob is not told, and why.
    status = await mesh.dispatcher.GetNotification(
        pb.GetNotificationRequest(account_id=account_id, notification_id=moved)
    )
    [bob] = status.notification.recipients
    if how == "bob_assigns_it_to_himself":
        assert (pb.State.Name(bob.state), bob.reason) == ("STATE_SUPPRESSED", "self_action")
    else:
        assert {pb.State.Name(c.state) for c in bob.channels} == {"STATE_SUPPRESSED"}

    batching.advance(WINDOW + 1)
    merged = await _merged_for_ana(mesh.pool, account_id)
    assert [i.id for i in merged.items] == ["Y"]
    # Bob's side sends nothing: no channel was on, or it was his own action.
    bob_sends = await mesh.pool.fetchval(
        "select count(*) from queue.deliveries where account_id = $1 and user_id = 'bob' and channel <> 'batching'",
        account_id,
    )
    assert bob_sends == 0


@pytest.fixture
def smtp_port() -> Iterator[int]:
    """A real SMTP server (aiosmtpd) on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Capture(), hostname="127.0.0.1", port=port)
    controller.start()
    yield port
    controller.stop()


@pytest.fixture
async def email_sender(mesh: Mesh, token_keys: dict[str, bytes], smtp_port: int) -> AsyncIterator[None]:
    """The real email sender with a daily cap of one email per (address, topic, day)."""
    settings = email_settings(email_env(mesh.database_url, token_keys, smtp_port, BELFRY_EMAIL_DAILY_CAP="1"))
    running = await service.start("email", settings.common, email_build_for(settings))
    yield
    await running.stop(0.1)


async def _status(mesh: Mesh, account_id: str, notification_id: str) -> pb.Notification:
    answer: pb.GetNotificationResponse = await mesh.dispatcher.GetNotification(
        pb.GetNotificationRequest(account_id=account_id, notification_id=notification_id)
    )
    return answer.notification


def _handoff(recipient: pb.RecipientStatus) -> pb.TimelineEntry:
    """The last entry of the recipient's batching delivery: what batching did with the assignment."""
    [handed] = [d for d in recipient.deliveries if d.queue_channel == "batching"]
    return handed.timeline[-1]


def _said(entry: pb.TimelineEntry) -> tuple[str, str]:
    return pb.State.Name(entry.state), entry.reason


async def _email_finished(mesh: Mesh, account_id: str, notification_id: str) -> str:
    """The final state of a notification's email delivery, once the sender is done with it."""
    for _ in range(750):
        state = await mesh.pool.fetchval(
            "select state from queue.deliveries where account_id = $1 and notification_id = $2 and channel = 'email'"
            " and state in ('sent', 'dropped', 'dead', 'expired')",
            account_id,
            uuid.UUID(notification_id),
        )
        if state is not None:
            return str(state)
        await _pause()
    raise AssertionError("the email sender did not finish the delivery")


async def _merged_into(mesh: Mesh, account_id: str, notification_id: str) -> str:
    """Wait until batching closed the source's window; the notification it went out in."""
    for _ in range(750):
        [recipient] = (await _status(mesh, account_id, notification_id)).recipients
        if recipient.merged_into:
            return recipient.merged_into
        await _pause()
    raise AssertionError("the window did not close")


async def test_a_merged_assignment_can_be_followed_from_each_source_and_a_withdrawn_one_says_why(
    mesh: Mesh, account_id: str, batching: ManualClock, email_sender: None
) -> None:
    await seed(mesh, account_id, USERS)
    # The batching clock runs behind the wall clock, so each window opens at the clock's time
    # and closes only when the test moves it (assignments carry the wall clock's time).
    batching.set(batching.now() - dt.timedelta(seconds=4 * WINDOW))

    # A window holding one assignment sends that notification itself; its email uses Ana's daily cap.
    alone = await _assign(mesh, account_id, "ana", "A")
    await _handed_over(mesh.pool, account_id)
    batching.advance(WINDOW + 1)
    assert await _merged_into(mesh, account_id, alone) == alone
    assert await _email_finished(mesh, account_id, alone) == "sent"
    [ana] = (await _status(mesh, account_id, alone)).recipients
    assert _said(_handoff(ana)) == ("STATE_SENT", "sent on its own when its assignment window closed")

    sources = [await _assign(mesh, account_id, "ana", contact) for contact in ("X", "Y", "Z")]
    await _handed_over(mesh.pool, account_id)
    taken_back = await _assign(mesh, account_id, "bob", "Z")
    await _handed_over(mesh.pool, account_id)

    # While the window is open, every source says it is held, and until when.
    [ana] = (await _status(mesh, account_id, sources[0])).recipients
    state, reason = _said(_handoff(ana))
    assert (state, reason.partition(" until ")[0]) == ("STATE_HELD", "assignment window")
    assert ana.merged_into == ""
    [ana] = (await _status(mesh, account_id, sources[2])).recipients
    assert _said(_handoff(ana)) == ("STATE_WITHDRAWN", "withdrawn by reassignment")

    batching.advance(WINDOW + 1)
    merged = await _merged_into(mesh, account_id, sources[0])
    assert merged not in sources
    assert await _email_finished(mesh, account_id, merged) == "dropped"

    # The merged notification has its own record: recipient, channels, deliveries, the cap drop.
    record = await _status(mesh, account_id, merged)
    assert record.notification_id == merged
    assert record.topic == TOPIC
    assert list(record.merged_from) == sources[:2]
    assert (record.object.type, record.object.display_name) == ("contact", "2 contacts were assigned to you")
    [ana] = record.recipients
    assert (ana.user_id, pb.State.Name(ana.state)) == ("ana", "STATE_ACCEPTED")
    channels = {common_pb2.Channel.Name(c.channel): pb.State.Name(c.state) for c in ana.channels}
    assert channels["CHANNEL_EMAIL"] == "STATE_ACCEPTED"
    assert channels["CHANNEL_BELL"] == "STATE_ACCEPTED"
    deliveries = {d.queue_channel: d for d in ana.deliveries}
    assert set(deliveries) >= {"email", "bell"}
    assert _said(deliveries["email"].timeline[-1]) == ("STATE_DROPPED", "daily cap")
    assert pb.State.Name(deliveries["bell"].timeline[0].state) == "STATE_QUEUED"

    # Each source says where it went; the one taken back inside the window says why it never went.
    for source in sources[:2]:
        [ana] = (await _status(mesh, account_id, source)).recipients
        assert ana.merged_into == merged
        assert _said(_handoff(ana)) == ("STATE_MERGED", f"merged into {merged}")
    [ana] = (await _status(mesh, account_id, sources[2])).recipients
    assert _said(_handoff(ana)) == ("STATE_WITHDRAWN", "withdrawn by reassignment")
    assert ana.merged_into == ""
    # Bob's window held only the reassigned contact: his notification went out as itself.
    assert await _merged_into(mesh, account_id, taken_back) == taken_back

    # Another account cannot see the merged notification.
    error = await refused(
        mesh.dispatcher.GetNotification(pb.GetNotificationRequest(account_id="other", notification_id=merged))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
