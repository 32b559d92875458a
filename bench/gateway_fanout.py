"""Publish → tab latency through the gateway at a steady event rate.

A gateway process serves ``--users`` connected tabs; the bench enqueues bell
deliveries on the "bell" queue (as the dispatcher does) at ``--rate`` events
per second for ``--seconds``, each for a random connected user, with the
publish time in the body. Each tab records arrival - publish. The latency
covers the queue claim, the feed insert, NOTIFY, the fan-out read and the
websocket frame. The peer line is a bare ``websockets`` broadcast of the same
frames (no queue, no database): the floor of the websocket hop alone.

Usage: python -m bench.gateway_fanout [--users 200] [--rate 1000] [--seconds 10] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import time
import uuid

import psutil
import uvloop
import websockets
from belfry import db
from belfry.auth import TokenIssuer
from belfry.message import Message
from belfry.queue import NewDelivery, enqueue

from bench import gateway_common as gc
from bench.queue_common import CpuMeter, drop_database, scratch_database, versions

TICK = 0.01  # one transaction every 10 ms, as a busy dispatcher commits


def _delivery(user: str, now: float) -> NewDelivery:
    notification_id = uuid.uuid4()
    message = Message(
        notification_id=str(notification_id),
        account_id="acc_bench",
        user_id=user,
        topic="conversation.mentioned",
        title="Ann mentioned you",
        body=repr(now),
        url="https://app.example/c/1",
        occurred_at=datetime.datetime.now(datetime.UTC).isoformat(),
        popup=True,
        sound="chime",
    )
    return NewDelivery(
        account_id="acc_bench",
        notification_id=notification_id,
        user_id=user,
        channel="bell",
        topic=message.topic,
        payload=message.to_json(),
        expires_at=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
    )


async def _tab(ws: websockets.ClientConnection, latencies: list[float]) -> None:
    async for raw in ws:
        frame = json.loads(raw)
        if frame.get("type") == "item":
            latencies.append(time.time() - float(frame["item"]["body"]))


async def run_gateway(dsn: str, users: int, rate: int, seconds: float) -> tuple[list[float], str]:
    """One run against a fresh gateway process; latencies (s) and the CPU line."""
    port = gc.free_port()
    proc = gc.start_gateway(dsn, port, BELFRY_DB_POOL_MAX="10")
    pool = await db.create_pool(dsn, application_name="bench-publisher", min_size=1, max_size=2)
    issuer = TokenIssuer(gc.KEYS, "k1", ttl_seconds=3600)
    latencies: list[float] = []
    tabs = []
    try:
        for i in range(users):
            ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", compression=None)
            await ws.send(json.dumps({"type": "auth", "token": issuer.issue("acc_bench", f"u{i}")}))
            while json.loads(await ws.recv())["type"] != "ready":
                pass
            tabs.append(ws)
        readers = [asyncio.ensure_future(_tab(ws, latencies)) for ws in tabs]
        gateway = psutil.Process(proc.pid)
        cpu0 = sum(gateway.cpu_times()[:2])
        per_tick = max(1, round(rate * TICK))
        total = int(rate * seconds)
        started = time.perf_counter()
        with CpuMeter() as meter:
            sent = 0
            while sent < total:
                now = time.time()
                batch = [_delivery(f"u{random.randrange(users)}", now) for _ in range(min(per_tick, total - sent))]
                async with pool.acquire() as conn, conn.transaction():
                    await enqueue(conn, batch)
                sent += len(batch)
                delay = started + sent / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            deadline = time.perf_counter() + 10
            while len(latencies) < total and time.perf_counter() < deadline:  # noqa: ASYNC110 - a bench waits on a count
                await asyncio.sleep(0.05)
        wall = time.perf_counter() - started
        cores = psutil.cpu_count() or 1
        gateway_share = (sum(gateway.cpu_times()[:2]) - cpu0) / wall / cores
        cpu = f"gateway {gateway_share:.0%}, {meter.share(wall)}"
        if len(latencies) < total:
            cpu += f" (only {len(latencies)}/{total} arrived)"
        for reader in readers:
            reader.cancel()
        return latencies, cpu
    finally:
        for ws in tabs:
            await ws.close()
        await pool.close()
        proc.terminate()
        proc.wait()


async def run_peer(users: int, rate: int, seconds: float) -> list[float]:
    """The same frames broadcast by a bare websockets server (no queue, no database)."""
    latencies: list[float] = []
    clients: list[websockets.ServerConnection] = []

    async def handler(ws: websockets.ServerConnection) -> None:
        clients.append(ws)
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        tabs = [await websockets.connect(f"ws://127.0.0.1:{port}", compression=None) for _ in range(users)]
        while len(clients) < users:  # noqa: ASYNC110 - a bench waits on a count
            await asyncio.sleep(0.01)
        readers = [asyncio.ensure_future(_tab(ws, latencies)) for ws in tabs]
        total = int(rate * seconds)
        started = time.perf_counter()
        for sent in range(total):
            frame = json.dumps({"type": "item", "item": {"body": repr(time.time())}, "unread": 1})
            await random.choice(clients).send(frame)
            delay = started + (sent + 1) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        while len(latencies) < total:  # noqa: ASYNC110 - a bench waits on a count
            await asyncio.sleep(0.05)
        for reader in readers:
            reader.cancel()
        for ws in tabs:
            await ws.close()
    return latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def main() -> None:
    """Run ``--runs`` times and print median p50/p99 for the gateway and the peer."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    dsn = await scratch_database()
    try:
        print(await versions(dsn, "uvicorn", "starlette", "websockets", "asyncpg"))
        ours: list[tuple[float, float]] = []
        peer: list[tuple[float, float]] = []
        for _ in range(args.runs):
            latencies, cpu = await run_gateway(dsn, args.users, args.rate, args.seconds)
            ours.append((_pct(latencies, 0.5), _pct(latencies, 0.99)))
            print(f"  run: gateway p50 {ours[-1][0]:.1f} ms, p99 {ours[-1][1]:.1f} ms; CPU {cpu}")
            bare = await run_peer(args.users, args.rate, args.seconds)
            peer.append((_pct(bare, 0.5), _pct(bare, 0.99)))
        print(f"{args.rate} events/s for {args.seconds:.0f} s to {args.users} tabs, median of {args.runs} runs")
        for name, runs in (("gateway", ours), ("websockets peer", peer)):
            p50 = statistics.median(r[0] for r in runs)
            p99 = statistics.median(r[1] for r in runs)
            print(f"  {name:16} p50 {p50:6.1f} ms   p99 {p99:6.1f} ms")
    finally:
        await drop_database(dsn)


if __name__ == "__main__":
    uvloop.run(main())
