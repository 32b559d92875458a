"""Single publishes written together keep each caller's own trace id."""

from __future__ import annotations

import asyncio
import secrets

from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb

from tests.dispatcher.conftest import Mesh, event, seed


async def test_grouped_single_publishes_keep_each_callers_trace(mesh: Mesh, account_id: str) -> None:
    """Concurrent Publish calls share one write (the group commit), which runs in the first caller's context:
    every notification must still carry the trace its own call named, not that first caller's."""
    await seed(mesh, account_id)
    traces = [secrets.token_hex(16) for _ in range(8)]

    async def one(trace_id: str) -> str:
        answer = await mesh.dispatcher.Publish(
            pb.PublishRequest(event=event(account_id, recipient_user_ids=["ana"])),
            metadata=[("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")],
        )
        return str(answer.notification_id)

    ids = await asyncio.gather(*(one(t) for t in traces))
    stored = {
        str(r["notification_id"]): r["trace_id"]
        for r in await mesh.pool.fetch(
            "select notification_id, event->>'trace_id' as trace_id from dispatcher.notifications "
            "where account_id = $1",
            account_id,
        )
    }
    assert [stored[i] for i in ids] == traces
