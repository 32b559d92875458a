"""A sender paused past its lease (SIGSTOP) cannot overwrite the replica that finished its delivery."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import asyncpg
from belfry.queue import Lease, Queue, Sent

from tests.queue.queue_helpers import delivery, put

CHILD = Path(__file__).with_name("queue_fencing_child.py")


async def _rescue_and_claim(queue: Queue, account_id: str) -> Lease:
    # The lease runs out by the database clock; poll every 20 ms until it is claimable again.
    while True:
        await queue.rescue()
        mine = [x for x in await queue.claim(1000) if x.account_id == account_id]
        if mine:
            return mine[0]
        await asyncio.sleep(0.02)


async def test_stale_token_from_a_resumed_sender_changes_nothing(
    database_url: str, pool: asyncpg.Pool, account_id: str
) -> None:
    item = delivery(account_id, "other_apps")
    await put(pool, [item])
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        database_url,
        account_id,
        "0.3",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        claimed = (await asyncio.wait_for(child.stdout.readline(), timeout=60)).decode().split()
        assert claimed[0] == "CLAIMED"
        os.kill(child.pid, signal.SIGSTOP)
        # Another replica rescues the delivery once the lease ran out, and finishes it.
        rescuer = Queue(pool, "other_apps", worker="rescuer", lease_seconds=30)
        lease = await asyncio.wait_for(_rescue_and_claim(rescuer, account_id), timeout=60)
        assert lease.token > int(claimed[1]) and lease.attempts == 2
        assert await rescuer.settle([(lease, Sent())]) == 1
        # The paused sender resumes and tries to record its (late) failure.
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        os.kill(child.pid, signal.SIGCONT)
        settled = (await asyncio.wait_for(child.stdout.readline(), timeout=60)).decode().split()
        assert settled == ["SETTLED", "0"]
        assert await asyncio.wait_for(child.wait(), timeout=60) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    row = await pool.fetchrow(
        "select state, errors, attempts, leased_by from queue.deliveries where notification_id = $1",
        item.notification_id,
    )
    assert row is not None
    # The history keeps the rescue, and nothing of the paused sender's late settle.
    assert row["state"] == "sent" and row["attempts"] == 2
    assert [(e["error"], e["worker"]) for e in row["errors"]] == [
        ("lease expired before the outcome was recorded", "paused-child")
    ]
