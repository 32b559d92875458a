"""Limits that hold across replicas and spare the other tenants (issue 17, section 3).

An account's publish quota is one budget whoever serves the call; when the
backlog passes its limit the account flooding it is refused, not everyone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from belfry import rpc, service
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.queue import NewDelivery, enqueue

from services.dispatcher.server import build_for
from services.dispatcher.settings import load_settings
from services.preferences.server import build_for as preferences_build_for
from services.preferences.settings import load_settings as preferences_settings
from tests.conftest import common_env, fresh_database, open_pool
from tests.dispatcher.conftest import NO_TLS, Mesh, event, refused, seed


@contextlib.asynccontextmanager
async def dispatcher(
    database_url: str, token_keys: dict[str, bytes], preferences: str, **env: str
) -> AsyncIterator[dispatcher_pb2_grpc.DispatcherServiceStub]:
    """One dispatcher replica with ``env``."""
    settings = load_settings(
        common_env(database_url, token_keys, identity="dispatcher", BELFRY_PREFERENCES_ADDRESS=preferences, **env)
    )
    running = await service.start("dispatcher", settings.common, build_for(settings))
    channel = rpc.connect(f"127.0.0.1:{running.port}", NO_TLS)
    try:
        yield dispatcher_pb2_grpc.DispatcherServiceStub(channel)
    finally:
        await channel.close()
        await running.stop(0.1)


async def test_an_accounts_quota_is_shared_by_every_replica(
    mesh: Mesh, account_id: str, token_keys: dict[str, bytes]
) -> None:
    await seed(mesh, account_id)
    limits = {"BELFRY_DISPATCHER_ACCOUNT_RATE": "0.001", "BELFRY_DISPATCHER_ACCOUNT_BURST": "3"}
    async with (
        dispatcher(mesh.database_url, token_keys, mesh.preferences_address, **limits) as first,
        dispatcher(mesh.database_url, token_keys, mesh.preferences_address, **limits) as second,
    ):
        # Two events through each replica: three fit the account's one budget.
        outcomes = []
        for stub in (first, second):
            batch = pb.PublishBatchRequest(events=[event(account_id, recipient_user_ids=["ana"]) for _ in range(2)])
            outcomes += [s.outcome for s in (await stub.PublishBatch(batch)).statuses]
        assert outcomes == [pb.OUTCOME_ACCEPTED] * 3 + [pb.OUTCOME_REJECTED]
        accepted = await mesh.pool.fetchval(
            "select count(*) from dispatcher.notifications where account_id = $1", account_id
        )
        assert accepted == 3
        error = await refused(first.Publish(pb.PublishRequest(event=event(account_id, recipient_user_ids=["ana"]))))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "faster than its limit" in (error.details() or "")
        # Another account has a budget of its own.
        other = account_id + "x"
        await seed(mesh, other)
        assert (await second.Publish(pb.PublishRequest(event=event(other, recipient_user_ids=["ana"])))).notification_id


@pytest.fixture
async def alone(admin_dsn: str, token_keys: dict[str, bytes]) -> AsyncIterator[tuple[str, asyncpg.Pool, str]]:
    """A database of its own (the backlog is this test's alone) with the preferences service on it."""
    async with fresh_database(admin_dsn) as url, open_pool(url) as pool:
        settings = preferences_settings(common_env(url, token_keys))
        prefs = await service.start("preferences", settings.common, preferences_build_for(settings))
        try:
            yield url, pool, f"127.0.0.1:{prefs.port}"
        finally:
            await prefs.stop(0.1)


async def _account(address: str, account_id: str) -> None:
    channel = rpc.connect(address, NO_TLS)
    stub = directory_pb2_grpc.DirectoryServiceStub(channel)
    account = directory_pb2.Account(account_id=account_id, name="T", tier=directory_pb2.TIER_ENTERPRISE)
    await stub.UpsertAccount(directory_pb2.UpsertAccountRequest(account=account))
    user = directory_pb2.User(
        account_id=account_id,
        user_id="ana",
        email="ana@example.test",
        display_name="Ana",
        locale="en",
        time_zone="UTC",
        permission_set="sales",
        active=True,
    )
    await stub.UpsertUser(directory_pb2.UpsertUserRequest(user=user))
    await channel.close()


async def _backlog(pool: asyncpg.Pool, account_id: str, count: int) -> None:
    """``count`` due deliveries of the account on a channel no sender drains here."""
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    rows = [
        NewDelivery(account_id, uuid.uuid4(), "ana", "mobile", "deals.stage_changed", {}, expires) for _ in range(count)
    ]
    async with pool.acquire() as conn, conn.transaction():
        await enqueue(conn, rows)


async def test_a_flooding_account_is_refused_and_the_others_are_not(
    alone: tuple[str, asyncpg.Pool, str], token_keys: dict[str, bytes]
) -> None:
    url, pool, preferences = alone
    flood, quiet, small = (f"acc_{uuid.uuid4().hex[:8]}" for _ in range(3))
    for account in (flood, quiet, small):
        await _account(preferences, account)
    await _backlog(pool, flood, 150)  # over the limit of 100, and nearly all of it one account's
    await _backlog(pool, small, 5)
    async with dispatcher(url, token_keys, preferences, BELFRY_DISPATCHER_MAX_QUEUE_DEPTH="100") as stub:
        error = await refused(stub.Publish(pb.PublishRequest(event=event(flood, recipient_user_ids=["ana"]))))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "equal share" in (error.details() or "")
        # The tenants the flood is not theirs keep publishing, in one batch with the flood's events too.
        batch = pb.PublishBatchRequest(
            events=[event(account, recipient_user_ids=["ana"]) for account in (quiet, small, flood)]
        )
        statuses = (await stub.PublishBatch(batch)).statuses
        assert [s.outcome for s in statuses] == [pb.OUTCOME_ACCEPTED, pb.OUTCOME_ACCEPTED, pb.OUTCOME_REJECTED]
    # Past twice the limit every account is refused: the mesh as a whole is overloaded.
    await _backlog(pool, small, 100)
    async with dispatcher(url, token_keys, preferences, BELFRY_DISPATCHER_MAX_QUEUE_DEPTH="100") as stub:
        error = await refused(stub.Publish(pb.PublishRequest(event=event(quiet, recipient_user_ids=["ana"]))))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in (error.details() or "")
