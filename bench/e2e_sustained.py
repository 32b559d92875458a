"""Sustained end to end: accept, fan out and drain to no-op senders for minutes.

Preferences and the dispatcher run as real processes (the ``belfry up``
supervisor) on a fresh database of the local PostgreSQL, with the shipped
backpressure limits; two no-op sender processes (``bench/noop_sender.py``:
today's sender loop with a handler that answers Sent) drain the ``email`` and
``bell`` channels. For ``--minutes`` a producer keeps ``--inflight``
``PublishBatch`` calls of ``--per-call`` events in flight (1 recipient, email
and bell: 2 deliveries per notification), as fast as they are accepted (or
at ``--rate`` events/s); a call refused by backpressure (RESOURCE_EXHAUSTED)
waits a second. Then the producer stops and the queue drains out.

Reported per ``--window`` seconds, from the rows themselves (database clock):
notifications accepted, deliveries sent (÷ 2: notifications delivered), the
delivery lag (``finished_at - created_at``: from the publishing transaction to
the settle) p50 / p99, and, sampled at the window's end, the age of the oldest
due delivery and the queue depth. Over the whole run: CPU seconds and µs per
notification of every process (this database's PostgreSQL backends, and
every PostgreSQL process of the server), WAL bytes per notification.

Usage: python bench/e2e_sustained.py [--minutes 3] [--window 10] [--inflight 4] [--per-call 1000] [--rate 0] [--batch 200] [--concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import psutil
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.local import supervisor

from bench import datapath_common as common
from bench.queue_common import drop_database, scratch_database

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Producer:
    """Counts of what the producer saw."""

    accepted: int = 0
    other: int = 0
    refused_calls: int = 0
    calls: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def _produce(
    stub: dispatcher_pb2_grpc.DispatcherServiceStub, template: list[pb.Event], p: Producer, rate: float
) -> None:
    """One in-flight call at a time, each with fresh idempotency keys."""
    started = time.monotonic()
    while not p.stop.is_set():
        if rate > 0:
            # Open loop over every producer task: the next call is due once the events all of them sent are due.
            ahead = (p.accepted + p.other) / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        for ev in template:
            ev.idempotency_key = uuid.uuid4().hex
        try:
            answer = await stub.PublishBatch(pb.PublishBatchRequest(events=template), timeout=120)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            p.refused_calls += 1
            await asyncio.sleep(1.0)
            continue
        p.calls += 1
        ok = sum(1 for s in answer.statuses if s.outcome == pb.OUTCOME_ACCEPTED)
        p.accepted += ok
        p.other += len(answer.statuses) - ok


async def _noop_senders(env: dict[str, str], batch: int, concurrency: int) -> list[asyncio.subprocess.Process]:
    procs = []
    for channel in ("email", "bell"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.noop_sender", "--channel", channel, "--batch", str(batch),
            "--concurrency", str(concurrency), cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"READY":
            raise RuntimeError(f"no-op {channel} sender did not start: {line!r}")
        procs.append(proc)
    return procs


async def _stop(senders: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM (they finish what they hold), SIGKILL after 15 s (a sender stuck in a statement)."""
    for s in senders:
        if s.returncode is None:
            s.terminate()
    for s in senders:
        try:
            await asyncio.wait_for(s.wait(), 15)
        except TimeoutError:
            s.kill()
            await s.wait()


async def _sample(conn: asyncpg.Connection) -> tuple[float, int]:
    """Age of the oldest due delivery (s) and how many are due, as the dispatcher's backpressure reads them."""
    row = await conn.fetchrow(
        """
        select coalesce(extract(epoch from now() - min(x.available_at)), 0)::float8 as lag,
               (select count(*) from queue.deliveries
                where finished_at is null and available_at <= now() and state = 'queued') as depth
        from unnest(array['email', 'bell']) as c(channel),
        lateral (select available_at from queue.deliveries
                 where channel = c.channel and finished_at is null and available_at <= now() and state = 'queued'
                 order by available_at limit 1) x
        """
    )
    assert row is not None
    return float(row["lag"]), int(row["depth"])


async def main() -> None:
    """Run, drain out, report per window and over the run."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--per-call", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.0, help="events/s to offer (0: as fast as accepted)")
    parser.add_argument("--users", type=int, default=100)
    # The gateway's bell sender ships with 200 and 200.
    parser.add_argument("--batch", type=int, default=200, help="no-op senders: leases per claim")
    parser.add_argument("--concurrency", type=int, default=200, help="no-op senders: handlers")
    parser.add_argument("--drain-limit", type=float, default=300.0, help="seconds to wait for the drain-out")
    args = parser.parse_args()
    dsn = await scratch_database()
    name = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(dsn)
    env = common.mesh_env(dsn, Path(tempfile.mkdtemp(prefix="belfry-bench-")))
    children: list[supervisor.Child] = []
    senders: list[asyncio.subprocess.Process] = []
    try:
        print(await common.versions(conn, "grpcio", "asyncpg", "uvloop"))
        print(
            f"minutes={args.minutes} inflight={args.inflight} per_call={args.per_call} rate={args.rate or 'max'} "
            f"no-op senders: batch={args.batch} concurrency={args.concurrency}; backpressure: shipped defaults"
        )
        children = await supervisor.start_mesh(env, ("preferences", "dispatcher"))
        users = common.user_ids(args.users)
        await common.seed(env, users)
        senders = await _noop_senders(env, args.batch, args.concurrency)
        procs = {c.name: psutil.Process(c.process.pid) for c in children}
        procs |= {f"noop_{ch}": psutil.Process(s.pid) for ch, s in zip(("email", "bell"), senders, strict=True)}
        procs["client"] = psutil.Process()
        meter = common.Cpu(procs, name)
        channel = common.connect(env, env["BELFRY_DISPATCHER_ADDRESS"])
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        templates = [
            [common.event(k * args.per_call + i, [users[i % len(users)]]) for i in range(args.per_call)]
            for k in range(args.inflight)
        ]
        producer = Producer()
        before = await common.snapshot(conn)
        t0 = await conn.fetchval("select clock_timestamp()")
        await meter.start(conn)
        started = time.monotonic()
        tasks = [asyncio.create_task(_produce(stub, t, producer, args.rate)) for t in templates]
        samples: list[tuple[float, int, int, int]] = []  # (lag, depth, refused calls so far, accepted so far)
        while time.monotonic() - started < args.minutes * 60:
            await asyncio.sleep(args.window - (time.monotonic() - started) % args.window)
            lag, depth = await _sample(conn)
            samples.append((lag, depth, producer.refused_calls, producer.accepted))
            print(
                f"  t={time.monotonic() - started:5.0f}s accepted {producer.accepted:,} oldest due {lag:.1f}s "
                f"depth {depth:,} refused calls {producer.refused_calls}",
                flush=True,
            )
        producer.stop.set()
        await asyncio.gather(*tasks)
        produced = time.monotonic() - started
        deadline = time.monotonic() + args.drain_limit
        while not await common.fanned_out(conn) or await conn.fetchval(common.PENDING):
            if time.monotonic() > deadline:
                print(f"NOT DRAINED {args.drain_limit:.0f} s after the producer stopped; reporting what was sent")
                break
            await asyncio.sleep(0.5)
        drained = time.monotonic() - started
        used = await meter.stop(conn)
        await channel.close()
        await _stop(senders)
        senders = []
        await supervisor.stop_all(children, 10)
        children = []
        # A statement of a sender that had to be killed still runs in its backend: end it.
        await conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where datname = current_database() and application_name like 'bench-noop-%'"
        )
        await common.settle_stats(conn)
        cost = common.delta(before, await common.snapshot(conn))
        n = producer.accepted
        w = args.window
        accepted_rows = {
            int(r["w"]): r["n"]
            for r in await conn.fetch(
                "select floor(extract(epoch from accepted_at - $1) / $2)::int as w, count(*) as n "
                "from dispatcher.notifications group by 1",
                t0,
                w,
            )
        }
        sent_rows = {
            int(r["w"]): r
            for r in await conn.fetch(
                """
                select floor(extract(epoch from finished_at - $1) / $2)::int as w, count(*) as n,
                       percentile_cont(0.5) within group (order by extract(epoch from finished_at - created_at)) as p50,
                       percentile_cont(0.99) within group (order by extract(epoch from finished_at - created_at)) as p99
                from queue.deliveries where state = 'sent' group by 1
                """,
                t0,
                w,
            )
        }
        states = {
            r["state"]: r["n"] for r in await conn.fetch("select state, count(*) as n from queue.deliveries group by 1")
        }
        print(f"\nwindow ({w:.0f} s)  accepted/s  deliveries sent/s (notifications/s)  lag p50 / p99 s  "
              "oldest due s  depth  refused calls")  # fmt: skip
        last = max([*accepted_rows, *sent_rows])
        for k in range(last + 1):
            sent = sent_rows.get(k)
            sample = samples[k] if k < len(samples) else None
            sampled = f"{sample[0]:6.1f}  {sample[1]:7,}  {sample[2]}" if sample else "  (drain-out)"
            lags = f"{sent['p50']:5.2f} / {sent['p99']:5.2f}" if sent else "    - /     -"
            sent_n = sent["n"] if sent else 0
            print(
                f"  {k * w:5.0f}–{(k + 1) * w:<5.0f}  {accepted_rows.get(k, 0) / w:10,.0f}  "
                f"{sent_n / w:12,.0f} ({sent_n / w / 2:8,.0f})  {lags}  {sampled}"
            )
        steady = range(1, len(samples))  # the first window holds the start-up
        acc = [accepted_rows.get(k, 0) / w for k in steady]
        dlv = [(sent_rows[k]["n"] if k in sent_rows else 0) / w for k in steady]
        total_sent = sum(r["n"] for r in sent_rows.values())
        print(
            f"\naccepted {n:,} notifications in {produced:.0f} s ({n / produced:,.0f}/s; refused calls "
            f"{producer.refused_calls}, other outcomes {producer.other}); all {total_sent:,} deliveries sent "
            f"{drained:.0f} s after the start ({total_sent / drained:,.0f}/s overall, drain-out "
            f"{drained - produced:.0f} s); states {states}"
        )
        if acc:
            print(
                f"median over windows 2..{len(samples)}: accepted {statistics.median(acc):,.0f}/s, "
                f"delivered {statistics.median(dlv):,.0f} deliveries/s ({statistics.median(dlv) / 2:,.0f} notifications/s)"
            )
        print(f"CPU over the run (until drained): {common.cpu_line(used, drained, n, 'notification')}")
        print(
            f"WAL {cost.wal / n:,.0f} B/notification ({cost.wal / 2**20:,.0f} MiB, FPI {cost.wal_fpi:,}); "
            f"other databases meanwhile: {cost.foreign_commits:,} commits, {cost.foreign_rows:,} rows written"
        )
    finally:
        await _stop(senders)
        await supervisor.stop_all(children, 10)
        await conn.close()
        await drop_database(dsn)


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
