"""Batching: handoff intake and window closing, beside procrastinate draining the same number of jobs.

The same PostgreSQL, default durability. Each run, alternating:

* Belfry intake: ``--items`` assignment handoffs (``--users`` users, several
  objects each) already on the ``batching`` queue channel are applied by the
  real intake handler under ``worker.run`` (one transaction per handoff:
  delivery id recorded, latest assignee upserted, undo delete, window row
  locked, item upserted; then batched settles);
* Belfry close: the clock moves past the window and two closer replicas
  (``Closer.tick``) close every window: one ``EffectiveBatch`` call to the
  real preferences service per (account, topic) batch, then per window a
  transaction that locks it, merges its items and enqueues the merged
  notification on two channels;
* procrastinate 3: ``batch_defer_async`` of the same number of jobs with the
  same payloads, then ``run_worker_async`` (concurrency 10) with a no-op task
  — the peer does less work per item than the intake (no writes of its own).

Usage: python bench/batching_merge.py [--items 5000] [--users 500] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from belfry import db, handoff, rpc, service
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.handoff import Assignment
from belfry.local import supervisor
from belfry.message import Item, Message
from belfry.preferences import Preferences
from belfry.queue import Lease, NewDelivery, Outcome, Queue, enqueue, worker
from procrastinate import App, PsycopgConnector

from bench.queue_common import CpuMeter, drop_database, scratch_database, versions
from services.batching.clock import ManualClock
from services.batching.intake import Intake
from services.batching.windows import Closer
from services.preferences.server import build_for as prefs_build_for
from services.preferences.settings import load_settings as prefs_settings

ACCOUNT = "bench-account"
CHUNK = 1000


def assignment(i: int, users: int, now: datetime) -> Assignment:
    """The i-th assignment: contact i to user i % users."""
    user = f"user{i % users}"
    url = f"https://app.example.com/contacts/{i}"
    message = Message(
        notification_id=str(uuid.uuid4()),
        account_id=ACCOUNT,
        user_id=user,
        topic="contacts.contact_assigned",
        title=f"Contact {i} was assigned to you",
        body="Ana Tester assigned this contact to you from the CRM.",
        url=url,
        occurred_at=now.isoformat(),
        actor_user_id="boss",
        recipient_email=f"{user}@example.com",
        items=(Item("contact", str(i), f"Contact {i}", url),),
    )
    expires = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    return Assignment(message, ("email", "bell"), "contact", str(i), now.isoformat(), expires)


async def belfry_run(pool: asyncpg.Pool, env: dict[str, str], items: int, users: int) -> tuple[float, float, str, str]:
    """Intake rate (handoffs/s), close rate (windows/s) and the CPU shares of both phases."""
    await pool.execute("truncate queue.deliveries; truncate batching.windows cascade; truncate batching.received;")
    await pool.execute("truncate batching.assignees")
    clock = ManualClock(datetime.now(UTC))
    rows = [
        NewDelivery(
            ACCOUNT,
            uuid.uuid4(),
            f"user{i % users}",
            "batching",
            "contacts.contact_assigned",
            handoff.to_payload(assignment(i, users, clock.now())),
            datetime.now(UTC) + timedelta(days=1),
        )
        for i in range(items)
    ]
    for k in range(0, items, CHUNK):
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, rows[k : k + CHUNK])
    intake = Intake(pool, clock, window=timedelta(seconds=300))
    stop = asyncio.Event()
    applied = asyncio.Event()
    seen = 0

    async def handle(lease: Lease) -> Outcome:
        nonlocal seen
        outcome = await intake.handle(lease)
        seen += 1
        if seen >= items:
            applied.set()
        return outcome

    with CpuMeter() as cpu_in:
        started = time.perf_counter()
        task = asyncio.create_task(worker.run(Queue(pool, "batching", worker="bench"), handle, stop=stop))
        await applied.wait()
        # The last batch's settle commits before the clock stops.
        sent = "select count(*) from queue.deliveries where state = 'sent'"
        while await pool.fetchval(sent) < items:  # noqa: ASYNC110 - polling the database, not an in-process flag
            await asyncio.sleep(0.005)
        intake_seconds = time.perf_counter() - started
        stop.set()
        await task
    # Batching's own identity: the allow-list lets only the dispatcher and batching ask EffectiveBatch.
    channel = rpc.connect(env["BELFRY_PREFERENCES_ADDRESS"], supervisor.client_tls(env, "batching"))
    closers = [
        Closer(pool, Preferences(channel), clock, worker=f"closer{n}", batch=100, tick_seconds=0.01) for n in range(2)
    ]
    clock.advance(301)
    windows = await pool.fetchval("select count(*) from batching.windows where state = 'open'")

    async def drain(closer: Closer) -> None:
        while await closer.tick():
            pass

    with CpuMeter() as cpu_close:
        started = time.perf_counter()
        await asyncio.gather(*(drain(c) for c in closers))
        close_seconds = time.perf_counter() - started
    await channel.close()
    sent = await pool.fetchval("select count(*) from batching.windows where state = 'sent'")
    assert sent == windows == users, (sent, windows, users)
    return items / intake_seconds, windows / close_seconds, cpu_in.share(intake_seconds), cpu_close.share(close_seconds)


async def procrastinate_run(dsn: str, items: int, users: int) -> tuple[float, str]:
    """Drain rate of the same number of jobs with the same payloads, and its CPU share."""
    app = App(connector=PsycopgConnector(conninfo=dsn))
    count = 0
    finished = asyncio.Event()

    @app.task(name="noop", queue="bench")
    async def noop(**_: object) -> None:
        nonlocal count
        count += 1
        if count >= items:
            finished.set()

    now = datetime.now(UTC)
    async with app.open_async():
        async with app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
            await conn.execute("truncate procrastinate_jobs cascade")
        bodies = [handoff.to_payload(assignment(i, users, now)) for i in range(items)]
        for k in range(0, items, CHUNK):
            await noop.batch_defer_async(*bodies[k : k + CHUNK])
        with CpuMeter() as cpu:
            started = time.perf_counter()
            run = asyncio.create_task(
                app.run_worker_async(queues=["bench"], concurrency=10, wait=True, install_signal_handlers=False)
            )
            await finished.wait()
            elapsed = time.perf_counter() - started
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
    return items / elapsed, cpu.share(elapsed)


async def main() -> None:
    """Alternate Belfry and procrastinate ``--runs`` times; print medians and the ratio."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    dsn = await scratch_database()
    try:
        app = App(connector=PsycopgConnector(conninfo=dsn))
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
        print(await versions(dsn, "asyncpg", "grpcio", "procrastinate", "psycopg"))
        print(f"items={args.items} users={args.users} (window of {args.items // args.users} assignments each)")
        pool = await db.create_pool(dsn, application_name="bench-batching", min_size=4, max_size=12)
        env = supervisor.local_callers(
            {"BELFRY_DATABASE_URL": dsn, "BELFRY_GRPC_ADDRESS": "127.0.0.1:0", "BELFRY_METRICS_ADDRESS": "off"}
        )
        settings = prefs_settings(env)
        prefs = await service.start("preferences", settings.common, prefs_build_for(settings), pool=pool)
        address = f"127.0.0.1:{prefs.port}"
        env["BELFRY_PREFERENCES_ADDRESS"] = address
        channel = supervisor.connect(env, address)
        directory = directory_pb2_grpc.DirectoryServiceStub(channel)
        await directory.UpsertAccount(
            directory_pb2.UpsertAccountRequest(
                account=directory_pb2.Account(account_id=ACCOUNT, name="Bench", tier=directory_pb2.TIER_PROFESSIONAL)
            )
        )
        for u in range(args.users):
            user = directory_pb2.User(
                account_id=ACCOUNT,
                user_id=f"user{u}",
                email=f"user{u}@example.com",
                time_zone="Europe/Paris",
                locale="en",
                permission_set="sales",
                active=True,
            )
            await directory.UpsertUser(directory_pb2.UpsertUserRequest(user=user))
        belfry: list[tuple[float, float, str, str]] = []
        peer: list[tuple[float, str]] = []
        for run in range(args.runs):
            belfry.append(await belfry_run(pool, env, args.items, args.users))
            peer.append(await procrastinate_run(dsn, args.items, args.users))
            intake, close, cpu_in, cpu_close = belfry[-1]
            print(f"run {run + 1} belfry intake {intake:8,.0f} handoffs/s ({cpu_in})")
            print(f"run {run + 1} belfry close  {close:8,.0f} windows/s  ({cpu_close})")
            print(f"run {run + 1} procrastinate drain {peer[-1][0]:8,.0f} jobs/s ({peer[-1][1]})")
        med_in = statistics.median(r[0] for r in belfry)
        med_close = statistics.median(r[1] for r in belfry)
        med_peer = statistics.median(r[0] for r in peer)
        print(
            f"median belfry intake {med_in:,.0f} handoffs/s, close {med_close:,.0f} windows/s "
            f"({med_close * args.items / args.users:,.0f} merged assignments/s)"
        )
        print(f"median procrastinate drain {med_peer:,.0f} jobs/s")
        print(f"ratio belfry intake / procrastinate drain: {med_in / med_peer:.2f}x")
        await channel.close()
        await prefs.stop()
        await pool.close()
    finally:
        await drop_database(dsn)


if __name__ == "__main__":
    asyncio.run(main())
