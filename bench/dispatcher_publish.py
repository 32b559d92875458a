"""Dispatcher benchmark: durable PublishBatch and Publish, side by side with procrastinate.

Starts preferences and the dispatcher as separate processes (the supervisor of
``belfry up``) on a fresh database of the local PostgreSQL, seeds one account
with 100 users, then alternates, ``--runs`` times:

* Belfry ``PublishBatch``: ``--events`` events in calls of 1,000, ``--inflight``
  calls at once; each event has 1 recipient whose topic (deals.stage_changed)
  is on for email and bell, so each accepted event commits a notification
  row, a recipient-decision row and 2 queue deliveries (one transaction per call);
* procrastinate ``batch_defer_async``: the same number of events as 2 jobs each
  (one per channel) carrying the same rendered message, 2,000 jobs per call,
  the same number of calls in flight, on the same PostgreSQL server;
* Belfry single ``Publish``: ``--singles`` events, 32 calls in flight;
* the raw asyncpg ``COPY`` ceiling: the same rows Belfry commits per event
  (a notification, a recipient decision, 2 deliveries carrying the message
  JSON), built beforehand, written with ``copy_records_to_table`` into
  copies of the dispatcher's and the queue's tables (same columns, defaults
  and indexes), one transaction per 1,000 events, ``--inflight`` at once.

Durability is PostgreSQL's default (synchronous_commit=on, fsync on, logged
tables): every figure counts only committed, acknowledged events. Reported:
median events/s of each, the ratios, and per run the CPU seconds of each
process (dispatcher, preferences, this client; ``postgres``: this database's
backends; ``postgres_all``: every PostgreSQL process of the server) with CPU
µs per event, and the client's own ceiling (events ÷ its CPU seconds: the
rate at which this one-core client would be the limit).

``--py-spy FILE`` then records the dispatcher with ``py-spy record --native``
for ``--py-spy-seconds`` while PublishBatch keeps it busy (``.svg``: a flame
graph; anything else: collapsed stacks).

Usage: python bench/dispatcher_publish.py [--events 20000] [--singles 4000] [--runs 3] [--inflight 4]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import procrastinate
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from belfry import migrate
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.local import supervisor
from belfry.message import Message

from bench import datapath_common as common

ADMIN = os.environ.get("BELFRY_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
ACCOUNT = "bench"
TOPIC = "deals.stage_changed"
USERS = [f"u{i}" for i in range(100)]
# Called by each phase once its inputs are built, right before it starts the clock.
Ready = Callable[[], Awaitable[None]] | None


def _event(i: int) -> pb.Event:
    ev = pb.Event(
        account_id=ACCOUNT,
        topic=TOPIC,
        actor=pb.Actor(user_id="actor", source=pb.ACTOR_SOURCE_UI),
        object=pb.ObjectRef(type="deal", id=f"D-{i}", display_name=f"Deal {i}", url=f"https://app.example/deals/{i}"),
        recipient_user_ids=[USERS[i % len(USERS)]],
        idempotency_key=uuid.uuid4().hex,
    )
    ev.occurred_at.GetCurrentTime()
    return ev


def _job(i: int, channel: str) -> dict[str, Any]:
    """The procrastinate job: the same rendered message a Belfry delivery carries."""
    user = USERS[i % len(USERS)]
    message = Message(
        notification_id=str(uuid.uuid4()),
        account_id=ACCOUNT,
        user_id=user,
        topic=TOPIC,
        title="A deal you own or follow changed stage",
        body=f"Deal {i}, by Actor",
        url=f"https://app.example/deals/{i}",
        occurred_at="2026-01-01T00:00:00+00:00",
        recipient_email=f"{user}@example.test",
        items=(),
    )
    return {"channel": channel, "user_id": user, "payload": message.to_json()}


async def _belfry_batch(
    stub: dispatcher_pb2_grpc.DispatcherServiceStub, n: int, inflight: int, ready: Ready = None
) -> float:
    events = [_event(i) for i in range(n)]
    batches = [events[i : i + 1000] for i in range(0, n, 1000)]
    queue: asyncio.Queue[list[pb.Event]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)

    async def worker() -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            answer = await stub.PublishBatch(pb.PublishBatchRequest(events=batch), timeout=120)
            assert all(s.outcome == pb.OUTCOME_ACCEPTED for s in answer.statuses), answer.statuses[0]

    if ready is not None:  # inputs are built: the CPU window opens here
        await ready()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return n / (time.perf_counter() - started)


async def _belfry_single(stub: dispatcher_pb2_grpc.DispatcherServiceStub, n: int, ready: Ready = None) -> float:
    events = [_event(i) for i in range(n)]
    it = iter(events)

    async def worker() -> None:
        for ev in it:
            await stub.Publish(pb.PublishRequest(event=ev), timeout=60)

    if ready is not None:  # inputs are built: the CPU window opens here
        await ready()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(32)))
    return n / (time.perf_counter() - started)


async def _procrastinate(app: procrastinate.App, n: int, inflight: int, ready: Ready = None) -> float:
    task = app.tasks["deliver"]
    calls = [[_job(i, c) for i in range(s, min(n, s + 1000)) for c in ("email", "bell")] for s in range(0, n, 1000)]
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for c in calls:
        queue.put_nowait(c)

    async def worker() -> None:
        while not queue.empty():
            await task.batch_defer_async(*queue.get_nowait())

    if ready is not None:  # inputs are built: the CPU window opens here
        await ready()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return n / (time.perf_counter() - started)


# The tables the COPY ceiling writes: copies of Belfry's (columns, defaults, indexes), and the columns it fills.
_COPY_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "notifications": (
        "dispatcher.notifications",
        ("account_id", "notification_id", "idempotency_key", "body_hash", "topic", "occurred_at", "actor_user_id",
         "actor_source", "object"),
    ),
    "recipients": ("dispatcher.recipients", ("account_id", "notification_id", "user_id", "state", "reason", "channels")),
    "deliveries": (
        "queue.deliveries",
        ("account_id", "notification_id", "user_id", "channel", "topic", "payload", "expires_at", "max_attempts"),
    ),
}  # fmt: skip
_CHANNEL_RECORD = json.dumps(
    [{"c": c, "s": "accepted", "r": ""} for c in ("email", "bell")]
    + [{"c": c, "s": "suppressed", "r": "preference_off"} for c in ("popup", "browser", "other_apps", "mobile")]
)


async def _copy_setup(pool: asyncpg.Pool) -> None:
    await pool.execute("create schema if not exists copy_ceiling")
    for table, (source, _) in _COPY_TABLES.items():
        await pool.execute(f"create table if not exists copy_ceiling.{table} (like {source} including all)")


async def _copy(pool: asyncpg.Pool, n: int, inflight: int, ready: Ready = None) -> float:
    """The raw ceiling: Belfry's rows for n events, prepared beforehand, written with binary COPY."""
    now = datetime.now(UTC)
    expires = now + timedelta(days=7)
    calls: list[dict[str, list[tuple[Any, ...]]]] = []
    for s in range(0, n, 1000):
        rows: dict[str, list[tuple[Any, ...]]] = {t: [] for t in _COPY_TABLES}
        for i in range(s, min(n, s + 1000)):
            nid, user = uuid.uuid4(), USERS[i % len(USERS)]
            obj = {"type": "deal", "id": f"D-{i}", "display_name": f"Deal {i}", "url": f"https://app.example/deals/{i}"}
            rows["notifications"].append(
                (ACCOUNT, nid, uuid.uuid4().hex, hashlib.sha256(str(i).encode()).digest(), TOPIC, now, "actor", 1,
                 json.dumps(obj))
            )  # fmt: skip
            rows["recipients"].append((ACCOUNT, nid, user, "accepted", "", _CHANNEL_RECORD))
            for channel in ("email", "bell"):
                payload = json.dumps(_job(i, channel)["payload"])
                rows["deliveries"].append((ACCOUNT, nid, user, channel, TOPIC, payload, expires, 10))
        calls.append(rows)
    pending = iter(calls)

    async def worker() -> None:
        async with pool.acquire() as conn:
            for call in pending:
                async with conn.transaction():
                    for table, (_, columns) in _COPY_TABLES.items():
                        await conn.copy_records_to_table(
                            table, schema_name="copy_ceiling", columns=list(columns), records=call[table]
                        )

    if ready is not None:  # inputs are built: the CPU window opens here
        await ready()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return n / (time.perf_counter() - started)


async def _profile(
    stub: dispatcher_pb2_grpc.DispatcherServiceStub, pid: int, out: str, seconds: int, inflight: int
) -> None:
    """py-spy record of the dispatcher (native frames included) while PublishBatch keeps it busy."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    fmt = "flamegraph" if out.endswith(".svg") else "raw"
    spy = await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(pid), "--native", "-d", str(seconds), "-r", "100", "-f", fmt, "-o", out,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    published = 0
    while spy.returncode is None:
        await _belfry_batch(stub, 4000, inflight)
        published += 4000
    await spy.wait()
    print(f"py-spy: {out} ({seconds} s of the dispatcher, {published:,} events published meanwhile)")


async def _seed(channel: grpc.aio.Channel) -> None:
    async with channel:
        directory = directory_pb2_grpc.DirectoryServiceStub(channel)
        await directory.UpsertAccount(
            directory_pb2.UpsertAccountRequest(
                account=directory_pb2.Account(account_id=ACCOUNT, name="Bench", tier=directory_pb2.TIER_ENTERPRISE)
            )
        )
        for user in [*USERS, "actor"]:
            await directory.UpsertUser(
                directory_pb2.UpsertUserRequest(
                    user=directory_pb2.User(
                        account_id=ACCOUNT,
                        user_id=user,
                        email=f"{user}@example.test",
                        display_name=user.title(),
                        locale="en",
                        time_zone="UTC",
                        permission_set="sales",
                        active=True,
                    )
                )
            )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--singles", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--py-spy", default="", help="after the runs, profile the dispatcher into this file")
    parser.add_argument("--py-spy-seconds", type=int, default=20)
    args = parser.parse_args()
    print(
        f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, asyncpg {asyncpg.__version__}, "
        f"procrastinate {procrastinate.__version__}, cores {os.cpu_count()}, commit {common.git_commit()}, "
        f"load {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    name = f"belfry_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN)
    await admin.execute(f'create database "{name}"')
    print(
        "postgres",
        await admin.fetchval("show server_version"),
        "synchronous_commit",
        await admin.fetchval("show synchronous_commit"),
        "fsync",
        await admin.fetchval("show fsync"),
    )
    url = ADMIN.rsplit("/", 1)[0] + f"/{name}"
    await migrate.migrate_url(url)
    env = dict(os.environ)
    env.update(
        BELFRY_DATABASE_URL=url,
        BELFRY_TOKEN_KEYS="bench=" + "b" * 48,
        BELFRY_LOG_LEVEL="warning",
        BELFRY_METRICS_ADDRESS="off",
        BELFRY_DB_POOL_MAX="10",
        BELFRY_DISPATCHER_MAX_QUEUE_LAG_SECONDS="0",  # nothing drains the queue here
        BELFRY_DISPATCHER_MAX_QUEUE_DEPTH="0",
    )
    for svc in ("preferences", "dispatcher"):
        env[f"BELFRY_{svc.upper()}_GRPC_ADDRESS"] = "127.0.0.1:0"
    common.local_callers(env)
    children = await supervisor.start_mesh(env, ("preferences", "dispatcher"))
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url, max_size=10))
    app.task(name="deliver")(lambda **kw: None)
    copy_pool = await asyncpg.create_pool(url, min_size=args.inflight, max_size=args.inflight)
    try:
        await _seed(common.connect(env, env["BELFRY_PREFERENCES_ADDRESS"]))
        channel = common.connect(env, env["BELFRY_DISPATCHER_ADDRESS"])
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        procs = {c.name: psutil.Process(c.process.pid) for c in children}
        procs["client"] = psutil.Process()
        cpu = common.Cpu(procs, name)
        await _belfry_batch(stub, 2000, args.inflight)  # warm-up: connections, caches
        await _copy_setup(copy_pool)
        await _copy(copy_pool, 2000, args.inflight)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            await _procrastinate(app, 2000, args.inflight)
            labels = ("belfry_batch", "procrastinate", "copy", "belfry_single")
            results: dict[str, list[float]] = {k: [] for k in labels}
            costs: dict[str, list[dict[str, float]]] = {k: [] for k in labels}
            wal: dict[str, list[float]] = {k: [] for k in labels}
            mark: dict[str, int] = {}
            lsn = (
                "select (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"  # server-wide: other databases' work counts too
            )

            async def ready() -> None:
                await cpu.start(admin)
                mark["lsn"] = await admin.fetchval(lsn)

            for run in range(args.runs):
                phases: list[tuple[str, Callable[[], Awaitable[float]]]] = [
                    ("belfry_batch", lambda: _belfry_batch(stub, args.events, args.inflight, ready)),
                    ("procrastinate", lambda: _procrastinate(app, args.events, args.inflight, ready)),
                    ("copy", lambda: _copy(copy_pool, args.events, args.inflight, ready)),
                    ("belfry_single", lambda: _belfry_single(stub, args.singles, ready)),
                ]
                for label, go in phases:
                    n = args.singles if label == "belfry_single" else args.events
                    rate = await go()
                    used = await cpu.stop(admin)
                    wal[label].append((await admin.fetchval(lsn) - mark["lsn"]) / n)
                    results[label].append(rate)
                    costs[label].append({k: 1e6 * v / n for k, v in used.items()})
                    print(
                        f"run {run + 1} {label}: {rate:,.0f} events/s; WAL {wal[label][-1]:,.0f} B/event; "
                        f"cpu {common.cpu_line(used, n / rate, n, 'event')}; "
                        f"client ceiling {n / max(used['client'], 1e-6):,.0f} events/s",
                        flush=True,
                    )
            if args.py_spy:
                pid = next(c.process.pid for c in children if c.name == "dispatcher")
                await _profile(stub, pid, args.py_spy, args.py_spy_seconds, args.inflight)
        for label, rates in results.items():
            med = {k: statistics.median(c[k] for c in costs[label]) for k in costs[label][0]}
            print(
                f"median {label}: {statistics.median(rates):,.0f} events/s; WAL {statistics.median(wal[label]):,.0f} B/event; "
                "CPU µs/event "
                + ", ".join(f"{k} {v:.0f}" for k, v in med.items())
                + f"; client ceiling {1e6 / max(med['client'], 1e-6):,.0f} events/s"
            )
        batch = statistics.median(results["belfry_batch"])
        print(
            f"ratio belfry PublishBatch / procrastinate batch_defer_async: {batch / statistics.median(results['procrastinate']):.2f}"
        )
        print(
            f"ratio belfry PublishBatch / raw COPY of the same rows: {batch / statistics.median(results['copy']):.2f}"
        )
        await channel.close()
    finally:
        await copy_pool.close()
        await supervisor.stop_all(children, 10)
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
