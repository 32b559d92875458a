"""SIGKILL a real email sender right after the SMTP server accepted a message, many times.

Each delivery's first acceptance kills the sender process before it can
record the completion. The next sender process rescues the delivery once
the lease ran out and sends it again with the same Message-ID: nothing is
lost, and the duplicate carries the id receivers deduplicate on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
from email.utils import parseaddr
from pathlib import Path

import asyncpg

from tests.email.email_helpers import Capture, Caught, email_env, enqueue_messages, message

ROOT = Path(__file__).resolve().parents[2]
KILLS = 8


async def test_sigkill_after_smtp_accept_resends_same_message_id(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    capture, port = smtp
    msgs = [message(account_id, user_id=f"k{i}", recipient_email=f"k{i}@example.test") for i in range(KILLS)]
    await enqueue_messages(pool, msgs)
    seen: set[str] = set()
    victim: dict[str, int] = {}
    kills: list[str] = []

    def on_accept(caught: Caught) -> int | None:
        mid = str(caught.parsed["Message-ID"])
        if account_id not in mid or mid in seen:
            return None
        seen.add(mid)
        pid = victim.get("pid")
        if pid is not None:
            kills.append(mid)
        return pid  # the capture server writes the 250, then kills the sender

    capture.on_accept = on_accept
    env = {
        **os.environ,
        **email_env(
            database_url,
            token_keys,
            port,
            BELFRY_EMAIL_BATCH="1",
            BELFRY_EMAIL_CONCURRENCY="1",
            BELFRY_EMAIL_LEASE_SECONDS="0.3",
            BELFRY_LOG_LEVEL="warning",
        ),
    }

    async def all_sent() -> bool:
        n = await pool.fetchval(
            "select count(*) from queue.deliveries where account_id = $1 and state = 'sent'", account_id
        )
        return bool(n == KILLS)

    rounds = 0
    while not await all_sent():
        rounds += 1
        assert rounds <= KILLS * 3, "the senders made no progress"
        env["BELFRY_WORKER_ID"] = f"sender-{rounds}"
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.email", cwd=ROOT, env=env, stderr=asyncio.subprocess.DEVNULL
        )
        victim["pid"] = child.pid
        while child.returncode is None and not await all_sent():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), timeout=0.05)
        if child.returncode is None:
            child.terminate()
            await child.wait()
        victim.pop("pid", None)

    assert len(kills) == KILLS  # every delivery was killed once, right after its acceptance
    ours = [c for c in capture.snapshot() if account_id in str(c.parsed["Message-ID"])]
    received = collections.Counter(str(c.parsed["Message-ID"]) for c in ours)
    assert set(received) == set(kills)  # sent again after the kill, under the same Message-ID
    rows = await pool.fetch("select user_id, state, attempts from queue.deliveries where account_id = $1", account_id)
    assert [r["state"] for r in rows] == ["sent"] * KILLS
    # Each attempt sent one copy and no copy went out without an attempt on record: the killed one and
    # the one that completed, and a third only where a send outlived its share of the lease on a busy
    # machine (the sender gave up on it, so the delivery was retried: at least once, same Message-ID).
    copies = collections.Counter(parseaddr(str(c.parsed["To"]))[1].split("@")[0] for c in ours)
    assert {r["user_id"]: r["attempts"] for r in rows} == dict(copies)
    assert min(copies.values()) >= 2
