"""The email sender, a real process, against an SMTP server that resets, lags, refuses or hangs."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import threading

import asyncpg

from tests.email.email_helpers import Caught
from tests.faults.ledger import delivery_of, enqueue_emails, fetch, finished, ledger, wait_final
from tests.faults.processes import ServiceProcess
from tests.faults.proxy import FaultProxy
from tests.faults.senders import email_process_env
from tests.faults.sinks import StallingCapture, smtp_sink

EMAIL_ATTEMPTS = 10  # the email channel's attempt count (docs/queue.md)
LOST_ON_LAST_ATTEMPT = "sender lost during the last attempt"


async def test_resets_blackholes_refusals_and_latency_to_smtp_lose_nothing(
    database_url: str, pool: asyncpg.Pool, token_keys: dict[str, bytes], account_id: str
) -> None:
    waves, per_wave = 8, 25
    with smtp_sink() as (capture, smtp_port):
        async with FaultProxy("127.0.0.1", smtp_port) as smtp:
            smtp.latency = 0.01
            env = email_process_env(database_url, token_keys, smtp.port, BELFRY_SMTP_TIMEOUT="5")
            sender = await ServiceProcess.start("email", env)
            try:
                for wave in range(waves):
                    await enqueue_emails(pool, account_id, per_wave, start=wave * per_wave)
                    await asyncio.sleep(0.05)
                    if wave % 3 == 0:
                        smtp.reset_all()  # mid-transaction: some messages were taken, their 250 never arrives
                    elif wave % 3 == 1:
                        smtp.blackhole = True
                        await asyncio.sleep(0.3)
                        smtp.blackhole = False
                    else:
                        await smtp.refuse(True)
                        smtp.reset_all()
                        await asyncio.sleep(0.3)
                        await smtp.refuse(False)
                # Reset sends are retried with the queue's backoff (seconds): a generous bound.
                await wait_final(pool, account_id, waves * per_wave, within=120, alive=sender)
                assert smtp.resets > 0
                sender.assert_alive()
            finally:
                await sender.stop()
        books = await ledger(pool, capture, account_id)
    books.check()  # nothing lost, every sent one at the sink, duplicates only within attempts
    assert books.by_state["sent"] == waves * per_wave, books.by_state


async def test_sigkill_loop_with_a_stalled_sink_sends_each_delivery_at_most_its_attempts(
    database_url: str, pool: asyncpg.Pool, token_keys: dict[str, bytes], account_id: str
) -> None:
    """The sink takes each message and never answers; the sender is killed once all of a round's data is in.

    Every kill leaves the leases to expire; the next process rescues and sends
    again. After the email channel's ten attempts the rescue itself must end
    the delivery as dead, so the sink never sees an eleventh copy.
    """
    count = 3
    rounds_allowed = EMAIL_ATTEMPTS + 5
    lock = threading.Lock()
    round_state = {"pid": 0, "expected": 0, "arrived": 0}

    def kill_when_all_arrived(caught: Caught) -> None:
        if account_id not in str(caught.parsed["Message-ID"]):
            return
        with lock:
            round_state["arrived"] += 1
            if round_state["pid"] and round_state["arrived"] >= round_state["expected"]:
                os.kill(round_state["pid"], signal.SIGKILL)  # the sink still holds every transaction open
                round_state["pid"] = 0

    capture = StallingCapture(stall=True, on_stall=kill_when_all_arrived)
    with smtp_sink(capture) as (_, smtp_port):
        await enqueue_emails(pool, account_id, count)
        rounds = 0
        while True:
            final = await finished(pool, account_id)
            if final == count:
                break
            rounds += 1
            assert rounds <= rounds_allowed, (
                f"no end after {rounds_allowed} sender processes: {capture.snapshot()!r:.500}"
            )
            env = email_process_env(
                database_url,
                token_keys,
                smtp_port,
                BELFRY_WORKER_ID=f"victim-{rounds}",
                BELFRY_EMAIL_LEASE_SECONDS="1",
                BELFRY_SMTP_TIMEOUT="60",
            )
            sender = await ServiceProcess.start("email", env)
            with lock:
                round_state.update(pid=sender.pid, expected=count - final, arrived=0)
            try:
                # Until the sink killed it, everything is final, or (a fallback for progress only) 20 s.
                for _ in range(400):
                    if not sender.alive or await finished(pool, account_id) == count:
                        break
                    await asyncio.sleep(0.05)
            finally:
                with lock:
                    round_state["pid"] = 0
                await sender.kill()
        handed = capture.snapshot()
    ids_per_delivery: dict[int, set[str]] = collections.defaultdict(set)
    for caught in handed:
        message_id = str(caught.parsed["Message-ID"])
        if account_id in message_id:
            ids_per_delivery[delivery_of(message_id)].add(message_id)
    books = await ledger(pool, capture, account_id)
    assert books.accepted == count and books.balanced, books.by_state
    assert all(len(ids) == 1 for ids in ids_per_delivery.values()), ids_per_delivery  # always the same Message-ID
    assert books.handoffs and max(books.handoffs.values()) <= EMAIL_ATTEMPTS, books.handoffs
    books.check()
    rows = await fetch(pool, "select state, attempts, errors from queue.deliveries where account_id = $1", account_id)
    for row in rows:
        assert row["state"] == "dead" and row["attempts"] <= EMAIL_ATTEMPTS, (row["state"], row["attempts"])
        assert LOST_ON_LAST_ATTEMPT in str(row["errors"][-1]["error"]), row["errors"][-1]
