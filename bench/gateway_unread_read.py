"""The fan-out read's cost against a user's unread backlog: the kept count beside counting the feed.

Each push to tabs reads the new feed rows with their users' unread counts
(``services.gateway.store.items_with_unread``). Before migration 0004 the
count was a ``count(*)`` over the user's unread items (the partial index
``feed_unread``); now it is the ``unread`` column of ``gateway.feed_seq``.
For 100 users holding ``backlog`` unread items each, the bench times the
read of 10 new items of 10 users both ways, on the same rows, in one
connection: the old statement (kept here as it was) is the peer.

Usage: python -m bench.gateway_unread_read [--backlogs 10,100,1000,10000] [--runs 5] [--calls 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg

from bench.queue_common import drop_database, scratch_database, versions

_COUNTED = """
with wanted as (select * from unnest($1::text[], $2::text[], $3::bigint[]) as w(account_id, user_id, id))
select f.id, f.account_id, f.user_id,
       (select count(*) from gateway.feed u
         where u.account_id = f.account_id and u.user_id = f.user_id
           and u.in_feed and u.read_at is null and u.archived_at is null) as unread
from wanted w join gateway.feed f using (account_id, user_id, id)
"""
_KEPT = """
with wanted as (select * from unnest($1::text[], $2::text[], $3::bigint[]) as w(account_id, user_id, id))
select f.id, f.account_id, f.user_id, s.unread
from wanted w join gateway.feed f using (account_id, user_id, id)
     join gateway.feed_seq s using (account_id, user_id)
"""
_USERS = 100


async def _fill(conn: asyncpg.Connection, backlog: int) -> None:
    """100 users with ``backlog`` unread bell items each (the triggers keep their counts)."""
    await conn.execute("truncate gateway.feed, gateway.feed_seq")
    await conn.execute(
        "insert into gateway.feed_seq (account_id, user_id, last_id) select 'acc', 'u' || n, $2 "
        "from generate_series(0, $1 - 1) n",
        _USERS,
        backlog,
    )
    await conn.execute(
        """insert into gateway.feed (account_id, user_id, id, notification_id, topic, title, body, url,
                                     in_feed, popup, browser, sound)
           select 'acc', 'u' || n, k, gen_random_uuid(), 'deals.stage_changed', 'Deal moved', '', '',
                  true, false, false, ''
           from generate_series(0, $1 - 1) n, generate_series(1, $2) k""",
        _USERS,
        backlog,
    )
    await conn.execute("vacuum analyze gateway.feed")
    await conn.execute("vacuum analyze gateway.feed_seq")


async def _time(
    conn: asyncpg.Connection, query: str, keys: tuple[list[str], list[str], list[int]], calls: int
) -> float:
    """Milliseconds per call."""
    started = time.perf_counter()
    for _ in range(calls):
        await conn.fetch(query, *keys)
    return (time.perf_counter() - started) / calls * 1000


async def main() -> None:
    """For each backlog, the median of ``--runs`` timings of each statement, alternating."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlogs", default="10,100,1000,10000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    dsn = await scratch_database()
    conn = await asyncpg.connect(dsn)
    try:
        print(await versions(dsn, "asyncpg"))
        print("unread per user | read of 10 new items: count(*) (before) | kept count (now) | ratio")
        for backlog in (int(b) for b in args.backlogs.split(",")):
            await _fill(conn, backlog)
            keys = (["acc"] * 10, [f"u{i}" for i in range(10)], [backlog] * 10)
            counted: list[float] = []
            kept: list[float] = []
            for _ in range(args.runs):
                counted.append(await _time(conn, _COUNTED, keys, args.calls))
                kept.append(await _time(conn, _KEPT, keys, args.calls))
            before, now = statistics.median(counted), statistics.median(kept)
            print(f"{backlog:>15,} | {before:8.2f} ms | {now:8.2f} ms | {before / now:5.1f}x", flush=True)
    finally:
        await conn.close()
        await drop_database(dsn)


if __name__ == "__main__":
    asyncio.run(main())
