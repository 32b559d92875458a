"""Fan-out workers on the smallest pool they accept: everything is fanned out and the service stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
import structlog
from belfry import rpc, service
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.config import AccountRange
from belfry.errors import ConfigError
from belfry.preferences import Preferences

from services.dispatcher.backpressure import Backpressure
from services.dispatcher.fanout import Fanout
from services.dispatcher.planning import Planner
from services.dispatcher.publish import Dispatcher
from services.dispatcher.server import build_for
from services.dispatcher.servicer import DispatcherServicer
from services.dispatcher.settings import Settings, load_settings
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


@dataclass
class Alone:
    """A dispatcher's parts on a database of their own, where no fan-out worker runs unless a test runs it."""

    pool: asyncpg.Pool
    settings: Settings
    planner: Planner
    pressure: Backpressure

    def fanout(self, accounts: AccountRange = AccountRange.ALL) -> Fanout:
        return Fanout(self.pool, self.planner, self.settings.fanout, accounts=accounts)

    def servicer(self, fanout: Fanout | None) -> DispatcherServicer:
        dispatcher = Dispatcher(self.pool, self.planner, self.pressure, fanout=fanout)
        return DispatcherServicer(dispatcher, self.pool, self.settings.limits, max_batch=1000)

    async def publish(self, servicer: DispatcherServicer, events: list[pb.Event]) -> None:
        answer = await servicer.PublishBatch(pb.PublishBatchRequest(events=events), context=None)
        assert all(s.outcome == pb.OUTCOME_ACCEPTED for s in answer.statuses)

    async def backlog(self) -> set[str]:
        return {r["account_id"] for r in await self.pool.fetch("select account_id from dispatcher.fanout")}


@contextlib.asynccontextmanager
async def alone(mesh: Mesh, admin_dsn: str, token_keys: dict[str, bytes], **env: str) -> AsyncIterator[Alone]:
    """The dispatcher's tables in a fresh database (the session's dispatcher runs fan-out workers on the
    shared one, which would take these events); the session's preferences service answers for the accounts."""
    settings = load_settings(
        common_env(
            mesh.database_url,
            token_keys,
            identity="dispatcher",
            BELFRY_PREFERENCES_ADDRESS=mesh.preferences_address,
            **env,
        )
    )
    async with (
        fresh_database(admin_dsn) as url,
        open_pool(url) as pool,
        rpc.connect(settings.preferences_address, settings.common.tls) as channel,
    ):
        planner = Planner(pool, Preferences(channel, field_prefix="event."))
        yield Alone(pool, settings, planner, Backpressure(pool, settings.backpressure))


async def test_a_publishing_call_fans_out_what_it_accepted_while_fan_out_lags(
    mesh: Mesh, account_id: str, admin_dsn: str, token_keys: dict[str, bytes]
) -> None:
    """While fan-out lags, a call answers only once it has fanned out as many events as it accepted (any
    account's, oldest first); below the lag it answers at once and leaves its events to the workers."""
    await seed(mesh, account_id)
    async with alone(mesh, admin_dsn, token_keys, BELFRY_DISPATCHER_FANOUT_ASSIST_LAG_SECONDS="0.5") as world:
        fanout = world.fanout()  # never run: only publishing calls fan out here
        servicer = world.servicer(fanout)
        pressure = world.pressure

        def events(count: int) -> list[pb.Event]:
            return [event(account_id, recipient_user_ids=["ana"]) for _ in range(count)]

        async def waiting() -> int:
            return int(await world.pool.fetchval("select count(*) from dispatcher.fanout"))

        await pressure.refresh()
        await world.publish(servicer, events(5))  # no lag yet: answered at once, left to the workers
        assert await waiting() == 5
        await asyncio.sleep(0.6)
        await pressure.refresh()
        assert pressure.fanout_lag >= 0.5
        # Fans out 450 or more: 3 steps of 200, the older 5 included, until the backlog is empty.
        await world.publish(servicer, events(450))
        assert await waiting() == 0
        told = await world.pool.fetchval("select count(*) from queue.deliveries where account_id = $1", account_id)
        assert told >= 455  # each event's deliveries (ana's channels) are written


async def test_fan_out_bound_to_an_account_range_takes_only_those_accounts_events(
    mesh: Mesh, account_id: str, admin_dsn: str, token_keys: dict[str, bytes]
) -> None:
    accounts = [f"{account_id}_{s}" for s in "abcd"]
    for a in accounts:
        await seed(mesh, a)
    async with alone(mesh, admin_dsn, token_keys) as world:
        await world.publish(
            world.servicer(None), [event(a, recipient_user_ids=["ana"]) for a in accounts for _ in range(3)]
        )
        low = world.fanout(AccountRange("", accounts[2]))
        high = world.fanout(AccountRange(accounts[2], ""))
        assert await low.step() == 6
        assert await world.backlog() == set(accounts[2:])  # the other range's events are left to its workers
        assert await low.step() == 0
        assert await high.step() == 6
        assert await world.backlog() == set()
        told = await world.pool.fetch("select distinct account_id from queue.deliveries")
        assert {r["account_id"] for r in told} == set(accounts)


async def test_a_replica_without_workers_accepts_and_leaves_the_fan_out_to_the_replicas_with_them(
    mesh: Mesh, account_id: str, admin_dsn: str, token_keys: dict[str, bytes]
) -> None:
    """``BELFRY_DISPATCHER_FANOUT_WORKERS=0``: producers' calls on one set of processes, fan-out on another."""
    await seed(mesh, account_id)
    async with fresh_database(admin_dsn) as url, open_pool(url) as pool:

        async def start(workers: str) -> service.Running:
            settings = load_settings(
                common_env(
                    url,
                    token_keys,
                    identity="dispatcher",
                    BELFRY_PREFERENCES_ADDRESS=mesh.preferences_address,
                    BELFRY_DISPATCHER_FANOUT_WORKERS=workers,
                )
            )
            return await service.start("dispatcher", settings.common, build_for(settings))

        accepting = await start("0")
        try:
            async with rpc.connect(f"127.0.0.1:{accepting.port}", NO_TLS) as channel:
                stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
                events = [event(account_id, recipient_user_ids=["ana", "ben"]) for _ in range(30)]
                answer = await stub.PublishBatch(pb.PublishBatchRequest(events=events))
                assert all(s.outcome == pb.OUTCOME_ACCEPTED for s in answer.statuses)
                single = await stub.Publish(pb.PublishRequest(event=event(account_id, recipient_user_ids=["ana"])))
                assert single.notification_id
            await asyncio.sleep(1.5)  # past the fan-out poll: a worker here would have claimed them
            assert await pool.fetchval("select count(*) from dispatcher.fanout") == 31
            assert await pool.fetchval("select count(*) from queue.deliveries") == 0
            fanning = await start("1")
            try:
                await asyncio.wait_for(fanned_out(pool, account_id), 60)
            finally:
                await fanning.stop(0.1)
            told = await pool.fetchval(
                "select count(*) from dispatcher.recipients where account_id = $1 and state = 'accepted'", account_id
            )
            assert told == 30 * 2 + 1
        finally:
            await accepting.stop(0.1)
