"""Assignments nobody is told about still reach batching, which drops them from the previous assignee's merge.

The real preferences service, dispatcher and a batching replica (manual clock) run
in-process; the test publishes through the dispatcher's gRPC API and reads what
batching enqueued for the senders when Ana's window closed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import asyncpg
import pytest
from belfry import service
from belfry.api.common.v1 import common_pb2
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.preferences.v1 import preferences_pb2
from belfry.auth import TokenIssuer
from belfry.message import Message

from services.batching.clock import ManualClock
from services.batching.server import build_for as batching_build_for
from services.batching.settings import load_settings as batching_settings
from tests.conftest import common_env
from tests.dispatcher.conftest import Mesh, event, publish, seed

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
            "select payload from queue.deliveries where account_id = $1 and user_id = 'ana' and channel = 'email'",
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
