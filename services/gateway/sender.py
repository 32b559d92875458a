"""The "bell" queue's handler: store the message in the user's feed; the NOTIFY does the fan-out."""

from __future__ import annotations

import asyncpg
from belfry import log, metrics
from belfry.message import Message
from belfry.queue import Drop, Lease, Outcome, Sent

from services.gateway import store

_LOG = log.get(__name__)


class BellSender:
    """Turns a claimed bell delivery into a feed row (announced to every replica at commit)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def handle(self, lease: Lease) -> Outcome:
        """Store the item; a payload that is not a Message is dropped with the reason."""
        try:
            message = Message.from_json(lease.payload)
        except (TypeError, ValueError) as exc:
            metrics.DELIVERIES.labels("bell", "dropped").inc()
            return Drop(f"payload is not a message: {exc}")
        if message.account_id != lease.account_id or message.user_id != lease.user_id:
            metrics.DELIVERIES.labels("bell", "dropped").inc()
            return Drop("payload names another account or user than its delivery")
        await store.add(self.pool, message)
        metrics.DELIVERIES.labels("bell", "sent").inc()
        return Sent()
