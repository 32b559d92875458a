"""What a pod of several worker processes (``BELFRY_PROCESSES``) does to a service's RPC rate, beside a bare server.

One preferences pod at a time on a fresh database of the local PostgreSQL,
``BELFRY_PROCESSES`` = 1, 2 and 4, and the peer: a bare grpc.aio health
server in one process (uvloop, no interceptor). Load comes from ``--clients``
client processes, each with ``--connections`` connections of its own (so the
kernel's SO_REUSEPORT hash spreads them over the workers) and ``--inflight``
calls in flight per connection, for ``--seconds`` after a one-second warm-up.
Two calls:

* ``health``: the standard health ``Check`` (the gRPC stack only: the
  interceptor skips health);
* ``refused``: ``ListTopics`` without credentials, refused UNAUTHENTICATED by
  the service (the interceptor, its metrics — multiprocess files in a pod —
  and no database: the cheapest call that goes through everything a call
  goes through).

Runs alternate between the shapes, ``--runs`` times; reported: the median
calls/s, the ratio to the peer, and per run the CPU µs per call of the
workers (summed), of the pod's parent and of the clients (the clients'
ceiling: their count x 1 s of CPU ÷ their CPU per call).

Usage: python bench/processes_scaling.py [--runs 3] [--seconds 5] [--clients 2] [--connections 8] [--inflight 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from belfry import migrate
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
ADMIN = os.environ.get("BELFRY_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
KEY = "bench=" + "b" * 48
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


async def _client(port: int, call: str, seconds: float, connections: int, inflight: int) -> None:
    """A load process. Prints: calls in the ``seconds`` after a one-second warm-up, that window's length,
    every call it made, and its CPU seconds in the window."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) for _ in range(connections)]
    counted = total = 0
    counting = stop = False

    async def loop(channel: grpc.aio.Channel) -> None:
        nonlocal counted, total
        if call == "health":
            check = health_pb2_grpc.HealthStub(channel).Check
            request: object = health_pb2.HealthCheckRequest()
        else:
            check = preferences_pb2_grpc.PreferencesServiceStub(channel).ListTopics
            request = preferences_pb2.ListTopicsRequest()
        while not stop:
            with contextlib.suppress(grpc.aio.AioRpcError):  # ``refused`` answers UNAUTHENTICATED by design
                await check(request, timeout=30)
            total += 1
            if counting:
                counted += 1

    tasks = [asyncio.create_task(loop(c)) for c in channels for _ in range(inflight)]
    await asyncio.sleep(1.0)
    counting = True
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    counting = False
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"{counted} {elapsed} {total} {cpu}", flush=True)


async def _peer(ready: str) -> None:
    """The bare server: grpc.aio health in one process, port on stdout."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{ready} {port}", flush=True)
    await server.wait_for_termination()


@dataclass
class Server:
    """A running server: the process to stop, and every process whose CPU counts."""

    process: asyncio.subprocess.Process
    port: int

    def workers(self) -> list[psutil.Process]:
        children = psutil.Process(self.process.pid).children()
        return children or [psutil.Process(self.process.pid)]


async def _start(shape: str, env: dict[str, str]) -> Server:
    if shape == "peer":
        process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--peer", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        return Server(process, int(line.split()[-1]))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.preferences",
        cwd=ROOT,
        env={**env, "BELFRY_PROCESSES": shape},
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    async for raw in process.stderr:
        if raw.startswith(b"BELFRY_READY "):
            return Server(process, int(raw.split()[-1]))
    raise RuntimeError(f"preferences with {shape} processes did not start")


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            total += times.user + times.system
    return total


async def _run(shape: str, call: str, env: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    server = await _start(shape, env)
    try:
        await asyncio.sleep(0.5)
        workers = server.workers()
        parent = (
            [psutil.Process(server.process.pid)] if len(workers) > 1 or workers[0].pid != server.process.pid else []
        )
        w0, p0 = _cpu(workers), _cpu(parent)
        clients = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--client",
                str(server.port),
                "--call",
                call,
                "--seconds",
                str(args.seconds),
                "--connections",
                str(args.connections),
                "--inflight",
                str(args.inflight),
                cwd=ROOT,
                env=env,
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(args.clients)
        ]
        outs = [(await c.communicate())[0].split() for c in clients]
        w1, p1 = _cpu(workers), _cpu(parent)
        counted = sum(int(o[0]) for o in outs)
        window = max(float(o[1]) for o in outs)
        total = sum(int(o[2]) for o in outs)
        client_cpu = sum(float(o[3]) for o in outs)
        return {
            "rate": counted / window,
            # Server CPU over the whole load (warm-up included) ÷ every call made.
            "workers_us": (w1 - w0) / total * 1e6,
            "parent_us": (p1 - p0) / total * 1e6,
            "client_us": client_cpu / counted * 1e6,
        }
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.process.terminate()
        await server.process.wait()


async def main(args: argparse.Namespace) -> None:
    name = f"belfry_bench_procs_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN)
    await admin.execute(f'create database "{name}"')
    await admin.close()
    url = ADMIN.rsplit("/", 1)[0] + f"/{name}"
    await migrate.migrate_url(url)
    env = {
        **os.environ,
        "BELFRY_DATABASE_URL": url,
        "BELFRY_GRPC_ADDRESS": "127.0.0.1:0",
        "BELFRY_METRICS_ADDRESS": "127.0.0.1:0",
        "BELFRY_LOG_LEVEL": "warning",
        "BELFRY_TOKEN_KEYS": KEY,
        "BELFRY_DRAIN_SECONDS": "0.5",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each pod makes its own
    shapes = ["peer", *args.processes.split(",")]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for run in range(args.runs):
            for call in ("health", "refused"):
                for shape in shapes:
                    if shape == "peer" and call == "refused":
                        continue
                    r = await _run(shape, call, env, args)
                    results.setdefault((call, shape), []).append(r)
                    print(
                        f"run {run + 1} {call:8} {shape:>4}: {r['rate']:8.0f} calls/s  "
                        f"server {r['workers_us']:6.1f} µs/call  parent {r['parent_us']:5.1f} µs/call  "
                        f"clients {r['client_us']:6.1f} µs/call",
                        flush=True,
                    )
    finally:
        admin = await asyncpg.connect(ADMIN)
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()
    print(
        f"\npython {platform.python_version()}, grpcio {grpc.__version__}, {os.cpu_count()} CPUs, "
        f"{args.clients} clients × {args.connections} connections × {args.inflight} in flight, medians of {args.runs}"
    )
    peer = statistics.median(r["rate"] for r in results[("health", "peer")])
    for (call, shape), runs in results.items():
        rate = statistics.median(r["rate"] for r in runs)
        print(
            f"{call:8} {shape:>4}: {rate:8.0f} calls/s ({rate / peer:4.2f}× the peer)  "
            f"server {statistics.median(r['workers_us'] for r in runs):6.1f} µs/call  "
            f"parent {statistics.median(r['parent_us'] for r in runs):5.1f} µs/call  "
            f"client ceiling {statistics.median(1e6 / r['client_us'] * args.clients for r in runs):8.0f} calls/s"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--client", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--call", default="health", help=argparse.SUPPRESS)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    if args.client:
        asyncio.run(_client(args.client, args.call, args.seconds, args.connections, args.inflight))
    elif args.peer:
        asyncio.run(_peer("READY"))
    else:
        asyncio.run(main(args))
