"""Fan-out, a real dispatcher process, SIGKILLed again and again in the middle of large expansions.

Ten events of a thousand recipients each (10,000 expansions) are accepted,
then fanned out in chunks of a hundred while the dispatcher is killed each
time a chunk commits. The books afterwards: every candidate has exactly one
recipient record, every one told has deliveries, and nothing is left waiting.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg
from belfry import rpc
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc

from tests.conftest import client_tls, common_env, service_token
from tests.dispatcher.conftest import event
from tests.faults.processes import ServiceProcess

AUDIENCE = 1000  # an event names at most a thousand users
EVENTS = 10
CHUNK = 100
KILLS = 6


async def _seed(address: str, account_id: str) -> None:
    async with rpc.connect(address, client_tls()) as channel:
        directory = directory_pb2_grpc.DirectoryServiceStub(channel)
        await directory.UpsertAccount(
            directory_pb2.UpsertAccountRequest(
                account=directory_pb2.Account(account_id=account_id, name="Big", tier=directory_pb2.TIER_ENTERPRISE)
            )
        )
        gate = asyncio.Semaphore(32)

        async def user(i: int) -> None:
            async with gate:
                await directory.UpsertUser(
                    directory_pb2.UpsertUserRequest(
                        user=directory_pb2.User(
                            account_id=account_id,
                            user_id=f"u{i:05d}",
                            email=f"u{i:05d}@example.test",
                            display_name=f"User {i}",
                            locale="en",
                            time_zone="UTC",
                            permission_set="sales",
                            active=True,
                        )
                    )
                )

        await asyncio.gather(*(user(i) for i in range(AUDIENCE)))


async def _progress(pool: asyncpg.Pool, account_id: str, beyond: int) -> int:
    """Wait until more than ``beyond`` recipient records exist (a chunk committed); return the count."""
    query = "select count(*) from dispatcher.recipients where account_id = $1"
    while (n := await pool.fetchval(query, account_id)) <= beyond:  # noqa: ASYNC110 - progress shows only in the database
        await asyncio.sleep(0.01)
    return int(n)


async def test_sigkilled_fan_out_expands_every_large_audience_exactly_once(
    database_url: str, pool: asyncpg.Pool, token_keys: dict[str, bytes], account_id: str
) -> None:
    env = {**os.environ, **common_env(database_url, token_keys), "BELFRY_LOG_LEVEL": "warning"}
    preferences = await ServiceProcess.start("preferences", env)
    dispatcher: ServiceProcess | None = None
    try:
        address = f"127.0.0.1:{preferences.port}"
        await _seed(address, account_id)
        dispatcher_env = {
            **env,
            "BELFRY_PREFERENCES_ADDRESS": address,
            "BELFRY_SERVICE_TOKEN": service_token("dispatcher"),
            "BELFRY_DISPATCHER_FANOUT_CHUNK": str(CHUNK),
            "BELFRY_DISPATCHER_FANOUT_BATCH": "4",
            "BELFRY_DISPATCHER_FANOUT_WORKERS": "1",
        }
        dispatcher = await ServiceProcess.start("dispatcher", dispatcher_env)
        users = [f"u{i:05d}" for i in range(AUDIENCE)]
        async with rpc.connect(f"127.0.0.1:{dispatcher.port}", client_tls()) as channel:
            stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
            answer = await stub.PublishBatch(
                pb.PublishBatchRequest(events=[event(account_id, recipient_user_ids=users) for _ in range(EVENTS)])
            )
        assert all(s.outcome == pb.OUTCOME_ACCEPTED for s in answer.statuses)
        seen = 0
        for _ in range(KILLS):
            seen = await asyncio.wait_for(_progress(pool, account_id, seen), 120)
            await dispatcher.kill()  # most likely in the middle of the next chunk's transaction
            dispatcher = await ServiceProcess.start("dispatcher", dispatcher_env)
        assert seen < EVENTS * AUDIENCE, "the kills must land before the expansion ends"
        while await pool.fetchval("select count(*) from dispatcher.fanout where account_id = $1", account_id):  # noqa: ASYNC110 - the backlog is in the database
            await asyncio.sleep(0.05)
    finally:
        if dispatcher is not None:
            await dispatcher.stop()
        await preferences.stop()
    per_event = await pool.fetch(
        """select notification_id, count(*) as n, count(distinct user_id) as users
           from dispatcher.recipients where account_id = $1 group by notification_id""",
        account_id,
    )
    assert len(per_event) == EVENTS
    assert all(r["n"] == r["users"] == AUDIENCE for r in per_event)
    untold = await pool.fetchval(
        """select count(*) from dispatcher.recipients r
           where r.account_id = $1 and r.state = 'accepted' and not exists (
               select 1 from queue.deliveries d
               where d.account_id = r.account_id and d.notification_id = r.notification_id and d.user_id = r.user_id)""",
        account_id,
    )
    told = await pool.fetchval(
        "select count(*) from dispatcher.recipients where account_id = $1 and state = 'accepted'", account_id
    )
    assert told == EVENTS * AUDIENCE and untold == 0
