"""``belfry up``'s supervisor: a child that dies is started again on its port; the others keep running."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
from belfry import rpc
from belfry.config import TlsSettings
from belfry.local import supervisor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import common_env


async def _serving(port: int) -> bool:
    async with rpc.connect(f"127.0.0.1:{port}", TlsSettings(None, None, None)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


async def test_a_killed_child_is_restarted_on_its_port_and_the_mesh_stops_cleanly(
    database_url: str, token_keys: dict[str, bytes]
) -> None:
    env = dict(os.environ)
    env.update(common_env(database_url, token_keys), BELFRY_LOG_LEVEL="warning")
    env["BELFRY_PREFERENCES_GRPC_ADDRESS"] = "127.0.0.1:0"
    children = await supervisor.start_mesh(env, ("preferences",))
    first = children[0]
    port = await first.ready
    stop = asyncio.Event()
    watching = asyncio.create_task(supervisor.supervise(children, stop))
    try:
        first.process.send_signal(signal.SIGKILL)
        while children[0] is first:  # noqa: ASYNC110 - the supervisor swaps the child in place
            await asyncio.sleep(0.05)
        again = children[0]
        assert again.process.pid != first.process.pid
        assert await asyncio.wait_for(again.ready, 60) == port
        assert await _serving(port)
    finally:
        stop.set()
        await asyncio.wait_for(watching, 30)
        await supervisor.stop_all(children, 15)
    assert children[0].process.returncode == 0  # stopped by SIGTERM, drained
