"""Publish → tab latency through the gateway at a steady event rate.

A gateway process serves ``--users`` connected tabs; the bench enqueues bell
deliveries on the "bell" queue (as the dispatcher does) at ``--rate`` events
per second for ``--seconds``, each for a random connected user, with the
publish time in the body. Each tab records arrival - publish. The latency
covers the queue claim, the feed insert, NOTIFY, the fan-out read and the
websocket frame. The peer line is a bare ``websockets`` broadcast of the same
frames (no queue, no database): the floor of the websocket hop alone.

``--processes N`` runs the gateway as N worker processes sharing its port
(``BELFRY_PROCESSES``; the kernel spreads the tabs over them) and counts the
CPU of all of them; ``--unread K`` gives every user K unread bell items before
the run (what each push's unread count has to reflect); ``--root PATH`` adds,
in the same run and alternating with this tree, a gateway from another
checkout (e.g. a ``git worktree`` of an earlier commit) under the same load.

Usage: python -m bench.gateway_fanout [--users 200] [--rate 1000] [--seconds 10] [--runs 3]
       [--processes 1] [--unread 0] [--root PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import resource
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg
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


_BACKLOG = """
with users as (select 'u' || n as user_id from generate_series(0, $1 - 1) as n)
insert into gateway.feed_seq (account_id, user_id, last_id)
select 'acc_bench', user_id, $2 from users
on conflict (account_id, user_id) do update set last_id = gateway.feed_seq.last_id + $2
"""


async def _preload(dsn: str, users: int, unread: int) -> None:
    """Give each user ``unread`` more unread bell items, numbered after what they hold."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(_BACKLOG, users, unread)
            await conn.execute(
                """
                insert into gateway.feed (account_id, user_id, id, notification_id, topic, title, body, url,
                                          in_feed, popup, browser, sound)
                select 'acc_bench', s.user_id, s.last_id - $2 + k, gen_random_uuid(), 'conversation.mentioned',
                       'backlog', '0', 'https://app.example/c/1', true, false, false, ''
                from gateway.feed_seq s, generate_series(1, $2) as k
                where s.account_id = 'acc_bench' and s.user_id in (select 'u' || n from generate_series(0, $1 - 1) n)
                """,
                users,
                unread,
            )
        await conn.execute("vacuum analyze gateway.feed")
        await conn.execute("vacuum analyze gateway.feed_seq")
    finally:
        await conn.close()


def _cpu_tree(proc: psutil.Process) -> float:
    """CPU seconds of a process and its children (a gateway's worker processes)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += sum(p.cpu_times()[:2])
    return total


async def run_gateway(
    dsn: str, users: int, rate: int, seconds: float, *, processes: int = 1, root: Path = gc.ROOT
) -> tuple[list[float], str]:
    """One run against a fresh gateway (of the tree at ``root``); latencies (s) and the CPU line."""
    port = gc.free_port()
    room = str(users + 1000)  # every bench tab comes from 127.0.0.1: the per-client caps are lifted
    proc = gc.start_gateway(
        dsn,
        port,
        root=root,
        BELFRY_DB_POOL_MAX="10",
        BELFRY_PROCESSES=str(processes),
        BELFRY_GATEWAY_CLIENT_RATE="0",
        BELFRY_GATEWAY_MAX_SOCKETS=room,
        BELFRY_GATEWAY_MAX_SOCKETS_PER_CLIENT=room,
    )
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
        cpu0 = _cpu_tree(gateway)
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
        gateway_share = (_cpu_tree(gateway) - cpu0) / wall / cores
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
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--unread", type=int, default=0)
    parser.add_argument("--root", type=Path, default=None, help="also run the gateway of this checkout")
    args = parser.parse_args()
    # One descriptor per tab on each side, and then some.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.users + 1024)), hard))
    trees = {"gateway": gc.ROOT, **({"gateway (other tree)": args.root} if args.root else {})}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in [*trees, "websockets peer"]}
    # Each tree on a database of its own, migrated by that tree: its schema is what it would run on.
    databases = {name: await _scratch_for(root) for name, root in trees.items()}
    try:
        print(await versions(databases["gateway"], "uvicorn", "starlette", "websockets", "asyncpg"))
        for _ in range(args.runs):
            for name, root in trees.items():
                dsn = databases[name]
                if args.unread:
                    await _preload(dsn, args.users, args.unread)
                latencies, cpu = await run_gateway(
                    dsn, args.users, args.rate, args.seconds, processes=args.processes, root=root
                )
                results[name].append((_pct(latencies, 0.5), _pct(latencies, 0.99)))
                p50, p99 = results[name][-1]
                print(f"  run: {name} p50 {p50:.1f} ms, p99 {p99:.1f} ms; CPU {cpu}", flush=True)
            # Both ends of the peer's sockets live in this process: at most half the descriptors each.
            bare = await run_peer(min(args.users, 5000), args.rate, args.seconds)
            results["websockets peer"].append((_pct(bare, 0.5), _pct(bare, 0.99)))
        print(
            f"{args.rate} events/s for {args.seconds:.0f} s to {args.users} tabs, {args.processes} gateway "
            f"process(es), {args.unread} unread preloaded per user, median of {args.runs} runs"
        )
        for name, runs in results.items():
            p50 = statistics.median(r[0] for r in runs)
            p99 = statistics.median(r[1] for r in runs)
            print(f"  {name:16} p50 {p50:6.1f} ms   p99 {p99:6.1f} ms")
    finally:
        for dsn in databases.values():
            await drop_database(dsn)


async def _scratch_for(root: Path) -> str:
    """A fresh database migrated by the tree at ``root`` (this tree's migrations, or another checkout's)."""
    if root == gc.ROOT:
        return await scratch_database()
    dsn = await scratch_database(migrated=False)
    code = "import asyncio, sys; from belfry import migrate; asyncio.run(migrate.migrate_url(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": f"{root}:{root / 'libs'}", "BELFRY_LOG_LEVEL": "warning"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, dsn, cwd=root, env=env)
    if await proc.wait() != 0:
        raise RuntimeError(f"migrating with the tree at {root} failed")
    return dsn


if __name__ == "__main__":
    uvloop.run(main())
