"""WatchStatus: a producer follows its account's status changes as they happen, and resumes missing nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.config import AccountRange
from belfry.message import Message
from belfry.queue import Queue, Sent

from services.dispatcher import watch
from services.email import store as email_store
from services.gateway import store as gateway_store
from tests.dispatcher.conftest import Mesh, event, publish, refused, seed

Seen = tuple[str, str, str, int]  # notification, user, queue channel, state


def _seen(c: pb.StatusChange) -> Seen:
    return (c.notification_id, c.user_id, c.queue_channel, c.entry.state)


async def _collect(stream: AsyncIterator[pb.WatchStatusResponse], want: set[Seen], got: list[Seen]) -> str:
    """Read answers until every change of ``want`` came; the last answer's resume token."""
    token = ""
    async for answer in stream:
        got.extend(_seen(c) for c in answer.changes)
        token = answer.resume_token
        if want <= set(got):
            return token
    raise AssertionError(f"the stream ended before {want - set(got)} came")


async def _settle(mesh: Mesh, account_id: str, channel: str) -> None:
    """What a sender of ``channel`` does: claim this account's deliveries (its range only) and record Sent."""
    queue = Queue(mesh.pool, channel, worker="test", accounts=AccountRange(account_id, account_id + "0"))
    leases = await queue.claim(100)
    assert leases
    assert await queue.settle([(lease, Sent()) for lease in leases]) == len(leases)


async def test_a_producer_follows_outcomes_bounces_and_reads_and_resumes_missing_nothing(
    mesh: Mesh, account_id: str
) -> None:
    await seed(mesh, account_id)
    first = await publish(mesh, event(account_id, recipient_user_ids=["ana"]))
    nid = first.notification_id
    stream = mesh.dispatcher.WatchStatus(pb.WatchStatusRequest(account_id=account_id), timeout=60)
    await _settle(mesh, account_id, "email")
    await _settle(mesh, account_id, "bell")
    got: list[Seen] = []
    token = await asyncio.wait_for(
        _collect(stream, {(nid, "ana", "email", pb.STATE_RELAYED), (nid, "ana", "bell", pb.STATE_SENT)}, got),
        30,
    )
    stream.cancel()  # the producer goes away

    # Meanwhile: the destination bounces the email, and ana reads the notification in the bell.
    email_id = await mesh.pool.fetchval(
        "select delivery_id from queue.deliveries where account_id = $1 and channel = 'email'", account_id
    )
    await email_store.record_feedback(
        mesh.pool,
        email_store.NewFeedback(account_id, email_id, "hard bounce", "ana@example.test", "5.1.1", "no such user"),
        window_seconds=3600,
    )
    message = Message(
        notification_id=nid, account_id=account_id, user_id="ana", topic="deals.stage_changed", title="t",
        body="b", url="https://app.example/deals/1", occurred_at="2026-01-01T00:00:00+00:00",
    )  # fmt: skip
    await gateway_store.add_many(mesh.pool, [message])
    assert await gateway_store.mark_notification_read(mesh.pool, account_id, "ana", nid) == 1

    # Resumed from the last token: every change since, none missed (some of the first may come again).
    again: list[Seen] = []
    resumed = mesh.dispatcher.WatchStatus(pb.WatchStatusRequest(account_id=account_id, resume_token=token), timeout=60)
    await asyncio.wait_for(
        _collect(resumed, {(nid, "ana", "email", pb.STATE_BOUNCED), (nid, "ana", "", pb.STATE_READ)}, again), 30
    )
    resumed.cancel()
    assert len(again) == len(set(again))  # one stream never sends a change twice
    assert not [c for c in again if c[0] != nid]  # nothing of another notification, let alone account


async def test_a_stream_from_the_start_of_retention_and_bad_requests(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    answer = await publish(mesh, event(account_id, recipient_user_ids=["ana"]))
    await _settle(mesh, account_id, "email")
    # A token from long ago reads everything still retained: the outcome recorded before the stream began.
    long_ago = watch.encode_token(datetime(2020, 1, 1, tzinfo=UTC))
    stream = mesh.dispatcher.WatchStatus(pb.WatchStatusRequest(account_id=account_id, resume_token=long_ago))
    got: list[Seen] = []
    await asyncio.wait_for(_collect(stream, {(answer.notification_id, "ana", "email", pb.STATE_RELAYED)}, got), 30)
    stream.cancel()
    for request, field in (
        (pb.WatchStatusRequest(), "account_id"),
        (pb.WatchStatusRequest(account_id=account_id, resume_token="not a token"), "resume_token"),
        (pb.WatchStatusRequest(account_id=account_id, resume_token=str(uuid.uuid4())), "resume_token"),
    ):
        error = await refused(_first(mesh.dispatcher.WatchStatus(request)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in (error.details() or "")


async def _first(stream: AsyncIterator[pb.WatchStatusResponse]) -> pb.WatchStatusResponse:
    async for answer in stream:
        return answer
    pytest.fail("the stream ended without an answer or an error")


async def test_a_change_that_commits_after_its_time_is_still_sent(mesh: Mesh, account_id: str) -> None:
    """A read stamped when its statement starts but committed a second later (it waited for a row lock) is
    sent although readings ran meanwhile: each reading re-reads the last margin."""
    await seed(mesh, account_id)
    nid = (await publish(mesh, event(account_id, recipient_user_ids=["ana"]))).notification_id
    message = Message(
        notification_id=nid, account_id=account_id, user_id="ana", topic="deals.stage_changed", title="t",
        body="b", url="https://app.example/deals/1", occurred_at="2026-01-01T00:00:00+00:00",
    )  # fmt: skip
    await gateway_store.add_many(mesh.pool, [message])
    follow = watch.Watch(mesh.pool, watch.Tuning(poll_seconds=0.05, margin_seconds=5.0, heartbeat_seconds=0.05))
    readings = follow.follow(account_id, None)
    await anext(readings)  # the stream is under way
    async with mesh.pool.acquire() as holder, holder.transaction():
        await holder.execute(
            "select 1 from gateway.feed where account_id = $1 and notification_id = $2 for update", account_id, nid
        )
        marking = asyncio.create_task(gateway_store.mark_notification_read(mesh.pool, account_id, "ana", nid))
        before = await anext(readings)
        await asyncio.sleep(1.0)  # readings go on while the read waits for the lock
        after = await anext(readings)
        assert after[1] >= before[1] and not marking.done()
    assert await marking == 1

    async def until_read() -> None:
        async for changes, _ in readings:
            if any(c.state == "read" and str(c.notification_id) == nid for c in changes):
                return

    await asyncio.wait_for(until_read(), 30)
