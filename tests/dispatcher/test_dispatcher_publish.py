"""Publish through the real gRPC API with the real preferences service."""

from __future__ import annotations

import uuid

import grpc
import pytest
from belfry import rpc
from belfry.api.directory.v1 import directory_pb2
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.message import Message

from tests.dispatcher.conftest import NO_TLS, Mesh, deliveries, event, publish, refused, seed


async def test_publish_writes_notification_and_one_delivery_per_channel(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    answer = await publish(mesh, event(account_id, recipient_user_ids=["ana", "chloe"]))
    rows = await deliveries(mesh.pool, account_id, answer.notification_id)
    by_user: dict[str, set[str]] = {}
    for r in rows:
        by_user.setdefault(r["user_id"], set()).add(r["channel"])
    # deals.stage_changed defaults to email + bell: one "bell" delivery carries the desktop flags.
    assert by_user == {"ana": {"email", "bell"}, "chloe": {"email", "bell"}}
    email = next(Message.from_json(r["payload"]) for r in rows if r["user_id"] == "chloe" and r["channel"] == "email")
    assert email.recipient_email == "chloe@example.test"
    assert email.locale == "fr"
    assert email.title.startswith("Une transaction") and email.title.endswith(": Big <b>deal</b>")
    assert email.body == "Big <b>deal</b>, par Dan Wu"  # untrusted text kept as text, escaped by senders
    assert email.notification_id == answer.notification_id
    assert not answer.replayed


async def test_replay_same_body_returns_original(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    ev = event(account_id, recipient_user_ids=["ana"])
    first = await publish(mesh, ev)
    again = await publish(mesh, ev)
    assert again.replayed and again.notification_id == first.notification_id
    count = await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id)
    assert count == 1


async def test_same_key_other_body_is_already_exists_and_writes_nothing(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    ev = event(account_id, recipient_user_ids=["ana"])
    await publish(mesh, ev)
    other = event(account_id, recipient_user_ids=["chloe"], idempotency_key=ev.idempotency_key)
    error = await refused(publish(mesh, other))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert ev.idempotency_key in (error.details() or "")
    count = await mesh.pool.fetchval("select count(*) from queue.deliveries where account_id = $1", account_id)
    assert count == 2  # ana's email and bell only


async def test_recipient_from_another_account_is_recorded_and_never_told(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    other = f"acc_{uuid.uuid4().hex[:12]}"
    await seed(mesh, other, [("zoe", "Zoé", "fr", ())])
    answer = await publish(mesh, event(account_id, recipient_user_ids=["ana", "zoe"]))
    found = await mesh.dispatcher.GetNotification(
        pb.GetNotificationRequest(account_id=account_id, notification_id=answer.notification_id)
    )
    states = {r.user_id: (r.state, r.reason) for r in found.notification.recipients}
    assert states == {"ana": (pb.STATE_ACCEPTED, ""), "zoe": (pb.STATE_SUPPRESSED, "not_an_active_member")}
    assert {r["user_id"] for r in await deliveries(mesh.pool, account_id, answer.notification_id)} == {"ana"}
    for table in ("dispatcher.notifications", "dispatcher.recipients", "queue.deliveries"):
        assert await mesh.pool.fetchval(f"select count(*) from {table} where account_id = $1", other) == 0


async def test_unknown_topic_and_unknown_account(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    error = await refused(publish(mesh, event(account_id, topic="deals.no_such_topic", recipient_user_ids=["ana"])))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no_such_topic" in (error.details() or "")
    error = await refused(publish(mesh, event(f"acc_{uuid.uuid4().hex[:12]}", recipient_user_ids=["ana"])))
    assert error.code() in {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}
    assert (
        await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id) == 0
    )


async def test_bad_input_is_refused_with_a_clear_message(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    cases = {
        "idempotency_key": event(account_id, recipient_user_ids=["ana"], idempotency_key=""),
        "recipients": event(account_id),
        "occurred_at": event(account_id, recipient_user_ids=["ana"]),
        "event is": event(account_id, recipient_user_ids=["ana"]),
    }
    cases["occurred_at"].occurred_at.FromSeconds(cases["occurred_at"].occurred_at.seconds + 86400)
    cases["event is"].object.display_name = "x" * 1000
    cases["event is"].variables.update({"blob": "y" * 70_000})
    for needle, ev in cases.items():
        error = await refused(publish(mesh, ev))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, needle
        assert needle.split()[0] in (error.details() or ""), (needle, error.details())
    assert (
        await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id) == 0
    )


async def test_invalid_utf8_is_invalid_argument(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    good = event(account_id, recipient_user_ids=["ana"])
    good.object.display_name = "AAAA"
    raw = good.SerializeToString()
    broken = raw.replace(b"AAAA", b"A\xff\xfeA")
    channel = rpc.connect(f"127.0.0.1:{mesh.dispatcher_port}", NO_TLS)
    call = channel.unary_unary(
        "/belfry.api.dispatcher.v1.DispatcherService/Publish",
        request_serializer=lambda b: b"\x0a" + _varint(len(b)) + b,
        response_deserializer=lambda b: b,
    )
    error = await refused(call(broken))
    await channel.close()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid PublishRequest: invalid UTF-8 in a string field" in (error.details() or "")


async def test_a_stream_acknowledges_what_came_before_an_undecodable_message_then_ends(
    mesh: Mesh, account_id: str
) -> None:
    await seed(mesh, account_id)
    good = pb.PublishStreamRequest(sequence=1, event=event(account_id, recipient_user_ids=["ana"]))
    damaged = event(account_id, recipient_user_ids=["ana"])
    damaged.object.display_name = "AAAA"
    broken = pb.PublishStreamRequest(sequence=2, event=damaged).SerializeToString().replace(b"AAAA", b"A\xff\xfeA")
    async with rpc.connect(f"127.0.0.1:{mesh.dispatcher_port}", NO_TLS) as channel:
        call = channel.stream_stream(
            "/belfry.api.dispatcher.v1.DispatcherService/PublishStream",
            request_serializer=lambda b: b,
            response_deserializer=pb.PublishStreamAck.FromString,
        )(iter([good.SerializeToString(), broken]))
        acks: list[pb.PublishStreamAck] = []

        async def read_all() -> None:
            async for ack in call:
                acks.append(ack)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all()
    assert [(a.sequence, a.status.outcome) for a in acks] == [(1, pb.OUTCOME_ACCEPTED)]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid PublishStreamRequest: invalid UTF-8" in (caught.value.details() or "")
    count = await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id)
    assert count == 1


async def test_a_nul_character_is_invalid_argument_naming_the_field(mesh: Mesh, account_id: str) -> None:
    # PostgreSQL cannot store U+0000 (text nor jsonb): refused up front, never INTERNAL.
    await seed(mesh, account_id)
    named = event(account_id, recipient_user_ids=["ana"])
    named.object.display_name = "Big\x00deal"
    error = await refused(publish(mesh, named))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event.object.display_name contains a NUL character" in (error.details() or "")
    in_variables = event(account_id, recipient_user_ids=["ana"])
    in_variables.variables.update({"amount": 0, "stage": {"name": "wo\x00n"}})
    good = event(account_id, recipient_user_ids=["ana"])
    good.variables.update({"amount": 0})  # zero bytes in the encoding, no NUL character
    answer = await mesh.dispatcher.PublishBatch(pb.PublishBatchRequest(events=[in_variables, good]))
    first, second = answer.statuses
    assert first.outcome == pb.OUTCOME_REJECTED and first.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "event.variables['stage']['name'] contains a NUL character" in first.message
    assert second.outcome == pb.OUTCOME_ACCEPTED
    count = await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id)
    assert count == 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


async def test_replay_is_answered_even_when_the_event_could_not_be_planned_any_more(
    mesh: Mesh, account_id: str
) -> None:
    await seed(mesh, account_id)
    ev = event(account_id, recipient_user_ids=["ana"])
    first = await publish(mesh, ev)
    await mesh.directory.UpsertUser(
        directory_pb2.UpsertUserRequest(
            user=directory_pb2.User(account_id=account_id, user_id="ana", email="ana@example.test", active=False)
        )
    )
    again = await publish(mesh, ev)
    assert again.replayed and again.notification_id == first.notification_id
    # A new event naming her is accepted; fan-out records that she is no longer a member.
    fresh = await publish(mesh, event(account_id, recipient_user_ids=["ana"]))
    found = await mesh.dispatcher.GetNotification(
        pb.GetNotificationRequest(account_id=account_id, notification_id=fresh.notification_id)
    )
    assert [(r.user_id, r.reason) for r in found.notification.recipients] == [("ana", "not_an_active_member")]


async def test_events_published_metric_counts_each_outcome(mesh: Mesh, account_id: str) -> None:
    from prometheus_client import REGISTRY

    def sample(outcome: str) -> float:
        return REGISTRY.get_sample_value("belfry_events_published_total", {"outcome": outcome}) or 0.0

    await seed(mesh, account_id)
    before = {o: sample(o) for o in ("accepted", "replayed", "rejected")}
    ev = event(account_id, recipient_user_ids=["ana"])
    await mesh.dispatcher.PublishBatch(
        pb.PublishBatchRequest(events=[ev, ev, event(account_id, topic="deals.ghost", recipient_user_ids=["ana"])])
    )
    assert {o: sample(o) - before[o] for o in before} == {"accepted": 1, "replayed": 1, "rejected": 1}
