"""The producer client library against the real dispatcher."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from belfry import rpc, service
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.client import Publisher, Retries
from prometheus_client import REGISTRY

from services.dispatcher.server import build_for
from services.dispatcher.settings import load_settings
from tests.conftest import common_env
from tests.dispatcher.conftest import NO_TLS, Mesh, event, seed


@pytest.fixture
async def publisher(mesh: Mesh) -> AsyncIterator[Publisher]:
    channel = rpc.connect(f"127.0.0.1:{mesh.dispatcher_port}", NO_TLS)
    yield Publisher(channel)
    await channel.close()


async def test_publish_fills_key_and_time_so_a_retry_is_a_replay(
    mesh: Mesh, account_id: str, publisher: Publisher
) -> None:
    await seed(mesh, account_id)
    ev = event(account_id, recipient_user_ids=["ana"], idempotency_key="")
    ev.ClearField("occurred_at")
    first = await publisher.publish(ev)
    assert first.notification_id and not first.replayed
    key = await mesh.pool.fetchval(
        "select idempotency_key from dispatcher.notifications where account_id = $1", account_id
    )
    assert len(key) == 32


async def test_publish_batch_splits_and_keeps_input_order(mesh: Mesh, account_id: str, publisher: Publisher) -> None:
    await seed(mesh, account_id)
    events = [event(account_id, recipient_user_ids=["ana"]) for _ in range(1205)]
    events[1100] = event(account_id, topic="deals.ghost", recipient_user_ids=["ana"])  # unknown topic
    statuses = await publisher.publish_batch(events)
    assert [s.index for s in statuses] == list(range(1205))
    assert statuses[1100].outcome == pb.OUTCOME_REJECTED
    assert sum(s.outcome == pb.OUTCOME_ACCEPTED for s in statuses) == 1204


async def test_stream_yields_every_event_with_its_status(mesh: Mesh, account_id: str) -> None:
    await seed(mesh, account_id)
    channel = rpc.connect(f"127.0.0.1:{mesh.dispatcher_port}", NO_TLS)
    small_window = Publisher(channel, window=8)  # fewer in flight than events: the window must turn

    async def source() -> AsyncIterator[pb.Event]:
        for _ in range(100):
            yield event(account_id, recipient_user_ids=["ana"])

    results = [item async for item in small_window.stream(source())]
    await channel.close()
    assert len(results) == 100
    assert len({s.notification_id for _, s in results}) == 100
    assert all(s.outcome == pb.OUTCOME_ACCEPTED for _, s in results)


async def _dispatcher(mesh: Mesh, token_keys: dict[str, bytes], **env: str) -> service.Running:
    settings = load_settings(
        common_env(
            mesh.database_url,
            token_keys,
            identity="dispatcher",
            BELFRY_PREFERENCES_ADDRESS=mesh.preferences_address,
            **env,
        )
    )
    return await service.start("dispatcher", settings.common, build_for(settings))


async def test_resource_exhausted_is_retried_no_sooner_than_the_hint(
    mesh: Mesh, account_id: str, token_keys: dict[str, bytes]
) -> None:
    await seed(mesh, account_id)
    running = await _dispatcher(
        mesh, token_keys, BELFRY_DISPATCHER_ACCOUNT_RATE="0.001", BELFRY_DISPATCHER_ACCOUNT_BURST="1"
    )
    channel = rpc.connect(f"127.0.0.1:{running.port}", NO_TLS)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    client = Publisher(channel, retries=Retries(attempts=4), sleep=sleep)
    await client.publish(event(account_id, recipient_user_ids=["ana"]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.publish(event(account_id, recipient_user_ids=["ana"]))
    await channel.close()
    await running.stop(0.1)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(waits) == 3
    assert all(w >= 900 for w in waits)  # the server said: one event per 1,000 s


async def test_batch_events_refused_for_rate_are_sent_again(
    mesh: Mesh, account_id: str, token_keys: dict[str, bytes]
) -> None:
    await seed(mesh, account_id)
    running = await _dispatcher(
        mesh, token_keys, BELFRY_DISPATCHER_ACCOUNT_RATE="200", BELFRY_DISPATCHER_ACCOUNT_BURST="3"
    )
    channel = rpc.connect(f"127.0.0.1:{running.port}", NO_TLS)
    client = Publisher(channel, retries=Retries(attempts=50, base=0.001, cap=0.01))
    statuses = await client.publish_batch([event(account_id, recipient_user_ids=["ana"]) for _ in range(10)])
    await channel.close()
    await running.stop(0.1)
    assert all(s.outcome == pb.OUTCOME_ACCEPTED for s in statuses)
    assert (
        await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id)
        == 10
    )


async def test_unavailable_is_retried_until_the_dispatcher_is_up(
    mesh: Mesh, account_id: str, token_keys: dict[str, bytes]
) -> None:
    await seed(mesh, account_id)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started: list[service.Running] = []

    channel = rpc.connect(f"127.0.0.1:{port}", NO_TLS)

    async def sleep(seconds: float) -> None:
        if not started:  # the first backoff: the dispatcher comes up meanwhile
            started.append(await _dispatcher(mesh, token_keys, BELFRY_GRPC_ADDRESS=f"127.0.0.1:{port}"))
            # Skip the channel's own reconnect backoff (a real backoff sleeps through it).
            await asyncio.wait_for(channel.channel_ready(), 10)

    client = Publisher(channel, sleep=sleep, deadline=5)
    answer = await client.publish(event(account_id, recipient_user_ids=["ana"]))
    await channel.close()
    await started[0].stop(0.1)
    assert answer.notification_id and started


async def test_a_broken_stream_is_resumed_and_nothing_is_lost_or_doubled(
    mesh: Mesh, account_id: str, token_keys: dict[str, bytes]
) -> None:
    await seed(mesh, account_id)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    servers = [await _dispatcher(mesh, token_keys, BELFRY_GRPC_ADDRESS=address)]
    channel = rpc.connect(address, NO_TLS)

    async def sleep(seconds: float) -> None:
        # The backoff after the break: a replacement dispatcher comes up on the same address.
        servers.append(await _dispatcher(mesh, token_keys, BELFRY_GRPC_ADDRESS=address))
        await asyncio.wait_for(channel.channel_ready(), 10)

    client = Publisher(channel, window=10, sleep=sleep)
    events = [event(account_id, recipient_user_ids=["ana"]) for _ in range(60)]

    async def source() -> AsyncIterator[pb.Event]:
        for i, ev in enumerate(events):
            if i == 30:
                await servers[0].stop(0)  # the dispatcher goes away mid-stream
            yield ev

    results = [item async for item in client.stream(source())]
    await channel.close()
    for running in servers[1:]:
        await running.stop(0.1)
    assert len(servers) == 2  # exactly one break, one resume
    assert sorted(e.idempotency_key for e, _ in results) == sorted(e.idempotency_key for e in events)
    assert all(s.outcome in {pb.OUTCOME_ACCEPTED, pb.OUTCOME_REPLAYED} for _, s in results)
    count = await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id)
    assert count == 60


def _calls(method: str) -> float:
    """RPCs the in-process dispatcher has answered for ``method`` (its own request counter)."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "belfry_rpc_requests"
        for sample in family.samples
        if sample.name == "belfry_rpc_requests_total"
        and sample.labels.get("method") == f"/belfry.api.dispatcher.v1.DispatcherService/{method}"
    )


async def test_concurrent_submits_go_together_and_each_gets_its_own_status(
    mesh: Mesh, account_id: str, publisher: Publisher
) -> None:
    await seed(mesh, account_id)
    batches, singles = _calls("PublishBatch"), _calls("Publish")
    events = [event(account_id, recipient_user_ids=["ana"]) for _ in range(200)]
    events[17] = event(account_id, topic="deals.ghost", recipient_user_ids=["ana"])  # unknown topic
    statuses = await asyncio.gather(*(publisher.submit(e) for e in events))
    assert statuses[17].outcome == pb.OUTCOME_REJECTED
    assert statuses[17].code == grpc.StatusCode.NOT_FOUND.value[0] and "deals.ghost" in statuses[17].message
    accepted = [s for i, s in enumerate(statuses) if i != 17]
    assert all(s.outcome == pb.OUTCOME_ACCEPTED and s.notification_id for s in accepted)
    assert len({s.notification_id for s in accepted}) == 199
    stored = await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id)
    assert stored == 199
    # Gathered: a few batch calls (at most ``gatherings`` at once), no single Publish.
    assert 1 <= _calls("PublishBatch") - batches < 200
    assert _calls("Publish") == singles
