"""What a sender shows an operator of each delivery: bound log context, one outcome line, the metrics.

A real worker on a real queue: the lease's ids are bound while its handler
runs, every outcome (the worker's own, a send that ran out of time,
included) is counted under the one vocabulary, and each recorded outcome is
logged with the publishing call's trace id and observed in the end-to-end
histogram.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import structlog
from belfry import log
from belfry.config import AccountRange
from belfry.queue import Lease, Outcome, Queue, Sent, worker
from prometheus_client import REGISTRY

from tests.queue.queue_helpers import delivery, put

CHANNEL = "mobile"


def _sample(name: str, outcome: str) -> float:
    return REGISTRY.get_sample_value(name, {"channel": CHANNEL, "outcome": outcome}) or 0.0


async def test_each_outcome_is_bound_logged_with_its_trace_counted_and_observed(
    pool: asyncpg.Pool, account_id: str
) -> None:
    trace_id = uuid.uuid4()
    quick, slow = delivery(account_id, CHANNEL, user_id="quick", trace_id=trace_id), delivery(account_id, CHANNEL)
    await put(pool, [quick, slow])
    names = ("belfry_deliveries_total", "belfry_end_to_end_seconds_count")
    before = {(name, outcome): _sample(name, outcome) for name in names for outcome in ("sent", "retry")}
    seen: dict[str, dict[str, Any]] = {}

    async def handle(lease: Lease) -> Outcome:
        seen[lease.user_id] = log.context()
        if lease.user_id == "quick":
            return Sent()
        await asyncio.sleep(3600)  # outlives its lease: the worker ends it and retries it
        raise AssertionError("unreachable")

    async def settled() -> bool:
        rows = await pool.fetch(
            "select finished_at is not null or errors <> '[]'::jsonb as done from queue.deliveries where account_id = $1",
            account_id,
        )
        return len(rows) == 2 and all(r["done"] for r in rows)

    stop = asyncio.Event()
    # This account's rows only: other tests leave leases on the channel behind, which a worker of the whole
    # channel would rescue and settle, and count, here.
    queue = Queue(pool, CHANNEL, worker="w", lease_seconds=0.5, accounts=AccountRange(account_id, f"{account_id}_"))
    with structlog.testing.capture_logs() as logs:
        running = asyncio.create_task(worker.run(queue, handle, stop=stop, poll_seconds=0.05))
        try:
            async with asyncio.timeout(30):  # a give-up bound, not a speed requirement
                while not await settled():  # noqa: ASYNC110 - the outcome is written by the worker's own task
                    await asyncio.sleep(0.02)
        finally:
            stop.set()
            await running

    for user, row in (("quick", quick), ("u1", slow)):
        assert {k: seen[user].get(k) for k in ("account_id", "notification_id", "channel")} == {
            "account_id": account_id,
            "notification_id": str(row.notification_id),
            "channel": CHANNEL,
        }
        assert isinstance(seen[user]["delivery_id"], int)
    # Bound for the lease only: the handler's task handles other leases next.
    assert "delivery_id" not in log.context()

    lines = {line["notification_id"]: line for line in logs if line["event"] == "delivery settled"}
    assert set(lines) == {str(quick.notification_id), str(slow.notification_id)}
    sent, retried = lines[str(quick.notification_id)], lines[str(slow.notification_id)]
    assert (sent["outcome"], sent["trace_id"], sent["error"], sent["log_level"]) == ("sent", trace_id.hex, None, "info")
    assert (retried["outcome"], retried["trace_id"], retried["log_level"]) == ("retry", None, "info")
    assert "timed out" in retried["error"]
    for line in (sent, retried):
        assert line["account_id"] == account_id and line["channel"] == CHANNEL and line["age_seconds"] >= 0

    for name in names:
        for outcome in ("sent", "retry"):
            assert _sample(name, outcome) - before[(name, outcome)] == 1, (name, outcome)
