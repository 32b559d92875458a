"""Followers at scale: a record followed by 10,000 users, and a user following 100,000 records.

Preferences and the dispatcher run as real processes (the ``belfry up``
supervisor) on a fresh database. ``--followers`` users follow one deal
through ``FollowService.Follow`` (their own tokens); then, alternating for
``--runs`` rounds, one event about the deal is published

* addressed to its followers (``include_followers``: fan-out expands them in
  chunks of ``BELFRY_DISPATCHER_FANOUT_CHUNK``), and
* the peer: the same audience named in the event (``recipient_user_ids``),

and the time from the publish to the last delivery row written is measured,
with the CPU of the dispatcher, preferences and PostgreSQL per recipient
(nobody drains the queue: this is fan-out alone).

Then one user follows ``--follows`` records (written in bulk through the
dispatcher's own store function, as auto-follows are) and the cost of that
user's calls is measured against a user with a single follow: ``Follow`` of
one more record and the first ``ListFollows`` page, ``--calls`` of each,
median latency.

Usage: python bench/followers_fanout.py [--followers 10000] [--runs 3] [--follows 100000] [--calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import psutil
from belfry.api.common.v1 import common_pb2
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.auth import TokenIssuer
from belfry.local import supervisor

from bench import datapath_common as common
from bench.queue_common import drop_database, scratch_database

DEAL = pb.FollowedObject(type="deal", id="D-followed")


def _issuer() -> TokenIssuer:
    return TokenIssuer({common.KEY_ID: common.KEY.encode()}, common.KEY_ID)


def _meta(user: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {_issuer().issue(common.ACCOUNT, user)}"),)


async def _follow_all(follows: dispatcher_pb2_grpc.FollowServiceStub, users: list[str]) -> None:
    limit = asyncio.Semaphore(16)

    async def one(user: str) -> None:
        async with limit:
            await follows.Follow(pb.FollowRequest(object=DEAL), metadata=_meta(user))

    await asyncio.gather(*(one(u) for u in users))


async def _fan_out_once(
    conn: asyncpg.Connection, stub: dispatcher_pb2_grpc.DispatcherServiceStub, events: list[pb.Event], meter: common.Cpu
) -> tuple[float, dict[str, float], int]:
    """Publish ``events`` in one call, wait until their deliveries are all written: (seconds, CPU, recipients told).

    The CPU dict also carries ``wal_bytes``: the server's WAL written meanwhile (nothing else runs on it).
    """
    wal_before = await conn.fetchval("select pg_current_wal_lsn()")
    await meter.start(conn)
    started = time.perf_counter()
    answer = await stub.PublishBatch(pb.PublishBatchRequest(events=events), timeout=120)
    assert all(s.outcome == pb.OUTCOME_ACCEPTED for s in answer.statuses), answer
    await common.wait_fanned_out(conn)
    seconds = time.perf_counter() - started
    used = await meter.stop(conn)
    used["wal_bytes"] = float(await conn.fetchval("select pg_current_wal_lsn() - $1::pg_lsn", wal_before))
    told = await conn.fetchval(
        "select count(*) from dispatcher.recipients"
        " where account_id = $1 and notification_id = any($2::uuid[]) and state = 'accepted'",
        common.ACCOUNT,
        [uuid.UUID(s.notification_id) for s in answer.statuses],
    )
    return seconds, used, int(told)


async def _latencies(call: object, calls: int) -> float:
    """Median milliseconds of ``calls`` sequential awaits of ``call()``."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


async def _calls_of(follows: dispatcher_pb2_grpc.FollowServiceStub, user: str, calls: int) -> tuple[float, float]:
    """Median ms of ``user``'s Follow of a new record, and of their first ListFollows page."""
    meta = _meta(user)
    n = iter(range(10**9))

    def follow() -> object:
        return follows.Follow(
            pb.FollowRequest(object=pb.FollowedObject(type="ticket", id=f"T-{next(n)}")), metadata=meta
        )

    page = pb.ListFollowsRequest(page=common_pb2.PageRequest(page_size=50))
    return await _latencies(follow, calls), await _latencies(lambda: follows.ListFollows(page, metadata=meta), calls)


async def main() -> None:
    """Seed, follow, fan out both ways alternating, then the heavy follower's calls."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--followers", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--follows", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    dsn = await scratch_database()
    name = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(dsn)
    env = common.mesh_env(dsn, Path(tempfile.mkdtemp(prefix="belfry-bench-")))
    children: list[supervisor.Child] = []
    try:
        print(await common.versions(conn, "grpcio", "asyncpg", "uvloop"))
        children = await supervisor.start_mesh(env, ("preferences", "dispatcher"))
        users = common.user_ids(args.followers)
        await common.seed(env, [*users, "heavy", "light"])
        channel = common.connect(env, env["BELFRY_DISPATCHER_ADDRESS"])
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        follows = dispatcher_pb2_grpc.FollowServiceStub(channel)
        await _follow_all(follows, users)
        procs = {c.name: psutil.Process(c.process.pid) for c in children}
        meter = common.Cpu(procs, name)
        results: dict[str, list[tuple[float, dict[str, float], int]]] = {"followers": [], "named": []}
        for run in range(args.runs):
            for way in ("followers", "named") if run % 2 == 0 else ("named", "followers"):
                # An event names at most 1,000 users (MAX_IDS): the named peer is one call of as many events.
                groups: list[list[str]] = (
                    [[]] if way == "followers" else [users[i : i + 1000] for i in range(0, len(users), 1000)]
                )
                events = [common.event(run, group) for group in groups]
                for ev in events:
                    ev.object.id = DEAL.id
                    ev.include_followers = way == "followers"
                results[way].append(await _fan_out_once(conn, stub, events, meter))
        print(f"\n{args.followers:,} recipients, fan-out only (medians of {args.runs}):")
        for way, label in (
            ("followers", "one event addressed to the record's followers"),
            ("named", "the same users named, 1,000 per event, one call"),
        ):
            rows = results[way]
            seconds = statistics.median(r[0] for r in rows)
            told = rows[0][2]
            cpu = {k: statistics.median(r[1][k] for r in rows) for k in rows[0][1]}
            wal = cpu.pop("wal_bytes")
            print(
                f"  {label}: {seconds:.2f} s to the last delivery row ({told / seconds:,.0f} recipients/s, "
                f"{told:,} told); WAL {wal / told:,.0f} B/recipient; CPU {common.cpu_line(cpu, seconds, told, 'recipient')}"
            )

        # A user following --follows records, beside one following a single record.
        from services.dispatcher import follow_store  # noqa: PLC0415 - the dispatcher's own store, as auto-follows use

        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        assert pool is not None
        chunk = 10_000
        started = time.perf_counter()
        for i in range(0, args.follows, chunk):
            async with pool.acquire() as c, c.transaction():
                await follow_store.auto_follow(
                    c,
                    [
                        (common.ACCOUNT, "deal", f"D-{n}", "heavy", "owner")
                        for n in range(i, min(args.follows, i + chunk))
                    ],
                )
        print(f"\n{args.follows:,} follows of one user written in {time.perf_counter() - started:.1f} s (bulk)")
        await follows.Follow(pb.FollowRequest(object=pb.FollowedObject(type="deal", id="D-0")), metadata=_meta("light"))
        for user in ("light", "heavy"):
            count = await conn.fetchval(
                "select count(*) from dispatcher.follows where account_id = $1 and user_id = $2", common.ACCOUNT, user
            )
            follow_ms, list_ms = await _calls_of(follows, user, args.calls)
            print(
                f"  a user with {count:,} follows: Follow {follow_ms:.2f} ms, first ListFollows page {list_ms:.2f} ms"
            )
        await pool.close()
        await channel.close()
    finally:
        await supervisor.stop_all(children, 10)
        await conn.close()
        await drop_database(dsn)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
