"""Child process for the fencing test: claim, wait (while paused), then settle late.

Usage: python queue_fencing_child.py DSN ACCOUNT LEASE_SECONDS
Prints ``CLAIMED <token>``, waits for one line on stdin, settles with
``Fail("late")`` and prints ``SETTLED <rows changed>``.
"""

from __future__ import annotations

import asyncio
import sys

from belfry import db
from belfry.queue import Fail, Queue


async def main(dsn: str, account: str, lease_seconds: float) -> None:
    """Claim the account's delivery, block until told, settle with a stale token."""
    pool = await db.create_pool(dsn, application_name="fencing-child", min_size=1, max_size=2)
    queue = Queue(pool, "other_apps", worker="paused-child", lease_seconds=lease_seconds)
    [lease] = [x for x in await queue.claim(1000) if x.account_id == account]
    print(f"CLAIMED {lease.token}", flush=True)  # noqa: T201 - the parent reads this line
    await asyncio.to_thread(sys.stdin.readline)  # the parent SIGSTOPs us around here
    changed = await queue.settle([(lease, Fail("late"))])
    print(f"SETTLED {changed}", flush=True)  # noqa: T201 - the parent reads this line
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
