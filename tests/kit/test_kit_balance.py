"""Balanced channels (``belfry.balance``): calls spread over every replica and go on when one is killed.

Three preferences replicas run as real processes on ports of their own; the
client's target names all three (``ipv4:127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3``,
what ``dns:///preferences:50051`` resolves to on a headless Service). Which
replica answered is read from each one's metrics endpoint, as Prometheus
sees them. Calls carry no credentials: each replica's application answers
them (UNAUTHENTICATED), which shows where they went without depending on the
caller's permissions.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from belfry import client, rpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.config import TlsSettings
from prometheus_client import parser

from tests.conftest import common_env
from tests.faults.processes import ServiceProcess

METHOD = "/belfry.api.preferences.v1.PreferencesService/ListTopics"
REPLICAS = 3
_WITHIN = 60.0  # a bound so a broken channel fails the test instead of hanging it


def _env(database_url: str, token_keys: dict[str, bytes]) -> dict[str, str]:
    return {
        **os.environ,
        **common_env(database_url, token_keys),
        "BELFRY_METRICS_ADDRESS": "127.0.0.1:0",
        "BELFRY_LOG_JSON": "true",
        "BELFRY_LOG_LEVEL": "info",
    }


@pytest.fixture(scope="module")
async def replicas(database_url: str, token_keys: dict[str, bytes]) -> AsyncIterator[list[ServiceProcess]]:
    """Three preferences processes on one database, each with its own gRPC and metrics port."""
    env = _env(database_url, token_keys)
    started = list(await asyncio.gather(*(ServiceProcess.start("preferences", env) for _ in range(REPLICAS))))
    try:
        yield started
    finally:
        for replica in started:
            await replica.stop(30)


@pytest.fixture
async def doomed(database_url: str, token_keys: dict[str, bytes]) -> AsyncIterator[ServiceProcess]:
    """One more replica, for a test to kill (the module's three stay up for the others)."""
    replica = await ServiceProcess.start("preferences", _env(database_url, token_keys))
    try:
        yield replica
    finally:
        await replica.stop(30)


def _target(replicas: list[ServiceProcess]) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)


def _metrics_port(replica: ServiceProcess) -> int:
    for line in list(replica.lines):
        if line.startswith("{") and (record := json.loads(line)).get("event") == "serving":
            return int(record["metrics_port"])
    raise AssertionError(f"no serving line:\n{replica.tail()}")


def _answered(replica: ServiceProcess) -> float:
    """ListTopics calls the replica's own metrics endpoint counts."""
    url = f"http://127.0.0.1:{_metrics_port(replica)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return sum(
        sample.value
        for family in parser.text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "belfry_rpc_requests_total" and sample.labels["method"] == METHOD
    )


async def _counts(replicas: list[ServiceProcess], expected: float) -> list[float]:
    """Every replica's count once they add up to ``expected`` (a refusal reaches the client before it is counted)."""
    while sum(counts := [_answered(r) for r in replicas]) < expected:  # noqa: ASYNC110 - other processes' counters
        await asyncio.sleep(0.01)
    return counts


async def _call(channel: grpc.aio.Channel) -> None:
    stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListTopics(preferences_pb2.ListTopicsRequest(), timeout=_WITHIN)
    # A replica's application answered (no credentials: refused), not the transport.
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value


async def _reaches_every_replica(channel: grpc.aio.Channel, replicas: list[ServiceProcess]) -> int:
    """Call until every replica answered once (its connection is up); return the calls made."""
    before = [_answered(r) for r in replicas]
    made = 0
    while True:
        await _call(channel)
        made += 1
        counts = await _counts(replicas, sum(before) + made)
        if all(now > then for now, then in zip(counts, before, strict=True)):
            return made


Connect = Callable[[str], grpc.aio.Channel]
CONNECTS: dict[str, Connect] = {
    "kit": lambda target: rpc.connect(target, TlsSettings(None, None, None)),  # service to service
    "producer": client.connect,  # the producer client library
}


@pytest.mark.parametrize("how", sorted(CONNECTS))
async def test_calls_go_round_robin_over_every_replica(how: str, replicas: list[ServiceProcess]) -> None:
    channel = CONNECTS[how](_target(replicas))
    try:
        await asyncio.wait_for(_reaches_every_replica(channel, replicas), _WITHIN)
        before = [_answered(r) for r in replicas]
        rounds = 10
        for _ in range(rounds * REPLICAS):  # one at a time: round robin takes the replicas in turn
            await _call(channel)
        after = await asyncio.wait_for(_counts(replicas, sum(before) + rounds * REPLICAS), _WITHIN)
        assert [now - then for now, then in zip(after, before, strict=True)] == [rounds] * REPLICAS
    finally:
        await channel.close()


async def test_calls_go_on_when_a_replica_is_killed(replicas: list[ServiceProcess], doomed: ServiceProcess) -> None:
    channel = rpc.connect(_target([doomed, *replicas]), TlsSettings(None, None, None))
    try:
        await asyncio.wait_for(_reaches_every_replica(channel, [doomed, *replicas]), _WITHIN)
        await doomed.kill()  # SIGKILL: no drain, no GOAWAY; the kernel closes its connections
        before = [_answered(r) for r in replicas]
        calls = 60
        for _ in range(calls):
            await _call(channel)  # every one answered by a survivor
        after = await asyncio.wait_for(_counts(replicas, sum(before) + calls), _WITHIN)
        assert all(now > then for now, then in zip(after, before, strict=True))
        await asyncio.gather(*(_call(channel) for _ in range(calls)))  # concurrently too
    finally:
        await channel.close()
