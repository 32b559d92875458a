"""Long run: does the queue's throughput decay as millions of deliveries pass through?

A producer keeps a backlog of up to 20,000 deliveries (``enqueue`` in
transactions of 1,000) while two no-op sender replicas drain it and
``worker.maintain`` purges finished rows older than ``--retention`` seconds.
Every ``--window`` deliveries it prints the drain rate of that window, the
live row count and the table's size with its indexes: with retention on,
all three stay flat.

Usage: python bench/queue_soak.py [--total 1000000] [--window 100000] [--retention 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

from belfry import db
from belfry.queue import Lease, NewDelivery, Outcome, Queue, Sent, enqueue, worker

from bench.queue_common import drop_database, scratch_database, versions

BACKLOG = 20_000


async def main() -> None:
    """Run the soak and print one line per window."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--total", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=100_000)
    parser.add_argument("--retention", type=float, default=5.0)
    args = parser.parse_args()
    dsn = await scratch_database()
    pool = await db.create_pool(dsn, application_name="bench-soak", min_size=6, max_size=8)
    try:
        print(await versions(dsn, "asyncpg", "uvloop"))
        print(f"total={args.total:,} window={args.window:,} retention={args.retention}s")
        produced = handled = 0
        stop = asyncio.Event()
        window_done = asyncio.Event()
        room = asyncio.Event()
        room.set()

        async def produce() -> None:
            nonlocal produced
            expires = datetime.now(UTC) + timedelta(hours=2)
            while produced < args.total:
                await room.wait()
                batch = [
                    NewDelivery(f"acc{i % 10}", uuid.uuid4(), f"u{i}", "email", "t", {"n": i}, expires)
                    for i in range(produced, min(produced + 1000, args.total))
                ]
                async with pool.acquire() as conn, conn.transaction():
                    await enqueue(conn, batch)
                produced += len(batch)
                if produced - handled >= BACKLOG:
                    room.clear()

        async def noop(_: Lease) -> Outcome:
            nonlocal handled
            handled += 1
            if produced - handled < BACKLOG // 2:
                room.set()
            if handled % args.window == 0 or handled == args.total:
                window_done.set()
            return Sent()

        tasks = [asyncio.create_task(produce())]
        tasks += [
            asyncio.create_task(worker.run(Queue(pool, "email", worker=f"w{i}"), noop, stop=stop, batch=1000))
            for i in range(2)
        ]
        tasks.append(
            asyncio.create_task(
                worker.maintain(
                    pool, stop=stop, retention_seconds=args.retention, every_seconds=2.0, gauges_seconds=2.0
                )
            )
        )
        started = last = time.perf_counter()
        last_handled = 0
        while handled < args.total:
            await window_done.wait()
            window_done.clear()
            now = time.perf_counter()
            rows = await pool.fetchval("select count(*) from queue.deliveries")
            size = await pool.fetchval("select pg_total_relation_size('queue.deliveries')")
            print(
                f"{handled:>10,} handled  window {(handled - last_handled) / (now - last):8,.0f}/s  "
                f"rows {rows:>8,}  table+indexes {size / 2**20:7.1f} MiB",
                flush=True,
            )
            last, last_handled = now, handled
        print(f"overall {args.total / (time.perf_counter() - started):,.0f}/s")
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await pool.close()
        await drop_database(dsn)


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
