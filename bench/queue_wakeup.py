"""Idle wake-up latency: from a producer's commit to the sender's handler, via LISTEN/NOTIFY.

An idle ``worker.run`` (polling fallback set to 60 s, so only NOTIFY can wake
it) receives one delivery at a time; the time from just before the producer's
COMMIT to the handler's first line is recorded. Beside it, the same with
NOTIFY unavailable (the polling fallback at its default 1 s) for scale.

Usage: python bench/queue_wakeup.py [--samples 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

from belfry import db
from belfry.queue import Lease, NewDelivery, Outcome, Queue, Sent, enqueue, worker

from bench.queue_common import drop_database, scratch_database, versions


async def sample(dsn: str, samples: int, poll_seconds: float, notify: bool) -> list[float]:
    """Latencies in milliseconds for ``samples`` single deliveries."""
    pool = await db.create_pool(dsn, application_name="bench-wakeup", min_size=3, max_size=4)
    got: asyncio.Queue[float] = asyncio.Queue()

    async def handle(_: Lease) -> Outcome:
        got.put_nowait(time.perf_counter())
        return Sent()

    stop = asyncio.Event()
    task = asyncio.create_task(
        worker.run(Queue(pool, "mobile", worker="idle"), handle, stop=stop, poll_seconds=poll_seconds)
    )
    await asyncio.sleep(0.2)
    out: list[float] = []
    expires = datetime.now(UTC) + timedelta(hours=1)
    for i in range(samples):
        item = NewDelivery("acc", uuid.uuid4(), f"u{i}", "mobile", "t", {}, expires)
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            if notify:
                await enqueue(conn, [item])
            else:  # the same row without the NOTIFY: only polling finds it
                await conn.execute(
                    "insert into queue.deliveries (account_id, notification_id, user_id, channel, topic, payload, expires_at) "
                    "values ($1, $2, $3, 'mobile', 't', '{}', $4)",
                    item.account_id,
                    item.notification_id,
                    item.user_id,
                    item.expires_at,
                )
            started = time.perf_counter()
            await tx.commit()
        out.append((await got.get() - started) * 1000)
        await asyncio.sleep(0.01)  # idle again
    stop.set()
    await task
    await pool.close()
    return out


async def main() -> None:
    """Print median and p99 wake-up latency per run, NOTIFY and polling."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    dsn = await scratch_database()
    try:
        print(await versions(dsn, "asyncpg", "uvloop"))
        medians, polls = [], []
        for run in range(args.runs):
            lat = sorted(await sample(dsn, args.samples, 60.0, True))
            poll = sorted(await sample(dsn, max(10, args.samples // 10), 1.0, False))
            medians.append(statistics.median(lat))
            polls.append(statistics.median(poll))
            print(
                f"run {run + 1}: NOTIFY median {statistics.median(lat):.2f} ms, p99 {lat[int(len(lat) * 0.99) - 1]:.2f} ms; "
                f"polling (1 s) median {statistics.median(poll):.0f} ms",
                flush=True,
            )
        print(f"median of runs: NOTIFY {statistics.median(medians):.2f} ms; polling {statistics.median(polls):.0f} ms")
    finally:
        await drop_database(dsn)


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
