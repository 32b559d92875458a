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

Every phase runs on a private durable cluster started for the run
(``bench/pg_cluster.py``: ``initdb`` defaults, fsync and synchronous_commit
on), so the figures beside each rate are the phase's alone: CPU µs per
delivery of this process (the client: producers and workers) and of
PostgreSQL (backends and autovacuum; WAL writer, checkpointer and the other
background processes), WAL bytes per delivery, row versions per delivery
(``n_tup_ins`` + ``n_tup_upd`` over every table), the HOT share of the
updates (``n_tup_hot_upd / n_tup_upd``) and the dead tuples the main table
holds afterwards. ``--shared`` runs on the server of ``BELFRY_TEST_ADMIN_DSN``
instead (rates only: its WAL and CPU mix in other work).

Usage: python bench/queue_drain.py [--items 20000] [--runs 3] [--workers 2] [--batch 1000]
           [--peer-items 5000] [--no-procrastinate] [--shared] [--default-gc]

The process runs the garbage collector as every service process does once
started (``belfry.service.tune_gc``: start-up objects frozen, gen-0 threshold
20,000); ``--default-gc`` keeps CPython's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from belfry import db, log, migrate, service
from belfry.message import Message
from belfry.queue import Lease, NewDelivery, Outcome, Queue, Sent, enqueue, worker
from procrastinate import App, PsycopgConnector

from bench.pg_cluster import Cost, DurableCluster, PgMeter
from bench.queue_common import ADMIN, CpuMeter, versions

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


@dataclass
class Phase:
    """One side's enqueue and drain in one run."""

    items: int
    enqueue: Cost
    drain: Cost

    @property
    def enqueue_rate(self) -> float:
        """Items enqueued per second."""
        return self.items / self.enqueue.seconds

    @property
    def drain_rate(self) -> float:
        """Items drained per second."""
        return self.items / self.drain.seconds


class Bench:
    """Where the phases run: a private durable cluster (measured) or the shared server (rates only)."""

    def __init__(self, dsn: str, cluster: DurableCluster | None, *, py_spy: str = "", perf: str = "") -> None:
        self.dsn = dsn
        self.cluster = cluster
        self.py_spy = py_spy  # where to write the first Belfry drain's py-spy samples ("" = none)
        self.perf = perf  # where to write the first Belfry drain's perf samples of the backends

    @contextlib.asynccontextmanager
    async def measure(self, table: str) -> AsyncIterator[Cost]:
        """Time (and on a private cluster, meter) the block; the block closes its connections before leaving."""
        if self.cluster is None:
            with CpuMeter() as cpu:
                started = time.perf_counter()
                cost = Cost()
                yield cost
                cost.seconds = time.perf_counter() - started
            cost.client, cost.backends = cpu.own, cpu.postgres
            return
        meter = PgMeter(self.cluster, self.dsn, table)
        self._pending = meter
        async with meter as cost:
            yield cost

    @contextlib.asynccontextmanager
    async def profile(self) -> AsyncIterator[None]:
        """Sample this process with py-spy and the cluster's backends with perf during the block, once."""
        spy, perf, self.py_spy, self.perf = self.py_spy, self.perf, "", ""
        samplers: list[asyncio.subprocess.Process] = []
        if spy:
            samplers.append(
                await _sampler(
                    "py-spy", "record", "--pid", str(os.getpid()), "--native", "-r", "200", "-f", "raw", "-o", spy
                )
            )
        if perf and self.cluster is not None:
            pids = ",".join(str(p.pid) for p in self.cluster.postmaster().children())
            samplers.append(await _sampler("perf", "record", "-F", "499", "-g", "-p", pids, "-o", perf))
        try:
            yield
        finally:
            for sampler in samplers:
                sampler.send_signal(signal.SIGINT)
            for sampler in samplers:
                await sampler.wait()

    async def settle(self) -> None:
        """Read the row counters of the last measured phase (after its connections closed)."""
        if self.cluster is not None:
            await self._pending.settle()


async def belfry_run(bench: Bench, items: int, workers: int, batch: int, accounts: int) -> Phase:
    """Enqueue in producer transactions of ``CHUNK``, then drain with ``workers`` no-op replicas."""
    expires = datetime.now(UTC) + timedelta(hours=1)
    rows = [
        NewDelivery(
            f"acc{i % accounts}", uuid.uuid4(), f"user{i}", "email", "contacts.contact_assigned", payload(i), expires
        )
        for i in range(items)
    ]
    await _execute(bench.dsn, "truncate queue.deliveries")
    pool = await db.create_pool(bench.dsn, application_name="bench-belfry", min_size=1, max_size=1)
    async with bench.measure("queue.deliveries") as enqueued:
        for k in range(0, items, CHUNK):
            async with pool.acquire() as conn, conn.transaction():
                await enqueue(conn, rows[k : k + CHUNK])
    await pool.close()
    await bench.settle()

    done = asyncio.Event()
    count = 0

    async def noop(lease: Lease) -> Outcome:
        nonlocal count
        count += 1
        if count >= items:
            done.set()
        return Sent()

    pool = await db.create_pool(
        bench.dsn, application_name="bench-belfry", min_size=workers * 2 + 1, max_size=workers * 2 + 2
    )
    stop = asyncio.Event()
    # Samplers attach before the clock starts (and slow the drain: profile in a run of its own).
    async with bench.profile(), bench.measure("queue.deliveries") as drained:
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
        stop.set()
        await asyncio.gather(*tasks)
    await pool.close()
    await bench.settle()
    return Phase(items, enqueued, drained)


async def procrastinate_run(bench: Bench, items: int) -> Phase:
    """``batch_defer_async`` x ``CHUNK``, then ``run_worker_async(concurrency=10)`` with a no-op task."""
    count = 0
    bodies = [payload(i) for i in range(items)]

    def make_app() -> App:
        app = App(connector=PsycopgConnector(conninfo=bench.dsn))

        @app.task(name="noop", queue="bench")
        async def noop(**_: object) -> None:
            nonlocal count
            count += 1

        return app

    app = make_app()
    async with app.open_async(), app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
        await conn.execute("truncate procrastinate_jobs cascade")
    async with app.open_async(), bench.measure("public.procrastinate_jobs") as deferred:
        task = app.tasks["noop"]
        for k in range(0, items, CHUNK):
            await task.batch_defer_async(*bodies[k : k + CHUNK])
    await bench.settle()
    app = make_app()
    async with app.open_async(), bench.measure("public.procrastinate_jobs") as drained:
        # wait=True keeps all ten sub-workers busy (wait=False lets them stop on the first empty fetch);
        # the worker is stopped once the last job ran.
        run = asyncio.create_task(
            app.run_worker_async(queues=["bench"], concurrency=10, wait=True, install_signal_handlers=False)
        )
        while count < items:  # noqa: ASYNC110 - procrastinate offers no completion event to wait on
            await asyncio.sleep(0.005)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
    await bench.settle()
    assert count == items, (count, items)
    return Phase(items, deferred, drained)


async def raw_run(bench: Bench, items: int, workers: int) -> Phase:
    """The bare SKIP LOCKED queue: insert, then ``workers`` loops deleting 1,000 rows per statement."""
    await _execute(
        bench.dsn,
        "create table if not exists raw_jobs (id bigserial primary key, payload jsonb not null); truncate raw_jobs",
    )
    bodies = [json.dumps(payload(i)) for i in range(items)]
    pool = await asyncpg.create_pool(bench.dsn, min_size=1, max_size=1)
    async with bench.measure("public.raw_jobs") as inserted:
        for k in range(0, items, CHUNK):
            await pool.execute("insert into raw_jobs (payload) select unnest($1::jsonb[])", bodies[k : k + CHUNK])
    await pool.close()
    await bench.settle()

    pool = await asyncpg.create_pool(bench.dsn, min_size=workers, max_size=workers)

    async def drain() -> None:
        while await pool.fetch(
            """
            delete from raw_jobs where id in (select id from raw_jobs order by id limit 1000 for update skip locked)
            returning id, payload
            """
        ):
            pass

    async with bench.measure("public.raw_jobs") as drained:
        await asyncio.gather(*(drain() for _ in range(workers)))
    await pool.close()
    await bench.settle()
    return Phase(items, inserted, drained)


async def _sampler(program: str, *args: str) -> asyncio.subprocess.Process:
    binary = shutil.which(program) or str(Path(sys.executable).parent / program)
    process = await asyncio.create_subprocess_exec(
        binary, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL
    )
    await asyncio.sleep(1.0)  # let it attach before the work starts
    return process


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _line(run: int, name: str, phase: Phase, measured: bool) -> str:
    head = f"run {run + 1} {name:13s} enqueue {phase.enqueue_rate:9,.0f}/s  drain {phase.drain_rate:9,.0f}/s"
    d = phase.drain.per(phase.items)
    if not measured:
        return f"{head}  (client {d['client_us']:.0f} µs, postgres {d['backend_us']:.0f} µs per item)"
    e = phase.enqueue.per(phase.items)
    return (
        f"{head}\n    drain per item: client {d['client_us']:6.1f} µs, postgres {d['pg_us']:6.1f} µs "
        f"(backends {d['backend_us']:.1f}, background {d['background_us']:.1f}), WAL {d['wal']:7,.0f} B, "
        f"rows ins {d['ins']:.2f} upd {d['upd']:.2f} del {d['del']:.2f} (HOT {d['hot_share']:.0%}), "
        f"dead tuples after {d['dead']:.2f}\n"
        f"    enqueue per item: client {e['client_us']:6.1f} µs, postgres {e['pg_us']:6.1f} µs, WAL {e['wal']:7,.0f} B"
    )


def _median(phases: list[Phase], pick: str, key: str) -> float:
    return float(statistics.median(getattr(p, pick).per(p.items)[key] for p in phases))


async def main() -> None:
    """Run the sides ``--runs`` times, alternating, and print medians and ratios."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--peer-items", type=int, default=5_000, help="items for procrastinate (it drains slowly)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--accounts", type=int, default=10)
    parser.add_argument("--no-procrastinate", action="store_true", help="Belfry and raw only (larger runs)")
    parser.add_argument("--shared", action="store_true", help="the shared server, rates only")
    parser.add_argument("--default-gc", action="store_true", help="CPython's collector settings, not the services'")
    parser.add_argument("--py-spy", default="", help="py-spy raw samples of the first Belfry drain to this file")
    parser.add_argument("--perf", default="", help="perf samples of the backends during the first Belfry drain")
    args = parser.parse_args()
    # Warnings only, as a production sender with info lines off would run: the worker writes an info line per
    # settled delivery ("delivery settled"), which would measure the terminal, not the queue.
    log.configure(service="bench-drain", level="warning")
    if not args.default_gc:
        # The workers here are a sender's loop: the collector runs as in every service process once started.
        service.tune_gc()
    async with contextlib.AsyncExitStack() as stack:
        cluster = None if args.shared else await stack.enter_async_context(DurableCluster())
        admin = ADMIN if cluster is None else cluster.admin_dsn
        name = f"belfry_bench_{uuid.uuid4().hex[:10]}"
        await _execute(admin, f'create database "{name}"')
        dsn = admin.rsplit("/", 1)[0] + f"/{name}"
        stack.push_async_callback(_execute, admin, f'drop database if exists "{name}" with (force)')
        await migrate.migrate_url(dsn)
        app = App(connector=PsycopgConnector(conninfo=dsn))
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
        bench = Bench(dsn, cluster, py_spy=args.py_spy, perf=args.perf)
        print(await versions(dsn, "asyncpg", "procrastinate", "psycopg", "uvloop"))
        print(
            f"{'private durable cluster' if cluster else 'shared server'}; items={args.items} "
            f"(procrastinate {args.peer_items}) workers={args.workers} batch={args.batch} accounts={args.accounts}"
        )
        results: dict[str, list[Phase]] = {"belfry": [], "raw": []}
        if not args.no_procrastinate:
            results["procrastinate"] = []

        def show(run: int, name: str, phase: Phase) -> None:
            results[name].append(phase)
            print(_line(run, name, phase, cluster is not None), flush=True)

        for run in range(args.runs):
            show(run, "belfry", await belfry_run(bench, args.items, args.workers, args.batch, args.accounts))
            if not args.no_procrastinate:
                show(run, "procrastinate", await procrastinate_run(bench, args.peer_items))
            show(run, "raw", await raw_run(bench, args.items, args.workers))

        print(f"\nmedians of {args.runs} runs")
        for name, phases in results.items():
            enq = statistics.median(p.enqueue_rate for p in phases)
            drain = statistics.median(p.drain_rate for p in phases)
            line = f"median {name:13s} enqueue {enq:9,.0f}/s  drain {drain:9,.0f}/s"
            if cluster is not None:
                line += (
                    f"  | drain per item: client {_median(phases, 'drain', 'client_us'):.1f} µs, "
                    f"postgres {_median(phases, 'drain', 'pg_us'):.1f} µs, WAL {_median(phases, 'drain', 'wal'):,.0f} B, "
                    f"row versions {_median(phases, 'drain', 'versions'):.2f} (ins+upd), "
                    f"HOT {_median(phases, 'drain', 'hot_share'):.0%}, dead after {_median(phases, 'drain', 'dead'):.2f}"
                    f" | enqueue WAL {_median(phases, 'enqueue', 'wal'):,.0f} B"
                )
            print(line)
        med = {name: statistics.median(p.drain_rate for p in phases) for name, phases in results.items()}
        if "procrastinate" in med:
            print(f"ratio belfry/procrastinate drain {med['belfry'] / med['procrastinate']:.1f}x")
        print(f"ratio belfry/raw drain {med['belfry'] / med['raw']:.2f}x")


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
