"""The operator API over real gRPC: status counts, open windows, input validation."""

from __future__ import annotations

import grpc
import pytest
from belfry.api.batching.v1 import batching_pb2

from tests.batching.conftest import World


async def test_open_windows_are_listed_with_their_objects(world: World, tenant: str) -> None:
    running = await world.start_replica()
    stub = world.stub(running)
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "1"))
    await world.handoff(tenant, "ana", world.assignment(tenant, "ana", "2"))
    await world.handoff(tenant, "bob", world.assignment(tenant, "bob", "3", object_type="deal"))
    await world.until(lambda: world.handled(tenant), "handoffs applied")

    listed = await stub.ListOpenWindows(batching_pb2.ListOpenWindowsRequest(account_id=tenant))
    assert sorted((w.user_id, w.object_type, tuple(w.object_ids)) for w in listed.windows) == [
        ("ana", "contact", ("1", "2")),
        ("bob", "deal", ("3",)),
    ]
    window = listed.windows[0]
    assert window.closes_at.ToDatetime() > window.opened_at.ToDatetime()
    only_bob = await stub.ListOpenWindows(batching_pb2.ListOpenWindowsRequest(account_id=tenant, user_id="bob"))
    assert [w.user_id for w in only_bob.windows] == ["bob"]
    status = await stub.GetStatus(batching_pb2.GetStatusRequest(account_id=tenant))
    assert (status.open_windows, status.windows_retrying, status.held_deliveries) == (2, 0, 0)
    assert not status.HasField("oldest_due_window")

    world.clock.advance(301)
    await world.until(lambda: world.windows_settled(tenant), "windows closed")
    assert (await stub.ListOpenWindows(batching_pb2.ListOpenWindowsRequest(account_id=tenant))).windows == []
    assert (await stub.GetStatus(batching_pb2.GetStatusRequest(account_id=tenant))).open_windows == 0


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (batching_pb2.ListOpenWindowsRequest(), "account_id"),
        (batching_pb2.ListOpenWindowsRequest(account_id="a", limit=-1), "limit"),
        (batching_pb2.ListOpenWindowsRequest(account_id="a", limit=5000), "limit"),
    ],
)
async def test_bad_requests_are_refused_with_the_field_named(
    world: World, request_: batching_pb2.ListOpenWindowsRequest, field: str
) -> None:
    stub = world.stub(await world.start_replica())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOpenWindows(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")
