"""A sender process that does nothing: drains one queue channel with a handler that answers Sent.

It runs today's sender loop (``belfry.queue.worker.run``: fair claims,
leases with fencing tokens, batched settles, LISTEN/NOTIFY) with no channel
work, so a benchmark that drains through it measures the queue's own cost.
It prints ``READY`` once it listens and stops cleanly on SIGTERM.

Usage: python -m bench.noop_sender --channel email [--batch 1000] [--concurrency 1000]
(database from BELFRY_DATABASE_URL)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from belfry import db, log
from belfry.queue import Lease, Outcome, Queue, Sent, worker


async def _noop(lease: Lease) -> Outcome:
    return Sent()


async def main() -> None:
    """Drain ``--channel`` until SIGTERM."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--channel", required=True)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1000)
    args = parser.parse_args()
    # Warnings only, as a quiet production sender would run: the benchmark reads this process's stdout just for
    # READY, and a line per settled delivery would fill the pipe and stall the sender.
    log.configure(service=f"noop-{args.channel}", level="warning")
    pool = await db.create_pool(
        os.environ["BELFRY_DATABASE_URL"], application_name=f"bench-noop-{args.channel}", min_size=3, max_size=4
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    queue = Queue(pool, args.channel, worker=f"noop-{args.channel}-{os.getpid()}")
    print("READY", flush=True)
    try:
        await worker.run(queue, _noop, stop=stop, batch=args.batch, concurrency=args.concurrency)
    finally:
        await pool.close()


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
