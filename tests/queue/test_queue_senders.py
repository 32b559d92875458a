"""Every sender service runs through the kit's scaffold: queue upkeep wired, outcomes counted once.

Each service is started the way ``belfry serve`` starts it (its own settings
and build, a real server on port 0) on this module's database. Queue
retention and the queue gauges must run in each of them, so a deployment
that sends through any channel keeps the table small and the gauges fresh;
and every outcome its handler returns is counted in
``belfry_deliveries_total`` by the scaffold.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from belfry import metrics, service
from prometheus_client import REGISTRY

from tests.conftest import every_service_env
from tests.queue.queue_helpers import delivery, put

# Sender service → the channel it drains.
SENDERS = {
    "email": "email",
    "webpush": "browser",
    "mobile": "mobile",
    "webhooks": "other_apps",
    "gateway": "bell",
    "batching": "batching",
    "preferences": "dispatcher",
}
# A payload that is not a notification, for a user with nothing registered: each handler's answer.
OUTCOMES = {"dropped": "dropped", "dead": "fail"}


async def _until(check: Callable[[], Awaitable[bool]], what: str, patience: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + patience
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


def _gauge(name: str, channel: str) -> float:
    return REGISTRY.get_sample_value(name, {"channel": channel}) or 0.0


def _counted(channel: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("belfry_deliveries_total", {"channel": channel, "outcome": outcome}) or 0.0


@pytest.mark.parametrize("name", sorted(SENDERS))
async def test_a_sender_purges_finished_deliveries_refreshes_the_gauges_and_counts_its_outcomes(
    name: str, database_url: str, pool: asyncpg.Pool, token_keys: dict[str, bytes], account_id: str, tmp_path: Path
) -> None:
    channel = SENDERS[name]
    await put(pool, [delivery(account_id, "email", user_id="old"), delivery(account_id, channel, user_id="new")])
    # The old one finished eight days ago: past the default retention of seven.
    await pool.execute(
        "update queue.deliveries set state = 'sent', finished_at = now() - interval '8 days'"
        " where account_id = $1 and user_id = 'old'",
        account_id,
    )
    for gauge in (metrics.QUEUE_DEPTH, metrics.QUEUE_AGE):
        gauge.labels("email").set(-1)
    counted = {label: _counted(channel, label) for label in OUTCOMES.values()}
    env = every_service_env(database_url, token_keys, tmp_path)  # the only email delivery has finished
    package = service.declaration(name).package
    settings = importlib.import_module(f"{package}.settings").load_settings(env)
    running = await service.start(
        name, settings.common, importlib.import_module(f"{package}.server").build_for(settings)
    )
    try:

        async def purged() -> bool:
            return not await pool.fetchval(
                "select count(*) from queue.deliveries where account_id = $1 and user_id = 'old'", account_id
            )

        async def gauged() -> bool:
            return all(_gauge(name, "email") >= 0 for name in ("belfry_queue_depth", "belfry_queue_oldest_age_seconds"))

        async def finished() -> bool:
            state = await pool.fetchval(
                "select state from queue.deliveries where account_id = $1 and user_id = 'new'", account_id
            )
            return state in OUTCOMES

        await _until(purged, f"{name} to purge the finished delivery past retention")
        await _until(gauged, f"{name} to refresh the queue gauges")
        await _until(finished, f"{name} to handle its delivery")
    finally:
        await running.stop(0.1)
    state = await pool.fetchval(
        "select state from queue.deliveries where account_id = $1 and user_id = 'new'", account_id
    )
    label = OUTCOMES[state]
    assert _counted(channel, label) == counted[label] + 1
    assert [_counted(channel, other) for other in OUTCOMES.values() if other != label] == [
        counted[other] for other in OUTCOMES.values() if other != label
    ]
