"""PublishBatch per-event statuses, the idempotency race, and the stream's acknowledgements."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb

from tests.conftest import fanned_out
from tests.dispatcher.conftest import Mesh, event, publish, refused, seed


async def test_batch_answers_one_status_per_event_each_atomic(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    good = event(account_id, recipient_user_ids=["ana"])
    replay_src = event(account_id, recipient_user_ids=["chloe"])
    first = await publish(mesh, replay_src)
    events = [
        good,
        event(account_id, recipient_user_ids=["nobody"]),  # not a member: recorded at fan-out, not refused
        replay_src,  # seen before: replayed
        event(account_id, topic="deals.unknown", recipient_user_ids=["ana"]),
        event(account_id, recipient_user_ids=["chloe"], idempotency_key=replay_src.idempotency_key, activity_id="x"),
        good,  # the same event twice in one batch: the second is a replay of the first
    ]
    answer = await mesh.dispatcher.PublishBatch(pb.PublishBatchRequest(events=events))
    s = answer.statuses
    assert [x.index for x in s] == list(range(6))
    assert [pb.Outcome.Name(x.outcome) for x in s] == [
        "OUTCOME_ACCEPTED",
        "OUTCOME_ACCEPTED",
        "OUTCOME_REPLAYED",
        "OUTCOME_REJECTED",
        "OUTCOME_REJECTED",
        "OUTCOME_REPLAYED",
    ]
    assert s[2].notification_id == first.notification_id
    assert s[3].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert s[4].code == grpc.StatusCode.ALREADY_EXISTS.value[0] and s[4].field == "event.idempotency_key"
    assert s[5].notification_id == s[0].notification_id
    count = await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id)
    assert count == 3  # the earlier single publish and the two accepted events
    # Whether a named user is a member is the fan-out's business: recorded, nobody told.
    await fanned_out(mesh.pool, account_id)
    nobody = await mesh.dispatcher.GetNotification(
        pb.GetNotificationRequest(account_id=account_id, notification_id=s[1].notification_id)
    )
    [recipient] = nobody.notification.recipients
    assert (recipient.user_id, recipient.state, recipient.reason) == (
        "nobody",
        pb.STATE_SUPPRESSED,
        "not_an_active_member",
    )
    assert not recipient.deliveries and nobody.notification.fanout_state == pb.STATE_UNSPECIFIED


async def test_batch_over_the_limit_is_refused(mesh: Mesh, account_id: str) -> None:
    events = [event(account_id, recipient_user_ids=["ana"]) for _ in range(1001)]
    error = await refused(mesh.dispatcher.PublishBatch(pb.PublishBatchRequest(events=events)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "1000" in (error.details() or "")


async def test_fifty_concurrent_duplicates_make_exactly_one_notification(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    ev = event(account_id, recipient_user_ids=["ana", "chloe"])
    answers = await asyncio.gather(*(publish(mesh, ev) for _ in range(50)))
    assert len({a.notification_id for a in answers}) == 1
    assert sum(not a.replayed for a in answers) == 1
    count = await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id)
    rows = await mesh.pool.fetchval("select count(*) from queue.deliveries where account_id = $1", account_id)
    assert count == 1
    assert rows == 4  # two users, each with email and bell, once


async def test_concurrent_batches_sharing_keys_do_not_deadlock_or_duplicate(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    shared = [event(account_id, recipient_user_ids=["ana"]) for _ in range(20)]
    batches = [list(shared), list(reversed(shared)), shared[5:] + shared[:5]]
    answers = await asyncio.gather(*(mesh.dispatcher.PublishBatch(pb.PublishBatchRequest(events=b)) for b in batches))
    ids = {s.notification_id for a in answers for s in a.statuses}
    assert len(ids) == 20
    assert all(s.outcome in {pb.OUTCOME_ACCEPTED, pb.OUTCOME_REPLAYED} for a in answers for s in a.statuses)
    count = await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id)
    assert count == 20


async def test_stream_acknowledges_every_event_by_sequence(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    events = [event(account_id, recipient_user_ids=["ana"]) for _ in range(30)]
    events[7] = event(account_id, topic="deals.ghost", recipient_user_ids=["ana"])  # unknown topic

    async def requests() -> AsyncIterator[pb.PublishStreamRequest]:
        for i, ev in enumerate(events):
            yield pb.PublishStreamRequest(sequence=i + 100, event=ev)
            if i % 10 == 0:
                await asyncio.sleep(0)  # let some acks come back while sending

    acks = [ack async for ack in mesh.dispatcher.PublishStream(requests())]
    assert sorted(a.sequence for a in acks) == list(range(100, 130))
    by_seq = {a.sequence: a.status for a in acks}
    assert by_seq[107].outcome == pb.OUTCOME_REJECTED and "ghost" in by_seq[107].message
    accepted = {s.notification_id for q, s in by_seq.items() if q != 107}
    assert len(accepted) == 29 and all(uuid.UUID(n) for n in accepted)
    count = await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id)
    assert count == 29


async def test_concurrent_single_publishes_written_together_keep_their_own_answers(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    good = [event(account_id, recipient_user_ids=["ana"]) for _ in range(15)]
    bad = [event(account_id, topic="deals.ghost", recipient_user_ids=["ana"]) for _ in range(5)]

    async def attempt(ev: pb.Event) -> pb.PublishResponse | grpc.aio.AioRpcError:
        try:
            return await publish(mesh, ev)
        except grpc.aio.AioRpcError as exc:
            return exc

    answers = await asyncio.gather(*(attempt(ev) for ev in [*good, *bad, good[0]]))
    oks = [a for a in answers[:15] if isinstance(a, pb.PublishResponse)]
    assert len({a.notification_id for a in oks}) == 15
    assert all(isinstance(a, grpc.aio.AioRpcError) and "ghost" in (a.details() or "") for a in answers[15:20])
    last = answers[20]
    assert isinstance(last, pb.PublishResponse) and last.notification_id == oks[0].notification_id
    count = await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id)
    assert count == 15
