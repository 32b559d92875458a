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
* Belfry single ``Publish``: ``--singles`` events, 32 calls in flight.

Durability is PostgreSQL's default (synchronous_commit=on, fsync on, logged
tables): every figure counts only committed, acknowledged events. Reported:
median events/s of each, the ratio, and the CPU seconds of each process
(dispatcher, preferences, this client, all PostgreSQL backends) per run.

Usage: python bench/dispatcher_publish.py [--events 20000] [--singles 4000] [--runs 3] [--inflight 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
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

ADMIN = os.environ.get("BELFRY_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
ACCOUNT = "bench"
TOPIC = "deals.stage_changed"
USERS = [f"u{i}" for i in range(100)]


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


class Cpu:
    """CPU seconds of named processes, and of this database's PostgreSQL backends, between start() and stop().

    Only backends connected to the benchmark's database count: other work on
    the same server (other databases) is not ours.
    """

    def __init__(self, procs: dict[str, psutil.Process], admin: asyncpg.Connection, database: str) -> None:
        self.procs = procs
        self.admin = admin
        self.database = database
        self.before: dict[str, float] = {}
        self.backends: list[psutil.Process] = []

    async def _now(self) -> dict[str, float]:
        out = {k: sum(p.cpu_times()[:2]) for k, p in self.procs.items()}
        total = 0.0
        for p in self.backends:
            try:
                total += sum(p.cpu_times()[:2])
            except psutil.Error:
                continue
        out["postgres"] = total
        return out

    async def start(self) -> None:
        pids = await self.admin.fetch("select pid from pg_stat_activity where datname = $1", self.database)
        self.backends = []
        for r in pids:
            try:
                self.backends.append(psutil.Process(r["pid"]))
            except psutil.Error:
                continue
        self.before = await self._now()

    async def stop(self) -> dict[str, float]:
        return {k: v - self.before[k] for k, v in (await self._now()).items()}


async def _belfry_batch(stub: dispatcher_pb2_grpc.DispatcherServiceStub, n: int, inflight: int) -> float:
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

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return n / (time.perf_counter() - started)


async def _belfry_single(stub: dispatcher_pb2_grpc.DispatcherServiceStub, n: int) -> float:
    events = [_event(i) for i in range(n)]
    it = iter(events)

    async def worker() -> None:
        for ev in it:
            await stub.Publish(pb.PublishRequest(event=ev), timeout=60)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(32)))
    return n / (time.perf_counter() - started)


async def _procrastinate(app: procrastinate.App, n: int, inflight: int) -> float:
    task = app.tasks["deliver"]
    calls = [[_job(i, c) for i in range(s, min(n, s + 1000)) for c in ("email", "bell")] for s in range(0, n, 1000)]
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for c in calls:
        queue.put_nowait(c)

    async def worker() -> None:
        while not queue.empty():
            await task.batch_defer_async(*queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return n / (time.perf_counter() - started)


async def _seed(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
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
    args = parser.parse_args()
    print(
        f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, asyncpg {asyncpg.__version__}, "
        f"procrastinate {procrastinate.__version__}, cores {os.cpu_count()}"
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
    children = await supervisor.start_mesh(env, ("preferences", "dispatcher"))
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url, max_size=10))
    app.task(name="deliver")(lambda **kw: None)
    try:
        await _seed(env["BELFRY_PREFERENCES_ADDRESS"])
        channel = grpc.aio.insecure_channel(env["BELFRY_DISPATCHER_ADDRESS"])
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        procs = {c.name: psutil.Process(c.process.pid) for c in children}
        procs["client"] = psutil.Process()
        cpu = Cpu(procs, admin, name)
        await _belfry_batch(stub, 2000, args.inflight)  # warm-up: connections, caches
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            await _procrastinate(app, 2000, args.inflight)
            results: dict[str, list[float]] = {"belfry_batch": [], "procrastinate": [], "belfry_single": []}
            for run in range(args.runs):
                phases: list[tuple[str, Callable[[], Awaitable[float]]]] = [
                    ("belfry_batch", lambda: _belfry_batch(stub, args.events, args.inflight)),
                    ("procrastinate", lambda: _procrastinate(app, args.events, args.inflight)),
                    ("belfry_single", lambda: _belfry_single(stub, args.singles)),
                ]
                for label, go in phases:
                    await cpu.start()
                    rate = await go()
                    used = await cpu.stop()
                    results[label].append(rate)
                    total = sum(used.values()) or 1.0
                    share = ", ".join(f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in used.items())
                    print(f"run {run + 1} {label}: {rate:,.0f} events/s; cpu {share}")
        for label, rates in results.items():
            print(f"median {label}: {statistics.median(rates):,.0f} events/s")
        ratio = statistics.median(results["belfry_batch"]) / statistics.median(results["procrastinate"])
        print(f"ratio belfry PublishBatch / procrastinate batch_defer_async: {ratio:.2f}")
        await channel.close()
    finally:
        await supervisor.stop_all(children, 10)
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
