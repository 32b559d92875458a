"""The "bell" queue's handler: store messages in the users' feeds; the NOTIFY does the fan-out.

The worker hands over a claimed batch one lease at a time, concurrently; the
handler gathers the leases that arrive in the same event-loop turn and stores
them with one statement (one transaction, one NOTIFY), which keeps the
publish → tab latency low at thousands of events per second.
"""

from __future__ import annotations

import asyncio

import asyncpg
from belfry import log
from belfry.message import Message
from belfry.queue import Drop, Lease, Outcome, Sent

from services.gateway import store

_LOG = log.get(__name__)


class BellSender:
    """Turns claimed bell deliveries into feed rows (announced to every replica at commit)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._pending: list[tuple[Message, asyncio.Future[None]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def handle(self, lease: Lease) -> Outcome:
        """Store the item; a payload that is not a Message is dropped with the reason."""
        try:
            message = Message.from_json(lease.payload)
        except (TypeError, ValueError) as exc:
            return Drop(f"payload is not a message: {exc}")
        if message.account_id != lease.account_id or message.user_id != lease.user_id:
            return Drop("payload names another account or user than its delivery")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._pending:
            # Flush after the other leases of this claim had their turn to join.
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((message, done))
        await done  # a failed flush raises here: the worker retries the delivery
        return Sent()

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._store(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _store(self, batch: list[tuple[Message, asyncio.Future[None]]]) -> None:
        try:
            await store.add_many(self.pool, [m for m, _ in batch])
        except Exception as exc:  # every waiting lease gets the error and is retried
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for _, done in batch:
            if not done.done():
                done.set_result(None)
