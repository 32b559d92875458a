"""Write cost per notification: what one notification leaves in PostgreSQL from publish to purge.

For each shape (recipients by queue channels), on a fresh database of the
local PostgreSQL, with every service a real process (the ``belfry up``
supervisor):

1. **accept** — preferences and the dispatcher run; ``--notifications``
   events are published with ``PublishBatch`` (calls of 1,000, 4 in flight),
   then both are stopped;
2. **drain** — the real senders start and empty the queue: the gateway's
   bell sender (feed rows, NOTIFY), the email sender (daily-cap slots, MIME,
   SMTP with PIPELINING to Postfix's ``smtp-sink``) and, for the 3-channel
   shape, the web-push sender (the users have no push subscription and no
   live tab, so it drops each browser delivery after its two look-ups);
3. **retention** — the purge functions the services run on a schedule are
   called directly with a zero retention (waiting out 7 and 30 days is not
   practical): ``belfry.queue.ops.purge`` (finished deliveries, then
   ``VACUUM`` of the queue), the dispatcher's ``store.purge`` twice
   (idempotency keys cleared, then notifications and decisions deleted, as
   their windows of a day and 30 days come in production), the email cap counters (``purge_counts``); then a plain
   ``VACUUM`` of every data-path table, as autovacuum would do. The bell
   feed is never purged (there is no retention for it today).

Each stage is measured between two snapshots taken once every backend that
wrote has exited (statistics are flushed at exit): WAL bytes
(``pg_current_wal_lsn()`` difference), ``pg_stat_wal``, and per table
``n_tup_ins/upd/hot_upd/del`` from ``pg_stat_user_tables``; sizes with
``pg_total_relation_size``. A ``CHECKPOINT`` before each shape keeps
full-page images out of the figures (the count is printed). WAL is
server-wide: the commits and row writes of other databases in the same
window are printed beside it.

With ``--wal-by-relation``, each stage's WAL is also split by the table or
index it wrote (``pg_walinspect``; full-page images shown apart): where a
notification's WAL goes.

Usage: python bench/write_cost.py [--notifications 5000] [--shapes 1x2,3x3] [--users 100] [--wal-by-relation]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
from belfry import db
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.local import supervisor
from belfry.queue import ops

from bench import datapath_common as common
from bench.email_send import free_port, sink_ceiling
from bench.queue_common import ADMIN, drop_database, scratch_database
from services.dispatcher import store as dispatcher_store
from services.email import store as email_store

STAGES = ("accept", "drain", "retention")


@dataclass(frozen=True)
class Shape:
    """Recipients per notification and queue channels per recipient."""

    recipients: int
    channels: int

    @property
    def name(self) -> str:
        """As given on the command line."""
        return f"{self.recipients}x{self.channels}"

    @property
    def senders(self) -> tuple[str, ...]:
        """The sender services that drain this shape's channels."""
        return ("webpush", "email", "gateway") if self.channels == 3 else ("email", "gateway")


def parse_shape(text: str) -> Shape:
    """'1x2': 1 recipient, email and bell; '3x3': 3 recipients, bell, browser and email."""
    r, c = (int(x) for x in text.split("x"))
    if c not in (2, 3):
        raise argparse.ArgumentTypeError("channels must be 2 (email, bell) or 3 (email, bell, browser)")
    return Shape(r, c)


@dataclass(frozen=True)
class Result:
    """One shape's measurements."""

    shape: Shape
    n: int
    stages: dict[str, common.Delta]
    cpu: dict[str, dict[str, float]]
    seconds: dict[str, float]
    held: dict[str, int]  # table sizes after the drain (everything still retained)
    states: dict[str, int]
    wal_by: dict[str, list[tuple[str, int, int, int]]]  # per stage, with --wal-by-relation


async def _wait_drained(conn: asyncpg.Connection, patience: float = 900.0) -> None:
    deadline = time.monotonic() + patience
    while await conn.fetchval(common.PENDING):
        if time.monotonic() > deadline:
            raise RuntimeError("the senders did not drain the queue in time")
        await asyncio.sleep(0.2)


async def _retention(dsn: str, conn: asyncpg.Connection) -> dict[str, int]:
    """The services' purges with a zero retention, then a plain VACUUM of every data-path table."""
    pool = await db.create_pool(dsn, application_name="bench-retention", min_size=1, max_size=1)
    done = {"queue": 0, "keys": 0, "notifications": 0, "email_counts": 0}
    try:
        done["queue"] = await ops.purge(pool, older_than_seconds=0)
        # Keys first, then the records, as in production, where every key is cleared 29 days before its
        # record goes (a purge that finds a record past both windows deletes it without clearing its key).
        done["keys"], _ = await dispatcher_store.purge(pool, key_hours=0, retention_days=3650)
        _, done["notifications"] = await dispatcher_store.purge(pool, key_hours=0, retention_days=0)
        done["email_counts"] = await email_store.purge_counts(pool, keep_days=-1)
        names = await conn.fetch(
            "select schemaname || '.' || relname as name from pg_stat_user_tables where schemaname = any($1::text[])",
            list(common.DATA_SCHEMAS),
        )
        for r in names:
            await pool.execute(f"vacuum {r['name']}")
    finally:
        await pool.close()
    return done


async def measure(shape: Shape, n: int, users: list[str], smtp_port: int, *, by_relation: bool = False) -> Result:
    """Publish, drain and purge ``n`` notifications of ``shape`` on a fresh database."""
    dsn = await scratch_database()
    name = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(dsn)
    home = Path(tempfile.mkdtemp(prefix="belfry-bench-"))
    env = common.mesh_env(dsn, home, smtp_port=smtp_port)
    children: list[supervisor.Child] = []
    me = psutil.Process()
    stages: dict[str, common.Delta] = {}
    cpu: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    try:
        children = await supervisor.start_mesh(env, ("preferences", "dispatcher"))
        await common.seed(env, users, browser=shape.channels == 3)
        events = [
            common.event(i, [users[(i * shape.recipients + k) % len(users)] for k in range(shape.recipients)])
            for i in range(n)
        ]
        if await conn.fetchval("select count(*) from queue.deliveries"):
            raise RuntimeError("seeding left deliveries on the queue: they would be counted as the notifications'")
        await conn.execute("checkpoint")
        # -- accept
        meter = common.Cpu({c.name: psutil.Process(c.process.pid) for c in children} | {"client": me}, name)
        before = await common.snapshot(conn)
        await meter.start(conn)
        async with common.connect(env, env["BELFRY_DISPATCHER_ADDRESS"]) as channel:
            seconds["accept"] = await common.publish_all(dispatcher_pb2_grpc.DispatcherServiceStub(channel), events)
        # Fan-out runs behind the accept: the stage ends once every event is expanded into its deliveries.
        seconds["accept"] += await common.wait_fanned_out(conn)
        cpu["accept"] = await meter.stop(conn)
        await supervisor.stop_all(children, 10)
        children = []
        await common.settle_stats(conn)
        accepted = await common.snapshot(conn)
        stages["accept"] = common.delta(before, accepted)
        # -- drain
        started = time.perf_counter()
        children = await supervisor.start_mesh(env, shape.senders)
        meter = common.Cpu({c.name: psutil.Process(c.process.pid) for c in children}, name)
        await meter.start(conn)
        await _wait_drained(conn)
        seconds["drain"] = time.perf_counter() - started
        cpu["drain"] = await meter.stop(conn)
        states = {
            f"{r['channel']}:{r['state']}": r["n"]
            for r in await conn.fetch("select channel, state, count(*) as n from queue.deliveries group by 1, 2")
        }
        await supervisor.stop_all(children, 10)
        children = []
        await common.settle_stats(conn)
        drained = await common.snapshot(conn)
        stages["drain"] = common.delta(accepted, drained)
        # -- retention
        meter = common.Cpu({}, name)
        await meter.start(conn)
        started = time.perf_counter()
        purged = await _retention(dsn, conn)
        seconds["retention"] = time.perf_counter() - started
        cpu["retention"] = await meter.stop(conn)
        await common.settle_stats(conn)
        stages["retention"] = common.delta(drained, await common.snapshot(conn))
        print(f"  purged: {purged}", flush=True)
        wal_by = {}
        if by_relation:
            bounds = {"accept": (before, accepted), "drain": (accepted, drained), "retention": (drained, None)}
            end = await common.snapshot(conn)
            for stage, (a, b) in bounds.items():
                wal_by[stage] = await common.wal_by_relation(conn, a.lsn, (b or end).lsn)
        held = {k: t.size for k, t in drained.tables.items()}
        return Result(shape, n, stages, cpu, seconds, held, states, wal_by)
    finally:
        await supervisor.stop_all(children, 10)
        await conn.close()
        await drop_database(dsn)


def report(res: Result) -> None:
    """Print one shape's figures, per notification."""
    n = res.n
    print(f"\n== shape {res.shape.name}: {n:,} notifications, {res.shape.recipients} recipient(s) × "
          f"{res.shape.channels} queue channels; delivery states {res.states}")  # fmt: skip
    print("stage      seconds  WAL B/notif  WAL records/notif  FPI  other DBs meanwhile (commits, rows written)  CPU")
    for stage in STAGES:
        d = res.stages[stage]
        cpu = ", ".join(f"{k} {1e6 * v / n:.0f}" for k, v in res.cpu[stage].items())
        print(
            f"{stage:10s} {res.seconds[stage]:7.1f}  {d.wal / n:11,.0f}  {d.wal_records / n:17.1f}  {d.wal_fpi:4d}  "
            f"{d.foreign_commits:,} / {d.foreign_rows:,}  µs/notif: {cpu}"
        )
    total_wal = sum(d.wal for d in res.stages.values())
    print(f"total WAL {total_wal / n:,.0f} B/notification ({total_wal / 2**20:.1f} MiB)")
    print("\nper notification, all stages:  table: ins / upd (HOT) / del; row versions; HOT share; "
          "indexes (partial); index entries ≤; bytes held after drain → after purge+vacuum")  # fmt: skip
    names = sorted({k for d in res.stages.values() for k, t in d.tables.items() if t.ins or t.upd or t.dele})
    sums = {"versions": 0.0, "entries": 0.0, "del": 0.0, "held": 0.0, "left": 0.0, "upd": 0.0, "hot": 0.0}
    last = res.stages["retention"].tables
    for table in names:
        ts = [d.tables[table] for d in res.stages.values() if table in d.tables]
        ins, upd, hot, dele = (sum(getattr(t, f) for t in ts) for f in ("ins", "upd", "hot", "dele"))
        entries = sum(common.index_entries(t) for t in ts)
        idx, partial = ts[-1].indexes, ts[-1].partial
        held, left = res.held.get(table, 0), last[table].size if table in last else 0
        share = f"{100 * hot / upd:.0f} %" if upd else "-"
        print(
            f"  {table:26s} {ins / n:5.2f} / {upd / n:5.2f} ({hot / n:5.2f}) / {dele / n:5.2f}; "
            f"{(ins + upd) / n:5.2f}; {share:>5s}; {idx} ({partial}); {entries / n:6.2f}; "
            f"{held / n:7,.0f} → {left / n:7,.0f} B"
        )
        sums["versions"] += (ins + upd) / n
        sums["entries"] += entries / n
        sums["del"] += dele / n
        sums["upd"] += upd / n
        sums["hot"] += hot / n
        sums["held"] += held / n
        sums["left"] += left / n
    print(
        f"  {'total':26s} row versions {sums['versions']:.2f}, deletes {sums['del']:.2f}, HOT "
        f"{100 * sums['hot'] / sums['upd'] if sums['upd'] else 0:.0f} % of updates, index entries ≤ "
        f"{sums['entries']:.2f}, bytes held {sums['held']:,.0f} → {sums['left']:,.0f}"
    )
    for stage in STAGES:
        parts = []
        for table, t in sorted(res.stages[stage].tables.items()):
            if t.ins or t.upd or t.dele:
                parts.append(f"{table} {t.ins / n:.2f}/{t.upd / n:.2f}({t.hot / n:.2f})/{t.dele / n:.2f}")
        print(f"  {stage}: " + "; ".join(parts))
    for stage, rows in res.wal_by.items():
        print(f"\nWAL of {stage} by relation (B/notification, of which full-page images; records/notification):")
        for what, size, fpi, records in rows[:14]:
            print(f"  {what:48s} {size / n:8,.0f}  ({fpi / n:7,.0f})  {records / n:6.2f}")
        rest = rows[14:]
        if rest:
            print(f"  {'(the rest)':48s} {sum(r[1] for r in rest) / n:8,.0f}  ({sum(r[2] for r in rest) / n:7,.0f})")


async def main() -> None:
    """Measure every shape ``--runs`` times (alternating shapes) and print the per-notification figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--notifications", type=int, default=5000)
    parser.add_argument("--shapes", default="1x2,3x3", help="comma-separated RxC: recipients × queue channels")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--wal-by-relation", action="store_true", help="each stage's WAL by table and index (pg_walinspect)"
    )
    args = parser.parse_args()
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    users = common.user_ids(args.users)
    port = free_port()
    sink = common.start_smtp_sink(port)
    try:
        await asyncio.sleep(0.3)  # let smtp-sink bind
        probe = await asyncpg.connect(ADMIN)
        try:
            print(await common.versions(probe, "grpcio", "asyncpg", "uvloop", "aiosmtplib"))
        finally:
            await probe.close()
        print(
            f"sink ceiling (smtp-source, 20 sessions, 2,523-byte messages): {sink_ceiling(port, 5000, 2523):,.0f} msgs/s"
        )
        results: dict[str, list[Result]] = {s.name: [] for s in shapes}
        for run in range(args.runs):
            for shape in shapes:
                print(f"run {run + 1} shape {shape.name} …", flush=True)
                res = await measure(shape, args.notifications, users, port, by_relation=args.wal_by_relation)
                results[shape.name].append(res)
                report(res)
        if args.runs > 1:
            print("\nmedians over runs (per notification):")
            for name, rs in results.items():
                wal = statistics.median(sum(d.wal for d in r.stages.values()) / r.n for r in rs)
                per_stage = {s: statistics.median(r.stages[s].wal / r.n for r in rs) for s in STAGES}
                print(f"  {name}: WAL {wal:,.0f} B (" + ", ".join(f"{s} {v:,.0f}" for s, v in per_stage.items()) + ")")
    finally:
        sink.terminate()
        sink.wait()


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
