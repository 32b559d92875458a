"""The email sender, a real process, while its PostgreSQL crashes, restarts, resets and lags.

Each test starts ``python -m services.email`` against a fresh database on the
area's private cluster and a real aiosmtpd sink, breaks the database under
it, and then reads the books: every accepted delivery is final, every sent
one reached the sink, none was handed over more often than attempted, and
the process is still alive and draining work enqueued after the fault.
"""

from __future__ import annotations

import asyncio

import asyncpg

from tests.faults.conftest import via_port
from tests.faults.ledger import FINAL, enqueue_emails, ledger, states, wait_final
from tests.faults.postgres import PrivatePostgres
from tests.faults.processes import NOT_SERVING, SERVING, ServiceProcess
from tests.faults.proxy import FaultProxy
from tests.faults.senders import email_process_env
from tests.faults.sinks import smtp_sink


async def test_immediate_restart_while_draining_loses_nothing_and_the_sender_stays_up(
    private_pg: PrivatePostgres, database_url: str, pool: asyncpg.Pool, token_keys: dict[str, bytes], account_id: str
) -> None:
    with smtp_sink() as (capture, smtp_port):
        # 20 ms each way to the sink paces the drain (a few seconds), so the crash lands in the middle of it.
        async with FaultProxy("127.0.0.1", smtp_port) as smtp:
            smtp.latency = 0.02
            env = email_process_env(
                database_url, token_keys, smtp.port, BELFRY_EMAIL_LEASE_SECONDS="10", BELFRY_WORKER_ID="crash-1"
            )
            sender = await ServiceProcess.start("email", env)
            try:
                await enqueue_emails(pool, account_id, 200)
                while len(capture.snapshot()) < 20:
                    sender.assert_alive()
                    await asyncio.sleep(0.02)
                # Crash while the sender has a statement in flight: hold its next claim or settle on a
                # table lock, see it waiting, then restart the server under it.
                blocker = await asyncpg.connect(database_url)
                await blocker.execute("begin; lock table queue.deliveries in exclusive mode")
                await wait_for_blocked_sender(pool, "belfry-email")
                before = await states(pool, account_id)
                await private_pg.restart(mode="immediate")
                blocker.terminate()
                assert sum(before[s] for s in FINAL) < 200, before  # the crash did land mid-drain
                await wait_final(pool, account_id, 200, within=90, alive=sender)
                # Work enqueued after the restart is drained by the same process.
                await enqueue_emails(pool, account_id, 20, start=200)
                await wait_final(pool, account_id, 220, within=60, alive=sender)
                sender.assert_alive()
            finally:
                await sender.stop()
        books = await ledger(pool, capture, account_id)
    books.check()
    assert books.accepted == 220 and books.by_state["sent"] == 220, books.by_state


async def wait_for_blocked_sender(pool: asyncpg.Pool, application: str, rounds: int = 600) -> None:
    """Until one of the service's statements waits on a lock (a bounded wait)."""
    for _ in range(rounds):
        waiting = await pool.fetchval(
            "select count(*) from pg_stat_activity where application_name = $1 and wait_event_type = 'Lock'",
            application,
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no statement of {application} ever waited on the lock")


async def test_health_is_not_serving_while_the_database_is_away_and_serving_after(
    private_pg: PrivatePostgres, database_url: str, pool: asyncpg.Pool, token_keys: dict[str, bytes], account_id: str
) -> None:
    with smtp_sink() as (capture, smtp_port):
        sender = await ServiceProcess.start("email", email_process_env(database_url, token_keys, smtp_port))
        try:
            await sender.wait_health(SERVING)
            await private_pg.stop(mode="immediate")
            away = await sender.wait_health(NOT_SERVING, within=30)
            await private_pg.start()
            back = await sender.wait_health(SERVING, within=30)
            assert None not in away + back  # the process answered health the whole time
            await pool.expire_connections()
            await enqueue_emails(pool, account_id, 10)
            await wait_final(pool, account_id, 10, within=60, alive=sender)
            sender.assert_alive()
        finally:
            await sender.stop()
        books = await ledger(pool, capture, account_id)
    books.check()
    assert books.by_state["sent"] == 10


async def test_resets_blackholes_and_latency_to_postgres_lose_nothing(
    private_pg: PrivatePostgres, database_url: str, pool: asyncpg.Pool, token_keys: dict[str, bytes], account_id: str
) -> None:
    waves, per_wave = 10, 20
    with smtp_sink() as (capture, smtp_port):
        async with FaultProxy("127.0.0.1", private_pg.port) as pg:
            pg.latency = 0.005
            env = email_process_env(via_port(database_url, pg.port), token_keys, smtp_port)
            sender = await ServiceProcess.start("email", env)
            try:
                for wave in range(waves):
                    # The test enqueues directly; only the sender's connections go through the proxy.
                    await enqueue_emails(pool, account_id, per_wave, start=wave * per_wave)
                    await asyncio.sleep(0.05)
                    if wave % 3 == 0:
                        pg.reset_all()
                    elif wave % 3 == 1:
                        pg.blackhole = True  # statements hang mid-flight...
                        await asyncio.sleep(0.3)
                        pg.blackhole = False  # ...and complete once the network heals
                    else:
                        await pg.refuse(True)  # cut off entirely for a moment
                        pg.reset_all()
                        await asyncio.sleep(0.3)
                        await pg.refuse(False)
                await wait_final(pool, account_id, waves * per_wave, within=120, alive=sender)
                assert pg.resets > 0
                sender.assert_alive()
            finally:
                await sender.stop()
        books = await ledger(pool, capture, account_id)
    books.check()
    assert books.by_state["sent"] == waves * per_wave, books.by_state
