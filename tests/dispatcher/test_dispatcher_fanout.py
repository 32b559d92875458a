"""Fan-out workers on the smallest pool they accept: everything is fanned out and the service stops cleanly."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from belfry import rpc, service
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.errors import ConfigError
from belfry.preferences import Preferences

from services.dispatcher.backpressure import Backpressure
from services.dispatcher.fanout import Fanout
from services.dispatcher.planning import Planner
from services.dispatcher.publish import Dispatcher
from services.dispatcher.server import build_for
from services.dispatcher.servicer import DispatcherServicer
from services.dispatcher.settings import load_settings
from tests.conftest import common_env, fanned_out, fresh_database, open_pool
from tests.dispatcher.conftest import NO_TLS, Mesh, event, seed


def test_a_pool_too_small_for_the_fan_out_workers_is_refused_at_start(
    database_url: str, token_keys: dict[str, bytes]
) -> None:
    env = common_env(database_url, token_keys, BELFRY_DB_POOL_MAX="4", BELFRY_DISPATCHER_FANOUT_WORKERS="3")
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert "BELFRY_DB_POOL_MAX=4" in info.value.message and "at least 5" in info.value.message


async def test_workers_on_the_smallest_pool_fan_out_a_backlog_of_many_accounts_and_stop(
    mesh: Mesh, account_id: str, token_keys: dict[str, bytes]
) -> None:
    accounts = [f"{account_id}_{i}" for i in range(6)]
    for account in accounts:
        await seed(mesh, account)
    settings = load_settings(
        common_env(
            mesh.database_url,
            token_keys,
            identity="dispatcher",
            BELFRY_PREFERENCES_ADDRESS=mesh.preferences_address,
            BELFRY_DB_POOL_MAX="4",
            BELFRY_DISPATCHER_FANOUT_WORKERS="2",
            BELFRY_DISPATCHER_FANOUT_BATCH="20",
        )
    )
    running = await service.start("dispatcher", settings.common, build_for(settings))
    try:
        async with rpc.connect(f"127.0.0.1:{running.port}", NO_TLS) as channel:
            stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
            # Planning reads (mutes, followers) happen while each worker holds its transaction:
            # they must not wait for a second connection from this small pool.
            events = [
                event(a, recipient_user_ids=["ana", "ben"], include_followers=True) for a in accounts for _ in range(40)
            ]
            answer = await stub.PublishBatch(pb.PublishBatchRequest(events=events))
            assert all(s.outcome == pb.OUTCOME_ACCEPTED for s in answer.statuses)
            await asyncio.wait_for(fanned_out(mesh.pool, account_id), 120)
    finally:
        await asyncio.wait_for(running.stop(0.1), 60)
    told = await mesh.pool.fetchval(
        "select count(*) from dispatcher.recipients where account_id like $1 || '_%' and state = 'accepted'", account_id
    )
    assert told == len(accounts) * 40 * 2


async def test_workers_sharing_a_process_never_claim_one_event_twice(
    mesh: Mesh, account_id: str, token_keys: dict[str, bytes]
) -> None:
    """Two workers of one process move a shared round-robin cursor; a trickle of small batches (each claim finds
    fewer rows than a batch, so it wraps around) must never hand one transaction the same event twice."""
    accounts = [f"{account_id}_{i}" for i in range(3)]
    for account in accounts:
        await seed(mesh, account)
    settings = load_settings(
        common_env(
            mesh.database_url,
            token_keys,
            identity="dispatcher",
            BELFRY_PREFERENCES_ADDRESS=mesh.preferences_address,
            BELFRY_DISPATCHER_FANOUT_WORKERS="2",
            BELFRY_DISPATCHER_FANOUT_BATCH="50",
        )
    )
    with structlog.testing.capture_logs() as logs:
        running = await service.start("dispatcher", settings.common, build_for(settings))
        try:
            async with rpc.connect(f"127.0.0.1:{running.port}", NO_TLS) as channel:
                stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
                for _ in range(60):
                    events = [event(a, recipient_user_ids=["ana"]) for a in accounts for _ in range(2)]
                    await asyncio.gather(*(stub.PublishBatch(pb.PublishBatchRequest(events=[e])) for e in events))
                for account in accounts:
                    await asyncio.wait_for(fanned_out(mesh.pool, account), 120)
        finally:
            await asyncio.wait_for(running.stop(0.1), 60)
    failures = [e for e in logs if e.get("log_level") == "error"]
    assert failures == []
    told = await mesh.pool.fetchval(
        "select count(*) from dispatcher.recipients where account_id like $1 || '_%' and state = 'accepted'", account_id
    )
    assert told == len(accounts) * 2 * 60


async def test_a_publishing_call_fans_out_what_it_accepted_while_fan_out_lags(
    mesh: Mesh, account_id: str, admin_dsn: str, token_keys: dict[str, bytes]
) -> None:
    """While fan-out lags, a call answers only once it has fanned out as many events as it accepted (any
    account's, oldest first); below the lag it answers at once and leaves its events to the workers."""
    await seed(mesh, account_id)
    settings = load_settings(
        common_env(
            mesh.database_url,
            token_keys,
            identity="dispatcher",
            BELFRY_PREFERENCES_ADDRESS=mesh.preferences_address,
            BELFRY_DISPATCHER_FANOUT_ASSIST_LAG_SECONDS="0.5",
        )
    )
    # The dispatcher's tables in a database of their own, where no fan-out worker runs (the session's
    # dispatcher runs some on the shared one): only the publishing call itself can fan these events out.
    # The session's preferences service answers for the account.
    async with (
        fresh_database(admin_dsn) as url,
        open_pool(url) as pool,
        rpc.connect(settings.preferences_address, settings.common.tls) as channel,
    ):
        planner = Planner(pool, Preferences(channel, field_prefix="event."))
        pressure = Backpressure(pool, settings.backpressure)
        fanout = Fanout(pool, planner, settings.fanout, workers=settings.fanout_workers)  # never run
        servicer = DispatcherServicer(
            Dispatcher(pool, planner, pressure, fanout=fanout), pool, settings.limits, max_batch=1000
        )

        async def publish(count: int) -> None:
            events = [event(account_id, recipient_user_ids=["ana"]) for _ in range(count)]
            answer = await servicer.PublishBatch(pb.PublishBatchRequest(events=events), context=None)
            assert all(s.outcome == pb.OUTCOME_ACCEPTED for s in answer.statuses)

        async def backlog() -> int:
            return int(await pool.fetchval("select count(*) from dispatcher.fanout"))

        await pressure.refresh()
        await publish(5)  # no lag yet: answered at once, left to the workers
        assert await backlog() == 5
        await asyncio.sleep(0.6)
        await pressure.refresh()
        assert pressure.fanout_lag >= 0.5
        await publish(450)  # fans out 450 or more: 3 steps of 200, the older 5 included, until the backlog is empty
        assert await backlog() == 0
        told = await pool.fetchval("select count(*) from queue.deliveries where account_id = $1", account_id)
        assert told >= 455  # each event's deliveries (ana's channels) are written
