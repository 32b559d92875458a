"""End-to-end benchmark: publish N events through the real mesh, count emails out.

Starts preferences, dispatcher and the email sender as separate processes
(the same supervisor as ``belfry up``) on a fresh database of the local
PostgreSQL, with an in-process counting SMTP sink (aiosmtpd), then publishes
N events (one recipient each, email + bell) in batches of 500 and reports:

* accepted events/s  — until the last PublishBatch answered (all committed);
* delivered emails/s — from the first publish until the sink counted N mails;
* the sink's own ceiling (aiosmtplib → the same sink, pooled connections);
* CPU seconds used by each process over the run.

Usage: python bench/e2e_mesh.py [--events 5000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
import uuid
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import asyncpg
import grpc
import psutil
from aiosmtpd.controller import Controller
from belfry import migrate
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from belfry.local import demo, supervisor

ADMIN = os.environ.get("BELFRY_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
TOPIC = "comments.mentioned"


class CountingSink:
    """An aiosmtpd handler that only counts accepted messages."""

    def __init__(self) -> None:
        self.count = 0
        self.done = asyncio.Event()
        self.target = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd hook
        self.count += 1
        if self.count >= self.target and self.loop is not None:
            self.loop.call_soon_threadsafe(self.done.set)
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _sink_ceiling(port: int, sink: CountingSink, n: int) -> float:
    sink.count, sink.target = 0, n
    sink.done.clear()
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.test", "b@example.test", "ceiling"
    msg.set_content("x" * 800)
    started = time.perf_counter()

    async def worker(k: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as smtp:
            for _ in range(k):
                await smtp.send_message(msg)

    await asyncio.gather(*(worker(n // 10) for _ in range(10)))
    return n / (time.perf_counter() - started)


async def _one_run(n: int, sink: CountingSink, sink_port: int) -> dict[str, float]:
    name = f"belfry_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN)
    await admin.execute(f'create database "{name}"')
    await admin.close()
    url = ADMIN.rsplit("/", 1)[0] + f"/{name}"
    await migrate.migrate_url(url)
    env = dict(os.environ)
    env.update(
        BELFRY_DATABASE_URL=url,
        BELFRY_TOKEN_KEYS="bench=" + "b" * 48,
        BELFRY_LOG_LEVEL="warning",
        BELFRY_METRICS_ADDRESS="off",
        BELFRY_SMTP_HOST="127.0.0.1",
        BELFRY_SMTP_PORT=str(sink_port),
        BELFRY_SMTP_STARTTLS="false",
        BELFRY_EMAIL_DAILY_CAP="1000000",
        BELFRY_UNSUBSCRIBE_KEY="u" * 48,
    )
    for svc in ("preferences", "dispatcher", "email"):
        env[f"BELFRY_{svc.upper()}_GRPC_ADDRESS"] = "127.0.0.1:0"
    supervisor.local_callers(env)
    children = await supervisor.start_mesh(env, ("preferences", "dispatcher", "email"))
    try:
        prefs = supervisor.connect(env, env["BELFRY_PREFERENCES_ADDRESS"])
        await demo.seed(prefs)
        users = [f"u{i}" for i in range(100)]
        directory = directory_pb2_grpc.DirectoryServiceStub(prefs)
        for u in users:
            await directory.UpsertUser(
                directory_pb2.UpsertUserRequest(
                    user=directory_pb2.User(
                        account_id=demo.DEMO_ACCOUNT,
                        user_id=u,
                        email=f"{u}@example.test",
                        locale="en",
                        time_zone="UTC",
                        permission_set="sales",
                        active=True,
                    )
                )
            )
        chan = supervisor.connect(env, env["BELFRY_DISPATCHER_ADDRESS"])
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(chan)
        events = [
            demo.event(
                account_id=demo.DEMO_ACCOUNT,
                topic=TOPIC,
                recipients=[users[i % len(users)]],
                actor="bruno",
                object_name=f"Deal {i}",
            )
            for i in range(n)
        ]
        procs = {c.name: psutil.Process(c.process.pid) for c in children}
        cpu_before = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
        sink.count, sink.target = 0, n
        sink.done.clear()
        started = time.perf_counter()
        for i in range(0, n, 500):
            await stub.PublishBatch(dispatcher_pb2.PublishBatchRequest(events=events[i : i + 500]))
        accepted = time.perf_counter() - started
        await asyncio.wait_for(sink.done.wait(), 600)
        delivered = time.perf_counter() - started
        cpu = {k: sum(p.cpu_times()[:2]) - cpu_before[k] for k, p in procs.items()}
        await chan.close()
        await prefs.close()
        result = {"accepted_per_s": n / accepted, "emails_per_s": n / delivered}
        result.update({f"cpu_{k}_s": v for k, v in cpu.items()})
        return result
    finally:
        await supervisor.stop_all(children, 10)
        admin = await asyncpg.connect(ADMIN)
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sink = CountingSink()
    sink.loop = asyncio.get_running_loop()
    port = _free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    print(
        f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, asyncpg {asyncpg.__version__}, cores {os.cpu_count()}"
    )
    try:
        ceilings, runs = [], []
        for r in range(args.runs):
            ceilings.append(await _sink_ceiling(port, sink, 2000))
            runs.append(await _one_run(args.events, sink, port))
            print(
                f"run {r + 1}: sink ceiling {ceilings[-1]:.0f}/s, "
                + ", ".join(f"{k} {v:.1f}" for k, v in runs[-1].items())
            )
        print(f"median sink ceiling (aiosmtplib 10 connections → aiosmtpd): {statistics.median(ceilings):.0f} msgs/s")
        for key in runs[0]:
            print(f"median {key}: {statistics.median(r[key] for r in runs):.1f}")
    finally:
        controller.stop()


if __name__ == "__main__":
    asyncio.run(main())
