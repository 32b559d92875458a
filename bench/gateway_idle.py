"""Memory per idle websocket connection: the gateway beside a bare ``websockets`` server.

Each run starts a fresh server process, opens ``--connections`` authenticated
idle connections (each its own user, as tabs are) with a minimal raw client,
and reports (RSS after - RSS after a warm-up) / connections. The peer is a
bare ``websockets`` server with compression off that answers one message.

Usage: python -m bench.gateway_idle [--connections 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from collections.abc import Callable

import uvloop
from belfry.auth import TokenIssuer

from bench import gateway_common as gc
from bench.queue_common import drop_database, scratch_database, versions

WARMUP = 200


def _start_gateway(dsn: str, port: int, connections: int) -> subprocess.Popen[bytes]:
    """One process (not a pod), its socket caps and per-address handshake rate lifted: every tab is from 127.0.0.1."""
    room = str(connections + WARMUP + 100)
    return gc.start_gateway(
        dsn,
        port,
        BELFRY_PROCESSES="1",  # one process holds every tab: its RSS is the figure
        BELFRY_GATEWAY_CLIENT_RATE="0",
        BELFRY_GATEWAY_MAX_SOCKETS=room,
        BELFRY_GATEWAY_MAX_SOCKETS_PER_CLIENT=room,
    )


async def _open(port: int, first: Callable[[int], str], start: int, count: int, parallel: int) -> list[object]:
    limiter = asyncio.Semaphore(parallel)

    async def one(i: int) -> object:
        async with limiter:
            return await gc.idle_client(port, first(i))

    return list(await asyncio.gather(*(one(i) for i in range(start, start + count))))


async def measure(pid: int, port: int, first: Callable[[int], str], connections: int) -> tuple[float, float]:
    """KiB per connection and connections opened per second."""
    held = await _open(port, first, 0, WARMUP, 100)
    await asyncio.sleep(1.0)
    before = gc.rss(pid)
    started = time.perf_counter()
    held += await _open(port, first, WARMUP, connections, 200)
    rate = connections / (time.perf_counter() - started)
    await asyncio.sleep(2.0)  # let the server settle (presence writes, buffers)
    after = gc.rss(pid)
    for writer in held:
        writer.close()  # type: ignore[attr-defined]
    return (after - before) / connections / 1024, rate


async def main() -> None:
    """Run both servers ``--runs`` times and print the medians."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    dsn = await scratch_database()
    issuer = TokenIssuer(gc.KEYS, "k1", ttl_seconds=3600)
    try:
        print(await versions(dsn, "uvicorn", "starlette", "websockets", "asyncpg"))
        results: dict[str, list[tuple[float, float]]] = {"gateway": [], "websockets peer": []}
        for _ in range(args.runs):
            port = gc.free_port()
            gateway = _start_gateway(dsn, port, args.connections)
            try:

                def auth(i: int) -> str:
                    return json.dumps({"type": "auth", "token": issuer.issue("acc_bench", f"u{i}")})

                results["gateway"].append(await measure(gateway.pid, port, auth, args.connections))
            finally:
                gateway.terminate()
                gateway.wait()
            port = gc.free_port()
            peer = gc.start_peer(port)
            try:

                def hello(i: int) -> str:
                    return json.dumps({"type": "auth", "token": f"t{i}"})

                results["websockets peer"].append(await measure(peer.pid, port, hello, args.connections))
            finally:
                peer.terminate()
                peer.wait()
        print(f"{args.connections} idle connections, median of {args.runs} runs")
        for name, runs in results.items():
            kib = statistics.median(r[0] for r in runs)
            rate = statistics.median(r[1] for r in runs)
            print(
                f"  {name:16} {kib:6.1f} KiB per connection   {rate:7.0f} connections opened/s   runs: "
                + ", ".join(f"{r[0]:.1f}" for r in runs)
            )
    finally:
        await drop_database(dsn)


if __name__ == "__main__":
    uvloop.run(main())
