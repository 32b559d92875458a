"""A service as a pod of worker processes (``belfry.processes``): one port, a killed worker restarted, one drain.

The preferences service runs as a real process with ``BELFRY_PROCESSES=2``.
Each call goes over a connection of its own, so the kernel's SO_REUSEPORT
hash spreads them over the workers; which worker answered is read from the
per-process metric files (prometheus_client's multiprocess mode), and the
parent's metrics port must serve their sum. Calls carry no credentials: the
service itself answers them (UNAUTHENTICATED), which is all a worker needs to
show that it serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from belfry import processes
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from prometheus_client import multiprocess, parser

from tests.conftest import common_env
from tests.faults.processes import ServiceProcess

METHOD = "/belfry.api.preferences.v1.PreferencesService/ListTopics"
WORKERS = 2
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
_WITHIN = 60.0  # a bound so a broken pod fails the test instead of hanging it


@pytest.fixture
async def pod(database_url: str, token_keys: dict[str, bytes], tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """preferences as a pod of two workers, metrics in ``tmp_path/metrics``."""
    env = {
        **os.environ,
        **common_env(database_url, token_keys),
        "BELFRY_PROCESSES": str(WORKERS),
        "BELFRY_METRICS_ADDRESS": "127.0.0.1:0",
        "BELFRY_HEALTH_ADDRESS": "127.0.0.1:0",
        "BELFRY_LOG_JSON": "true",
        "BELFRY_LOG_LEVEL": "info",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    parent = await ServiceProcess.start("preferences", env)
    try:
        yield parent
    finally:
        await parent.stop(30)


def _workers(parent: ServiceProcess) -> set[int]:
    return {child.pid for child in psutil.Process(parent.pid).children()}


def _events(parent: ServiceProcess, event: str) -> list[dict[str, Any]]:
    found = []
    for line in list(parent.lines):
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


def _calls_by_pid(directory: Path) -> dict[int, float]:
    """ListTopics calls each worker counted, from its own metric file."""
    counted: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for metric in multiprocess.MultiProcessCollector.merge([str(path)], accumulate=False):  # type: ignore[no-untyped-call]  # untyped library
            for sample in metric.samples:
                if sample.name == "belfry_rpc_requests_total" and sample.labels["method"] == METHOD:
                    counted[pid] = counted.get(pid, 0.0) + sample.value
    return counted


def _pod_total(metrics_port: int) -> float:
    """ListTopics calls as the parent's metrics port reports them for the pod."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(
        sample.value
        for family in parser.text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "belfry_rpc_requests_total" and sample.labels["method"] == METHOD
    )


async def _call_on_fresh_connections(port: int, count: int) -> None:
    """``count`` calls, each over a new connection (a new source port for the kernel's hash)."""

    async def one() -> None:
        # A subchannel pool of its own: gRPC otherwise shares one connection among equal channels.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_OWN_CONNECTION) as channel:
            stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListTopics(preferences_pb2.ListTopicsRequest(), timeout=_WITHIN)
            # The service answered (a call without credentials is refused by the application), not the transport.
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    await asyncio.gather(*(one() for _ in range(count)))


async def test_two_workers_share_one_port_and_one_metrics_endpoint_and_drain_on_sigterm(
    pod: ServiceProcess, tmp_path: Path
) -> None:
    workers = _workers(pod)
    assert len(workers) == WORKERS and pod.pid not in workers
    (serving,) = [e for e in _events(pod, "serving") if "pids" in e]  # the parent's line
    assert set(serving["pids"]) == workers and serving["port"] == pod.port

    calls = 64  # both workers answer unless the kernel hashed 64 connections alike (odds 2 ** -63)
    await _call_on_fresh_connections(pod.port, calls)

    async def counted() -> dict[int, float]:
        # A refusal reaches the client before the worker's interceptor counts it: wait for the last ones.
        while sum((by_pid := _calls_by_pid(tmp_path / "metrics")).values()) < calls:  # noqa: ASYNC110 - files
            await asyncio.sleep(0.01)
        return by_pid

    by_pid = await asyncio.wait_for(counted(), _WITHIN)
    assert set(by_pid) == workers and all(n > 0 for n in by_pid.values()), by_pid
    assert sum(by_pid.values()) == calls
    assert _pod_total(serving["metrics_port"]) == calls  # the pod's one endpoint serves the sum

    assert await pod.stop(30) == 0  # SIGTERM: every worker drained, the parent exits 0
    assert {e["process"] for e in _events(pod, "stopped") if "process" in e} == {0, 1}
    assert not [pid for pid in workers if psutil.pid_exists(pid)]


async def test_a_killed_worker_is_started_again_and_serves(pod: ServiceProcess, tmp_path: Path) -> None:
    workers = _workers(pod)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> set[int]:
        while True:
            now = _workers(pod)
            fresh = now - workers
            if len(now) == WORKERS and fresh and any(e["pid"] in fresh for e in _events(pod, "worker ready")):
                return fresh
            pod.assert_alive()
            await asyncio.sleep(0.05)

    (fresh,) = await asyncio.wait_for(replaced(), _WITHIN)
    (exited,) = _events(pod, "worker exited; starting it again")
    assert exited["pid"] == victim and exited["code"] == -signal.SIGKILL

    async def served_by_fresh() -> None:
        while _calls_by_pid(tmp_path / "metrics").get(fresh, 0.0) == 0:
            await _call_on_fresh_connections(pod.port, 8)

    await asyncio.wait_for(served_by_fresh(), _WITHIN)
    assert await pod.stop(30) == 0


def test_the_default_count_is_the_whole_cpus_the_container_may_use(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert processes.cpu_quota("200000 100000") == 2.0
    assert processes.cpu_quota("max 100000\n") is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2, a limit of 1.5 CPUs
    assert processes.available_cpus(tmp_path) == 1  # rounded down: never more workers than CPUs to keep busy
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert processes.available_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert processes.available_cpus(tmp_path) == 1  # half a CPU: still one process
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert processes.available_cpus(tmp_path) == affinity
