"""What a sender replica's upkeep statements cost as the backlog grows: rescue, expire, a claim, the gauges.

A sender replica runs, besides its claims, ``Queue.rescue`` (leases that ran
out become claimable again) and ``Queue.expire`` (rows past their time to
live) on a schedule, and ``ops.update_gauges`` every few seconds. Claims are
HOT updates (migration 0003): no index names the leased rows, so a rescue
reads every due row of its channel. This script fills one channel with
``--backlog`` due deliveries (100 accounts; 200 of them leased, as a
replica holds a claim) on a fresh database of the server
``BELFRY_TEST_ADMIN_DSN`` names and times each statement (median of
``--repeat``), for each backlog size given.

Usage: python bench/queue_upkeep.py [--backlog 100000,1000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import asyncpg
from belfry import db, log
from belfry.queue import Queue, ops

from bench.queue_common import drop_database, scratch_database, server_versions

# Due deliveries written in one statement (the enqueue path's cost is not what is measured here).
_FILL = """
insert into queue.deliveries (account_id, notification_id, user_id, channel, topic, payload, expires_at)
select 'acct' || (g % 100), gen_random_uuid(), 'u1', 'email', 'deal.won', '{"bell": false}', now() + interval '1 hour'
from generate_series(1, $1::int) g
"""


async def _time(step: Callable[[], Awaitable[object]], repeat: int) -> float:
    """Median milliseconds of ``repeat`` runs of ``step``."""
    took = []
    for _ in range(repeat):
        started = time.perf_counter()
        await step()
        took.append(1000 * (time.perf_counter() - started))
    return statistics.median(took)


async def measure(backlog: int, repeat: int) -> dict[str, float]:
    """Each upkeep statement's median ms with ``backlog`` deliveries due on one channel."""
    dsn = await scratch_database()
    pool: asyncpg.Pool = await db.create_pool(dsn, application_name="bench-upkeep", min_size=1, max_size=2)
    try:
        await pool.execute(_FILL, backlog)
        await pool.execute("vacuum analyze queue.deliveries")
        queue = Queue(pool, "email", worker="bench")
        await queue.claim(200)
        return {
            "rescue": await _time(queue.rescue, repeat),
            "expire": await _time(queue.expire, repeat),
            "claim of 200": await _time(lambda: queue.claim(200), repeat),
            "gauges": await _time(lambda: ops.update_gauges(pool), repeat),
        }
    finally:
        await pool.close()
        await drop_database(dsn)


async def main() -> None:
    """Measure every backlog size and print one line per statement."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlog", default="100000,1000000", help="comma-separated numbers of due deliveries")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    log.configure(service="bench-upkeep", level="warning")
    print(await server_versions("asyncpg", "uvloop"))
    for backlog in (int(x) for x in args.backlog.split(",")):
        for name, ms in (await measure(backlog, args.repeat)).items():
            print(f"backlog {backlog:>9,}  {name:13s} {ms:8.1f} ms (median of {args.repeat})", flush=True)


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
