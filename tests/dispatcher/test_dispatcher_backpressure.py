"""Backpressure: a queue far behind, or an account over its rate, gets RESOURCE_EXHAUSTED with a hint."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from belfry import rpc, service
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.dispatcher.server import build_for
from services.dispatcher.settings import load_settings
from tests.conftest import common_env, fanned_out
from tests.dispatcher.conftest import NO_TLS, Mesh, event, refused, seed


async def _start(
    mesh: Mesh, token_keys: dict[str, bytes], **env: str
) -> AsyncIterator[dispatcher_pb2_grpc.DispatcherServiceStub]:
    settings = load_settings(
        common_env(
            mesh.database_url,
            token_keys,
            identity="dispatcher",
            BELFRY_PREFERENCES_ADDRESS=mesh.preferences_address,
            **env,
        )
    )
    running = await service.start("dispatcher", settings.common, build_for(settings))
    channel = rpc.connect(f"127.0.0.1:{running.port}", NO_TLS)
    yield dispatcher_pb2_grpc.DispatcherServiceStub(channel)
    await channel.close()
    await running.stop(0.1)


@pytest.fixture
async def limited(mesh: Mesh, token_keys: dict[str, bytes]) -> AsyncIterator[dispatcher_pb2_grpc.DispatcherServiceStub]:
    """A dispatcher allowing two events per account, then one per 1,000 seconds."""
    async for stub in _start(
        mesh, token_keys, BELFRY_DISPATCHER_ACCOUNT_RATE="0.001", BELFRY_DISPATCHER_ACCOUNT_BURST="2"
    ):
        yield stub


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError("no RetryInfo detail")


async def test_account_over_its_rate_is_told_when_to_come_back(
    mesh: Mesh, account_id: str, limited: dispatcher_pb2_grpc.DispatcherServiceStub
) -> None:
    await seed(mesh, account_id)
    batch = [event(account_id, recipient_user_ids=["ana"]) for _ in range(3)]
    answer = await limited.PublishBatch(pb.PublishBatchRequest(events=batch))
    assert [s.outcome for s in answer.statuses] == [pb.OUTCOME_ACCEPTED, pb.OUTCOME_ACCEPTED, pb.OUTCOME_REJECTED]
    last = answer.statuses[2]
    assert last.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert last.retry_after.ToTimedelta().total_seconds() > 0
    error = await refused(limited.Publish(pb.PublishRequest(event=event(account_id, recipient_user_ids=["ana"]))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay(error) > 0
    assert (
        await mesh.pool.fetchval("select count(*) from dispatcher.notifications where account_id = $1", account_id) == 2
    )
    # Another account has its own budget.
    other = account_id + "x"
    await seed(mesh, other)
    assert (await limited.Publish(pb.PublishRequest(event=event(other, recipient_user_ids=["ana"])))).notification_id


async def test_queue_far_behind_refuses_publishing(mesh: Mesh, account_id: str, token_keys: dict[str, bytes]) -> None:
    await seed(mesh, account_id)
    # Due deliveries wait (a hundred, so that senders other tests run cannot drain them first).
    await mesh.dispatcher.PublishBatch(
        pb.PublishBatchRequest(events=[event(account_id, recipient_user_ids=["ana"]) for _ in range(50)])
    )
    await fanned_out(mesh.pool, account_id)
    async for stub in _start(mesh, token_keys, BELFRY_DISPATCHER_MAX_QUEUE_DEPTH="1"):
        ev = event(account_id, recipient_user_ids=["ana"])
        error = await refused(stub.Publish(pb.PublishRequest(event=ev)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue" in (error.details() or "") and retry_delay(error) >= 1
        found = await mesh.pool.fetchval(
            "select count(*) from dispatcher.notifications where account_id = $1 and idempotency_key = $2",
            account_id,
            ev.idempotency_key,
        )
        assert found == 0


async def test_fan_out_far_behind_refuses_publishing(mesh: Mesh, account_id: str, token_keys: dict[str, bytes]) -> None:
    await seed(mesh, account_id)
    # An event accepted two minutes ago still waits for fan-out (held back: no worker may take it now).
    # Two minutes: past this replica's limit, within the shared mesh's default (other tests keep publishing).
    await mesh.pool.execute(
        """insert into dispatcher.fanout (account_id, notification_id, accepted_at, not_before)
           values ($1, gen_random_uuid(), now() - interval '2 minutes', now() + interval '1 hour')""",
        account_id,
    )
    try:
        async for stub in _start(mesh, token_keys, BELFRY_DISPATCHER_MAX_FANOUT_LAG_SECONDS="60"):
            error = await refused(stub.Publish(pb.PublishRequest(event=event(account_id, recipient_user_ids=["ana"]))))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "fan-out" in (error.details() or "") and retry_delay(error) >= 1
    finally:
        await mesh.pool.execute("delete from dispatcher.fanout where account_id = $1", account_id)
