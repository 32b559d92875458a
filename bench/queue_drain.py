"""Queue drain: Belfry's delivery queue beside procrastinate and a raw asyncpg queue.

The same PostgreSQL, the same number of items, the same ~400-byte JSON
payload, default durability (synchronous_commit as the server has it, logged
tables). Each run, alternating the three:

* Belfry: ``enqueue`` in producer transactions of 1,000, then ``worker.run``
  replicas (in this process) with a no-op sender — each claim leases up to
  ``--batch`` deliveries fairly across ``--accounts`` accounts, each settle
  writes the whole batch's outcomes in one statement;
* procrastinate: ``batch_defer_async`` x 1,000, then ``run_worker_async``
  (concurrency 10) with a no-op task;
* raw asyncpg: ``--workers`` loops each deleting 1,000 rows per statement
  with ``FOR UPDATE SKIP LOCKED`` (no leases, no history: a ceiling).

Usage: python bench/queue_drain.py [--items 20000] [--runs 3] [--workers 2] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from belfry import db
from belfry.message import Message
from belfry.queue import Lease, NewDelivery, Outcome, Queue, Sent, enqueue, worker
from procrastinate import App, PsycopgConnector

from bench.queue_common import CpuMeter, drop_database, scratch_database, versions

CHUNK = 1000


def payload(i: int) -> dict[str, Any]:
    """A realistic rendered message (~400 bytes of JSON)."""
    return Message(
        notification_id=str(uuid.uuid4()),
        account_id=f"acc{i % 10}",
        user_id=f"user{i}",
        topic="contacts.contact_assigned",
        title=f"Contact {i} was assigned to you",
        body="Ana Tester assigned this contact to you from the CRM.",
        url=f"https://app.example.com/contacts/{i}",
        occurred_at=datetime.now(UTC).isoformat(),
        recipient_email=f"user{i}@example.com",
        recipient_name="Ana Tester",
    ).to_json()


async def belfry_run(dsn: str, items: int, workers: int, batch: int, accounts: int) -> tuple[float, float, str]:
    """Enqueue rate, drain rate, CPU share."""
    pool = await db.create_pool(
        dsn, application_name="bench-belfry", min_size=workers * 2 + 1, max_size=workers * 2 + 2
    )
    await pool.execute("truncate queue.deliveries")
    expires = datetime.now(UTC) + timedelta(hours=1)
    rows = [
        NewDelivery(
            f"acc{i % accounts}", uuid.uuid4(), f"user{i}", "email", "contacts.contact_assigned", payload(i), expires
        )
        for i in range(items)
    ]
    started = time.perf_counter()
    for k in range(0, items, CHUNK):
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, rows[k : k + CHUNK])
    enqueue_rate = items / (time.perf_counter() - started)

    done = asyncio.Event()
    count = 0

    async def noop(lease: Lease) -> Outcome:
        nonlocal count
        count += 1
        if count >= items:
            done.set()
        return Sent()

    stop = asyncio.Event()
    with CpuMeter() as cpu:
        started = time.perf_counter()
        tasks = [
            asyncio.create_task(
                worker.run(Queue(pool, "email", worker=f"w{i}"), noop, stop=stop, batch=batch, concurrency=batch)
            )
            for i in range(workers)
        ]
        await done.wait()
        # Wait for the last settle to commit before stopping the clock.
        while await pool.fetchval("select count(*) from queue.deliveries where state = 'sent'") < items:  # noqa: ASYNC110 - polling the database, not an in-process flag
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*tasks)
    await pool.close()
    return enqueue_rate, items / elapsed, cpu.share(elapsed)


async def procrastinate_run(dsn: str, items: int) -> tuple[float, float, str]:
    """Enqueue (defer) rate, drain rate, CPU share."""
    app = App(connector=PsycopgConnector(conninfo=dsn))
    count = 0

    @app.task(name="noop", queue="bench")
    async def noop(**_: object) -> None:
        nonlocal count
        count += 1

    async with app.open_async():
        async with app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
            await conn.execute("truncate procrastinate_jobs cascade")
        bodies = [payload(i) for i in range(items)]
        started = time.perf_counter()
        for k in range(0, items, CHUNK):
            await noop.batch_defer_async(*bodies[k : k + CHUNK])
        defer_rate = items / (time.perf_counter() - started)
        with CpuMeter() as cpu:
            started = time.perf_counter()
            # wait=True keeps all ten sub-workers busy (wait=False lets them stop on the first empty fetch);
            # the worker is stopped once the last job ran.
            run = asyncio.create_task(
                app.run_worker_async(queues=["bench"], concurrency=10, wait=True, install_signal_handlers=False)
            )
            while count < items:  # noqa: ASYNC110 - procrastinate offers no completion event to wait on
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
    assert count == items, (count, items)
    return defer_rate, items / elapsed, cpu.share(elapsed)


async def raw_run(dsn: str, items: int, workers: int) -> tuple[float, float, str]:
    """Insert rate, drain rate, CPU share of the bare SKIP LOCKED queue."""
    pool = await asyncpg.create_pool(dsn, min_size=workers + 1, max_size=workers + 1)
    await pool.execute(
        "create table if not exists raw_jobs (id bigserial primary key, payload jsonb not null); truncate raw_jobs"
    )
    bodies = [json.dumps(payload(i)) for i in range(items)]
    started = time.perf_counter()
    for k in range(0, items, CHUNK):
        await pool.execute("insert into raw_jobs (payload) select unnest($1::jsonb[])", bodies[k : k + CHUNK])
    insert_rate = items / (time.perf_counter() - started)

    async def drain() -> None:
        while await pool.fetch(
            """
            delete from raw_jobs where id in (select id from raw_jobs order by id limit 1000 for update skip locked)
            returning id, payload
            """
        ):
            pass

    with CpuMeter() as cpu:
        started = time.perf_counter()
        await asyncio.gather(*(drain() for _ in range(workers)))
        elapsed = time.perf_counter() - started
    await pool.close()
    return insert_rate, items / elapsed, cpu.share(elapsed)


async def main() -> None:
    """Run all three ``--runs`` times, alternating, and print medians and ratios."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--accounts", type=int, default=10)
    parser.add_argument("--no-procrastinate", action="store_true", help="Belfry and raw only (larger runs)")
    args = parser.parse_args()
    dsn = await scratch_database()
    try:
        app = App(connector=PsycopgConnector(conninfo=dsn))
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
        print(await versions(dsn, "asyncpg", "procrastinate", "psycopg", "uvloop"))
        print(f"items={args.items} workers={args.workers} batch={args.batch} accounts={args.accounts}")
        results: dict[str, list[tuple[float, float, str]]] = {"belfry": [], "raw": []}
        if not args.no_procrastinate:
            results["procrastinate"] = []

        def show(run: int, name: str, result: tuple[float, float, str]) -> None:
            results[name].append(result)
            print(
                f"run {run + 1} {name:13s} enqueue {result[0]:9,.0f}/s  drain {result[1]:9,.0f}/s  ({result[2]})",
                flush=True,
            )

        for run in range(args.runs):
            show(run, "belfry", await belfry_run(dsn, args.items, args.workers, args.batch, args.accounts))
            if not args.no_procrastinate:
                show(run, "procrastinate", await procrastinate_run(dsn, args.items))
            show(run, "raw", await raw_run(dsn, args.items, args.workers))
        med = {
            name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for name, rs in results.items()
        }
        for name, (enq, drain) in med.items():
            print(f"median {name:13s} enqueue {enq:9,.0f}/s  drain {drain:9,.0f}/s")
        if "procrastinate" in med:
            print(
                f"ratio belfry/procrastinate: enqueue {med['belfry'][0] / med['procrastinate'][0]:.1f}x, "
                f"drain {med['belfry'][1] / med['procrastinate'][1]:.1f}x"
            )
        print(f"ratio belfry/raw drain {med['belfry'][1] / med['raw'][1]:.2f}x")
    finally:
        await drop_database(dsn)


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
