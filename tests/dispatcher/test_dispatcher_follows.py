"""Following and muting records: the FollowService API, followers addressed by record, automatic follows, mutes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from belfry import rpc
from belfry.api.common.v1 import common_pb2
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.auth import TokenIssuer

from tests.conftest import fanned_out
from tests.dispatcher.conftest import NO_TLS, Mesh, deliveries, event, publish, refused, seed

DEAL = pb.FollowedObject(type="deal", id="D-1")  # the object of conftest's events


@pytest.fixture
async def follows(mesh: Mesh) -> AsyncIterator[dispatcher_pb2_grpc.FollowServiceStub]:
    """The FollowService of the session's dispatcher."""
    async with rpc.connect(f"127.0.0.1:{mesh.dispatcher_port}", NO_TLS) as channel:
        yield dispatcher_pb2_grpc.FollowServiceStub(channel)


def as_user(token_keys: dict[str, bytes], account_id: str, user_id: str) -> list[tuple[str, str]]:
    """Call metadata carrying a user token."""
    return [("authorization", f"Bearer {TokenIssuer(token_keys, 'k1').issue(account_id, user_id)}")]


async def recipients(mesh: Mesh, account_id: str, notification_id: str) -> dict[str, str]:
    """user → reason ('' when told) of one notification."""
    found = await mesh.dispatcher.GetNotification(
        pb.GetNotificationRequest(account_id=account_id, notification_id=notification_id)
    )
    return {r.user_id: r.reason for r in found.notification.recipients}


async def test_follow_unfollow_mute_unmute_and_list_for_the_caller_only(
    mesh: Mesh, follows: dispatcher_pb2_grpc.FollowServiceStub, token_keys: dict[str, bytes], account_id: str
) -> None:
    ana = as_user(token_keys, account_id, "ana")
    for i in range(3):
        await follows.Follow(pb.FollowRequest(object=pb.FollowedObject(type="ticket", id=f"T-{i}")), metadata=ana)
    muted = await follows.Mute(pb.FollowRequest(object=DEAL), metadata=ana)
    assert (muted.follow.following, muted.follow.muted, muted.follow.source) == (False, True, "explicit")
    await follows.Unfollow(pb.FollowRequest(object=pb.FollowedObject(type="ticket", id="T-1")), metadata=ana)
    first = await follows.ListFollows(pb.ListFollowsRequest(page=common_pb2.PageRequest(page_size=2)), metadata=ana)
    rest = await follows.ListFollows(
        pb.ListFollowsRequest(page=common_pb2.PageRequest(page_size=2, page_token=first.next_page_token)), metadata=ana
    )
    listed = [(f.object.type, f.object.id, f.following, f.muted) for f in [*first.follows, *rest.follows]]
    assert listed == [("deal", "D-1", False, True), ("ticket", "T-0", True, False), ("ticket", "T-2", True, False)]
    assert not rest.next_page_token
    unmuted = await follows.Unmute(pb.FollowRequest(object=DEAL), metadata=ana)
    assert not unmuted.follow.muted
    # Another account's user with the same id sees none of it; the account comes from the token.
    theirs = await follows.ListFollows(pb.ListFollowsRequest(), metadata=as_user(token_keys, account_id + "x", "ana"))
    assert not theirs.follows
    followers = await follows.ListFollowers(
        pb.ListFollowersRequest(account_id=account_id, object=pb.FollowedObject(type="ticket", id="T-2"))
    )
    assert [f.user_id for f in followers.followers] == ["ana"]


async def test_bad_follow_requests_are_refused_clearly(
    mesh: Mesh, follows: dispatcher_pb2_grpc.FollowServiceStub, token_keys: dict[str, bytes], account_id: str
) -> None:
    error = await refused(follows.Follow(pb.FollowRequest(object=DEAL)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = await refused(
        follows.Follow(
            pb.FollowRequest(object=pb.FollowedObject(id="1")), metadata=as_user(token_keys, account_id, "a")
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "object.type" in (error.details() or "")
    error = await refused(
        follows.ListFollows(
            pb.ListFollowsRequest(page=common_pb2.PageRequest(page_token="nope")),
            metadata=as_user(token_keys, account_id, "a"),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await refused(publish(mesh, event(account_id, object=pb.ObjectRef(type="deal"), include_followers=True)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "include_followers" in (error.details() or "")


async def test_followers_of_a_record_are_told_and_a_mute_holds_them_back(
    mesh: Mesh, follows: dispatcher_pb2_grpc.FollowServiceStub, token_keys: dict[str, bytes], account_id: str
) -> None:
    await seed(mesh, account_id)
    for user in ("ana", "ben"):
        await follows.Follow(pb.FollowRequest(object=DEAL), metadata=as_user(token_keys, account_id, user))
    await follows.Mute(pb.FollowRequest(object=DEAL), metadata=as_user(token_keys, account_id, "chloe"))
    # Chloé is named, but muted the deal; Ana and Ben are told as followers; Dan acted.
    answer = await publish(mesh, event(account_id, recipient_user_ids=["chloe"], include_followers=True))
    assert await recipients(mesh, account_id, answer.notification_id) == {
        "ana": "",
        "ben": "",
        "chloe": "muted_by_recipient",
    }
    told = {r["user_id"] for r in await deliveries(mesh.pool, account_id, answer.notification_id)}
    assert told == {"ana", "ben"}
    await follows.Unmute(pb.FollowRequest(object=DEAL), metadata=as_user(token_keys, account_id, "chloe"))
    again = await publish(mesh, event(account_id, recipient_user_ids=["chloe"], include_followers=True))
    assert (await recipients(mesh, account_id, again.notification_id))["chloe"] == ""


async def test_a_mute_holds_back_only_its_own_record_within_one_batch(
    mesh: Mesh, follows: dispatcher_pb2_grpc.FollowServiceStub, token_keys: dict[str, bytes], account_id: str
) -> None:
    """Fan-out asks for the mutes of a whole batch at once: each event still sees only its own record's."""
    await seed(mesh, account_id)
    await follows.Mute(pb.FollowRequest(object=DEAL), metadata=as_user(token_keys, account_id, "chloe"))
    other = pb.ObjectRef(type="deal", id="D-2", display_name="Other deal", url="https://app.example/deals/2")
    answer = await mesh.dispatcher.PublishBatch(
        pb.PublishBatchRequest(
            events=[
                event(account_id, recipient_user_ids=["chloe", "ana"]),
                event(account_id, recipient_user_ids=["chloe"], object=other),
            ]
        )
    )
    muted, told = (s.notification_id for s in answer.statuses)
    await fanned_out(mesh.pool, account_id)
    assert await recipients(mesh, account_id, muted) == {"chloe": "muted_by_recipient", "ana": ""}
    assert await recipients(mesh, account_id, told) == {"chloe": ""}


async def test_a_mute_does_not_hold_back_a_locked_topic(
    mesh: Mesh, follows: dispatcher_pb2_grpc.FollowServiceStub, token_keys: dict[str, bytes], account_id: str
) -> None:
    await seed(mesh, account_id)
    await follows.Mute(pb.FollowRequest(object=DEAL), metadata=as_user(token_keys, account_id, "ana"))
    answer = await publish(mesh, event(account_id, topic="account.billing", recipient_user_ids=["ana"]))
    assert await recipients(mesh, account_id, answer.notification_id) == {"ana": ""}


async def test_owners_commenters_mentioned_and_assignees_follow_automatically_unless_they_said_no(
    mesh: Mesh, follows: dispatcher_pb2_grpc.FollowServiceStub, token_keys: dict[str, bytes], account_id: str
) -> None:
    await seed(mesh, account_id)
    record = pb.FollowedObject(type="deal", id="D-7")
    obj = pb.ObjectRef(type="deal", id="D-7", display_name="D7", owner_user_id="ana")
    # Ben said he does not follow this deal: an automatic follow must not undo that.
    await follows.Unfollow(pb.FollowRequest(object=record), metadata=as_user(token_keys, account_id, "ben"))
    await publish(
        mesh,
        event(
            account_id,
            topic="deals.mentioned",
            object=obj,
            actor=pb.Actor(user_id="chloe", source=pb.ACTOR_SOURCE_UI),
            activity_id="comment-1",
            mentioned_user_ids=["ben", "dan"],
        ),
    )
    found = await follows.ListFollowers(pb.ListFollowersRequest(account_id=account_id, object=record))
    assert {(f.user_id, f.source) for f in found.followers} == {
        ("ana", "owner"),
        ("chloe", "comment"),
        ("dan", "mention"),
    }
    # The next event for the deal's followers reaches them (Chloé acted, so she is not told of her own action).
    answer = await publish(
        mesh,
        event(
            account_id, object=obj, actor=pb.Actor(user_id="chloe", source=pb.ACTOR_SOURCE_UI), include_followers=True
        ),
    )
    assert await recipients(mesh, account_id, answer.notification_id) == {
        "ana": "",
        "chloe": "self_action",
        "dan": "",
    }
