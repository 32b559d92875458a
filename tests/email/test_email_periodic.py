"""The email service's hourly purge of cap counters: a failed run is retried, never fatal."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from belfry import service
from grpc_health.v1 import health_pb2

from services.email.server import build_for
from services.email.settings import load_settings
from tests.email.email_helpers import Capture, email_env


async def _old_counter_left(pool: asyncpg.Pool, account_id: str) -> bool:
    found = await pool.fetchval("select count(*) from email.daily_counts where account_id = $1", account_id)
    return bool(found)


async def test_a_failed_counter_purge_is_retried_and_the_service_keeps_serving(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    account_id: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    _, port = smtp
    await pool.execute(
        """insert into email.daily_counts (account_id, address, topic, day, sent)
           values ($1, 'old@example.test', 'contacts.contact_assigned', current_date - 30, 3)""",
        account_id,
    )
    # The purge's DELETE fails for real while the table is away.
    await pool.execute("alter table email.daily_counts rename to daily_counts_away")
    settings = load_settings(email_env(database_url, token_keys, port))
    running = await service.start("email", settings.common, build_for(settings))

    async def failure_logged() -> None:
        while "periodic job failed" not in capfd.readouterr().out:  # noqa: ASYNC110 - the failure shows only in the log
            await asyncio.sleep(0.05)

    async def purged() -> None:
        while await _old_counter_left(pool, account_id):  # noqa: ASYNC110 - the purge's effect is in the database
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(failure_logged(), timeout=60)
        await pool.execute("alter table email.daily_counts_away rename to daily_counts")
        await asyncio.wait_for(purged(), timeout=60)
        assert not running.stop_event.is_set()
        status = await running.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await pool.execute(
            """do $$ begin
                 if to_regclass('email.daily_counts_away') is not null then
                   alter table email.daily_counts_away rename to daily_counts;
                 end if;
               end $$"""
        )
        await running.stop(0)
