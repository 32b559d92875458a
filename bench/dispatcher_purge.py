"""How fast the dispatcher's retention forgets keys and purges notifications (``services.dispatcher.store.purge``).

A scratch database of the server ``BELFRY_TEST_ADMIN_DSN`` names gets
``--notifications`` notification rows (an event of ~400 bytes each, a key,
one decision row each), written directly in SQL and dated ``--age-days``
ago: 31 (the default) puts them past both the key window (24 h) and the
retention period (30 days), 2 past the key window only, as a dispatcher that
fell behind (or stopped purging for a while) leaves them. Then one ``purge`` run — what the
dispatcher does every ``BELFRY_DISPATCHER_PURGE_SECONDS`` (60) — is timed:
how many keys it forgot and notifications it purged, and at what rate.
``--runs`` fresh databases; medians at the end.

Usage: python bench/dispatcher_purge.py [--notifications 50000] [--age-days 31] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from belfry import db, log

from bench.queue_common import drop_database, scratch_database, server_versions
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


async def run(n: int, age_days: int) -> tuple[int, int, float]:
    """One purge run over ``n`` notifications accepted ``age_days`` ago: (keys forgotten, purged, seconds)."""
    dsn = await scratch_database()
    pool = await db.create_pool(dsn, application_name="bench-purge", min_size=1, max_size=2)
    try:
        await pool.execute(_FILL, n, age_days)
        await pool.execute("vacuum analyze dispatcher.notifications, dispatcher.recipients")
        started = time.perf_counter()
        keys, purged = await store.purge(pool, key_hours=24, retention_days=30)
        return keys, purged, time.perf_counter() - started
    finally:
        await pool.close()
        await drop_database(dsn)


async def main() -> None:
    """Time ``--runs`` purge runs and print their rates."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--notifications", type=int, default=50_000)
    parser.add_argument("--age-days", type=int, default=31)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    log.configure(service="bench-purge", level="warning")
    print(await server_versions("asyncpg", "uvloop"))
    rates = []
    for i in range(args.runs):
        keys, purged, seconds = await run(args.notifications, args.age_days)
        rates.append(max(keys, purged) / seconds)
        print(
            f"run {i + 1}: one purge run forgot {keys:,} keys and purged {purged:,} notifications "
            f"in {seconds:.2f} s ({max(keys, purged) / seconds:,.0f} notifications/s)",
            flush=True,
        )
    print(f"median {statistics.median(rates):,.0f} notifications/s per purge run (of {args.notifications:,} due)")


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
