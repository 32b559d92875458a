"""Background work never stops a service: failing loops restart with backoff, readiness follows the database."""

from __future__ import annotations

import asyncio

import asyncpg
from belfry import background, service
from belfry.config import Env, load_common
from grpc_health.v1 import health_pb2

from tests.conftest import common_env


async def test_a_periodic_job_that_fails_is_retried_and_keeps_its_period() -> None:
    runs: list[str] = []
    stop = asyncio.Event()

    async def job() -> None:
        runs.append("run")
        if len(runs) <= 2:
            raise RuntimeError("the database is restarting")
        if len(runs) == 4:
            stop.set()

    await asyncio.wait_for(background.every("test job", 0.01, job, stop, backoff=background.Backoff(base=0.01)), 30)
    assert len(runs) == 4  # two failures, then the job went on running on its period


async def test_a_crashing_loop_is_restarted_and_the_service_keeps_serving(
    database_url: str, token_keys: dict[str, bytes]
) -> None:
    env = Env(common_env(database_url, token_keys))
    common = load_common("test", env, default_port=0)
    env.check()
    starts: list[int] = []
    third = asyncio.Event()

    async def flaky(stop: asyncio.Event) -> None:
        starts.append(len(starts))
        if len(starts) < 3:
            raise ConnectionResetError("peer reset the connection")
        third.set()
        await stop.wait()

    async def build(_pool: asyncpg.Pool) -> service.Built:
        return service.Built(background=[flaky])

    running = await service.start("test", common, build)
    try:
        await asyncio.wait_for(third.wait(), timeout=30)
        assert not running.stop_event.is_set()
        status = await running.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.stop(0)
    assert starts == [0, 1, 2]
