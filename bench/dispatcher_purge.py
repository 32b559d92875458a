"""How fast the dispatcher's retention forgets keys and purges notifications (``services.dispatcher.store.purge``).

A scratch database of the server ``BELFRY_TEST_ADMIN_DSN`` names gets
``--notifications`` notification rows (an event of ~400 bytes each, a key,
one decision row each), written directly in SQL and dated ``--age-days``
ago: 31 (the default) puts them past both the key window (24 h) and the
retention period (30 days), 2 past the key window only, as a dispatcher that
fell behind (or stopped purging for a while) leaves them. Then one ``purge`` run — what the
dispatcher does every ``BELFRY_DISPATCHER_PURGE_SECONDS`` (60) — is timed:
how many keys it forgot and notifications it purged, at what rate, and per
notification the CPU of this process and of PostgreSQL and the WAL bytes (a
``CHECKPOINT`` first). Past retention, the peer runs beside it on an
identical database: the same rows deleted by one plain statement per table
(no batches), the least a purge can cost. ``--runs`` fresh databases each,
alternating; medians at the end.

Usage: python bench/dispatcher_purge.py [--notifications 50000] [--age-days 31] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

from belfry import db, log

from bench.queue_common import CpuMeter, drop_database, scratch_database, server_versions
from services.dispatcher import store

_FILL = """
with n as (
    insert into dispatcher.notifications
        (account_id, notification_id, idempotency_key, body_hash, topic, occurred_at, accepted_at, object, event)
    select 'acct' || (g % 100), gen_random_uuid(), md5(g::text), sha256(g::text::bytea), 'deals.won',
           now() - make_interval(days => $2), now() - make_interval(days => $2),
           '{"type": "deal", "id": "D-1", "display_name": "Big deal", "url": "https://app.example/deals/1"}',
           jsonb_build_object('title', 'Deal won', 'body', repeat('x', 300), 'recipients', jsonb_build_array('ana'))
    from generate_series(1, $1::int) g
    returning account_id, notification_id, accepted_at)
insert into dispatcher.recipients (account_id, notification_id, user_id, accepted_at, state, channels)
select account_id, notification_id, 'ana', accepted_at, 'accepted', '[{"c": "email", "s": "on", "r": ""}]' from n
"""


# The peer: the same rows gone in one plain statement each (no batches, no keys cleared, no backlog rows
# looked at): what deleting them costs PostgreSQL at the least, the ceiling of any purge.
_RAW = """
with gone as (delete from dispatcher.notifications where accepted_at < now() - make_interval(days => $1)
              returning account_id, notification_id)
delete from dispatcher.recipients r using gone
where r.account_id = gone.account_id and r.notification_id = gone.notification_id
"""


@dataclass(frozen=True)
class Run:
    """One purge run: what it did and what it cost."""

    keys: int
    purged: int
    seconds: float
    cpu: CpuMeter
    wal: int

    def line(self, name: str, n: int) -> str:
        done = max(self.keys, self.purged)
        per = max(done, 1)
        return (
            f"{name:7s} forgot {self.keys:,} keys and purged {self.purged:,} of {n:,} in {self.seconds:.2f} s "
            f"({done / self.seconds:,.0f}/s); per notification: client {1e6 * self.cpu.own / per:.1f} µs, "
            f"postgres {1e6 * self.cpu.postgres / per:.1f} µs, WAL {self.wal / per:,.0f} B"
        )


async def run(n: int, age_days: int, *, raw: bool) -> Run:
    """One purge (Belfry's, or the raw peer's) over ``n`` notifications accepted ``age_days`` ago."""
    dsn = await scratch_database()
    pool = await db.create_pool(dsn, application_name="bench-purge", min_size=1, max_size=2)
    lsn = "select (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"
    try:
        await pool.execute(_FILL, n, age_days)
        await pool.execute("vacuum analyze dispatcher.notifications, dispatcher.recipients")
        await pool.execute("checkpoint")
        wal0, started = await pool.fetchval(lsn), time.perf_counter()
        with CpuMeter() as cpu:
            if raw:
                keys, purged = 0, int((await pool.execute(_RAW, 30)).split()[-1])
            else:
                keys, purged = await store.purge(pool, key_hours=24, retention_days=30)
        seconds = time.perf_counter() - started
        return Run(keys, purged, seconds, cpu, await pool.fetchval(lsn) - wal0)
    finally:
        await pool.close()
        await drop_database(dsn)


async def main() -> None:
    """Alternate ``--runs`` purge runs with the raw peer's and print their rates and costs."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--notifications", type=int, default=50_000)
    parser.add_argument("--age-days", type=int, default=31)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    log.configure(service="bench-purge", level="warning")
    print(await server_versions("asyncpg", "uvloop"))
    rates: dict[str, list[float]] = {"belfry": [], "raw": []}
    for i in range(args.runs):
        for name in ("belfry", "raw"):
            if name == "raw" and args.age_days <= 30:
                continue  # the raw peer deletes records past retention; it has no key window to compare with
            r = await run(args.notifications, args.age_days, raw=name == "raw")
            rates[name].append(max(r.keys, r.purged) / r.seconds)
            print(f"run {i + 1} {r.line(name, args.notifications)}", flush=True)
    for name, values in rates.items():
        if values:
            print(f"median {name}: {statistics.median(values):,.0f} notifications/s per purge run")


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
