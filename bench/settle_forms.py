"""Two ways to settle a finished delivery, on the same rows of the same server: update it, or move it.

The queue today finishes a delivery by updating its row (``Queue.settle_rows``:
state, ``finished_at``, the lease released), which is not a HOT update (the
row leaves the pending indexes and enters ``deliveries_finished_by_account``).
The other form considered for the data-path work deletes the delivery and
inserts a narrow outcome record (the delivery without its lease columns and
due times) into a table with two indexes, as a queue that keeps only live
work does. This script measures both on one scratch database per run (the
schema as migrated today, plus the outcome table for the second form):

1. ``--deliveries`` deliveries are enqueued as the dispatcher writes them (the
   message stored once in ``queue.messages``, the delivery's own fields in its
   payload), in ``--accounts`` accounts, and all claimed (``Queue.claim``);
2. optionally (``--checkpoint``) a ``CHECKPOINT``, so the settles pay the
   full-page images that the first change of a page after a checkpoint costs;
3. every lease is settled as sent, 1,000 to a statement, by one form.

Per settled delivery: the wall time of the settles (client and server
together, one connection, nothing else running), the CPU of this process
and of PostgreSQL's processes meanwhile, their WAL bytes
(``pg_current_wal_lsn()`` difference) and WAL records (``pg_walinspect``). The
claims' WAL is printed too (not their time: every delivery is claimed before
any is settled, so later claims step over the leased rows as no worker's
do). The two forms alternate,
``--runs`` times each; medians at the end.

Usage: python bench/settle_forms.py [--deliveries 20000] [--accounts 10] [--runs 3] [--checkpoint]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from belfry import db, log
from belfry.queue import Lease, NewDelivery, Queue, Sent, enqueue

from bench.datapath_common import wal_by_relation
from bench.queue_common import CpuMeter, drop_database, scratch_database, server_versions

CHUNK = 1000
FORMS = ("update", "move")

# The second form's table: what a finished delivery's outcome needs (status timeline, dedup, retention,
# dead letters), without the lease and due-time columns; keyed like the deliveries.
_OUTCOMES = """
create table queue.bench_outcomes (
    account_id      text        not null,
    delivery_id     bigint      not null,
    notification_id uuid        not null,
    user_id         text        not null,
    channel         text        not null,
    topic           text        not null,
    state           text        not null,
    attempts        integer     not null,
    payload         jsonb       not null,
    errors          jsonb,
    created_at      timestamptz not null,
    finished_at     timestamptz not null,
    trace_id        uuid,
    primary key (account_id, notification_id, user_id, channel)
);
create index on queue.bench_outcomes (account_id, finished_at);
"""

# Delete the leased rows (fenced by token, as the update is) and record each one's outcome.
_MOVE = """
with gone as (
    delete from queue.deliveries d
    using unnest($1::bigint[], $2::bigint[], $3::text[]) as x(id, token, account)
    where d.account_id = x.account and d.delivery_id = x.id and d.lease_token = x.token
    returning d.*
)
insert into queue.bench_outcomes
select account_id, delivery_id, notification_id, user_id, channel, topic, 'sent', attempts, payload,
       nullif(errors, '[]'::jsonb), created_at, now(), trace_id
from gone
returning account_id, delivery_id, trace_id, extract(epoch from now() - created_at)::float8 as age
"""


async def _fill(pool: asyncpg.Pool, n: int, accounts: int) -> None:
    """Deliveries as the dispatcher writes them: a ~500-byte shared message, the bell-style flags of their own."""
    expires = datetime.now(UTC) + timedelta(hours=1)
    message = {
        "title": "Quote Q-1042 was accepted by ACME",
        "body": "Ann Smith accepted the quote on behalf of ACME Corporation. " * 5,
        "url": "https://app.example/quotes/1042",
        "recipient_email": "someone@example.com",
    }
    flags = {"bell": False, "popup": False, "sound": "", "browser": False}
    for start in range(0, n, CHUNK):
        rows = [
            NewDelivery(
                f"acct{i % accounts:03d}", uuid.uuid4(), "u1", "email", "deal.won", flags, expires, message=message
            )
            for i in range(start, min(n, start + CHUNK))
        ]
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, rows)


async def _lsn(pool: asyncpg.Pool) -> int:
    lsn: int = await pool.fetchval("select (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
    return lsn


async def _records(pool: asyncpg.Pool, start: int, end: int) -> int:
    """WAL records between two positions (pg_walinspect: exact, unlike pg_stat_wal, flushed by each backend later)."""
    return sum(records for _, _, _, records in await wal_by_relation(pool, start, end))


async def _settle(pool: asyncpg.Pool, queue: Queue, form: str, leases: list[Lease]) -> None:
    for start in range(0, len(leases), CHUNK):
        chunk = leases[start : start + CHUNK]
        if form == "update":
            done = len(await queue.settle_rows([(lease, Sent()) for lease in chunk]))
        else:
            done = len(
                await pool.fetch(
                    _MOVE, [x.delivery_id for x in chunk], [x.token for x in chunk], [x.account_id for x in chunk]
                )
            )
        if done != len(chunk):
            raise RuntimeError(f"{form}: settled {done} of {len(chunk)}")


async def run(form: str, n: int, accounts: int, checkpoint: bool) -> dict[str, float]:
    """One form on a fresh database: per delivery, the claims' and the settles' µs, WAL bytes and records."""
    dsn = await scratch_database()
    pool = await db.create_pool(dsn, application_name="bench-settle", min_size=1, max_size=2)
    try:
        await pool.execute(_OUTCOMES)
        await _fill(pool, n, accounts)
        await pool.execute("vacuum analyze queue.deliveries")
        queue = Queue(pool, "email", worker="bench")
        lsn0 = await _lsn(pool)
        leases: list[Lease] = []
        while len(leases) < n and (got := await queue.claim(CHUNK)):
            leases += got
        lsn1 = await _lsn(pool)
        claim_records = await _records(pool, lsn0, lsn1)  # before a checkpoint may recycle that WAL
        if checkpoint:
            await pool.execute("checkpoint")
        lsn2, started = await _lsn(pool), time.perf_counter()
        with CpuMeter() as cpu:
            await _settle(pool, queue, form, leases)
        settle_s, lsn3 = time.perf_counter() - started, await _lsn(pool)
        left = await pool.fetchval("select count(*) from queue.deliveries where finished_at is null")
        if left:
            raise RuntimeError(f"{form}: {left} deliveries still pending")
        k = len(leases)
        return {
            "claim_wal": (lsn1 - lsn0) / k,
            "claim_records": claim_records / k,
            "settle_us": 1e6 * settle_s / k,
            "client_us": 1e6 * cpu.own / k,
            "postgres_us": 1e6 * cpu.postgres / k,
            "settle_wal": (lsn3 - lsn2) / k,
            "settle_records": await _records(pool, lsn2, lsn3) / k,
        }
    finally:
        await pool.close()
        await drop_database(dsn)


def _line(form: str, r: dict[str, float]) -> str:
    return (
        f"{form:7s} settle {r['settle_us']:6.1f} µs (CPU: client {r['client_us']:5.1f}, postgres {r['postgres_us']:5.1f}),"
        f" WAL {r['settle_wal']:6,.0f} B, {r['settle_records']:5.2f} records per delivery"
        f" | claim WAL {r['claim_wal']:5,.0f} B, {r['claim_records']:5.2f} records"
    )


async def main() -> None:
    """Alternate the two forms ``--runs`` times and print the medians."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--deliveries", type=int, default=20_000)
    parser.add_argument("--accounts", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoint", action="store_true", help="a CHECKPOINT between the claims and the settles")
    args = parser.parse_args()
    log.configure(service="bench-settle", level="warning")
    print(await server_versions("asyncpg", "uvloop"))
    print(f"deliveries={args.deliveries} accounts={args.accounts} checkpoint={args.checkpoint}")
    results: dict[str, list[dict[str, float]]] = {form: [] for form in FORMS}
    for i in range(args.runs):
        for form in FORMS:
            r = await run(form, args.deliveries, args.accounts, args.checkpoint)
            results[form].append(r)
            print(f"run {i + 1} {_line(form, r)}", flush=True)
    print(f"\nmedians of {args.runs} runs")
    for form, rs in results.items():
        print(f"median {_line(form, {k: statistics.median(r[k] for r in rs) for k in rs[0]})}")


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
