"""Live tabs of this replica and the fan-out from PostgreSQL NOTIFY to them.

Every replica LISTENs on one channel. A notification names (account, user,
feed id); a replica holding no tab of that user ignores it, the others read
the new rows in one batched query and offer them to each tab's bounded
queue. A tab whose queue is full stops reading: it is closed, and nobody
else waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from dataclasses import dataclass, field

import asyncpg
from belfry import log
from belfry.queue import presence

from services.gateway import store

_LOG = log.get(__name__)

UserKey = tuple[str, str]


@dataclass(eq=False)
class Tab:
    """One websocket connection: who it is and what it still has to send."""

    account_id: str
    user_id: str
    queue_size: int
    expires_at: float  # token expiry, epoch seconds; refreshed by the client
    outbox: asyncio.Queue[tuple[int, str]] = field(init=False)
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.outbox = asyncio.Queue(self.queue_size)

    @property
    def key(self) -> UserKey:
        """The (account, user) the tab belongs to."""
        return (self.account_id, self.user_id)

    def offer(self, feed_id: int, text: str) -> None:
        """Queue a frame; a full queue marks the tab as a slow consumer to disconnect."""
        try:
            self.outbox.put_nowait((feed_id, text))
        except asyncio.QueueFull:
            self.overflowed.set()


class Hub:
    """The tabs connected to this replica, keyed by user, and the presence rows behind them."""

    def __init__(self, pool: asyncpg.Pool, replica: str, presence_ttl: float) -> None:
        self.pool = pool
        self.replica = replica
        self.presence_ttl = presence_ttl
        self.tabs: dict[UserKey, set[Tab]] = defaultdict(set)
        self._pending: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()

    async def join(self, tab: Tab) -> None:
        """Register a tab; the user's presence row (one per user and replica) is refreshed."""
        first = not self.tabs.get(tab.key)
        self.tabs[tab.key].add(tab)
        if first:
            await presence.touch(self.pool, tab.account_id, tab.user_id, self.replica, self.replica, self.presence_ttl)

    async def leave(self, tab: Tab) -> None:
        """Forget a tab; the presence row goes with the user's last tab on this replica."""
        tabs = self.tabs.get(tab.key)
        if tabs is None:
            return
        tabs.discard(tab)
        if not tabs:
            del self.tabs[tab.key]
            await presence.remove(self.pool, tab.account_id, tab.user_id, self.replica)

    @property
    def connections(self) -> int:
        """How many tabs this replica holds."""
        return sum(len(t) for t in self.tabs.values())

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        account_id, user_id, feed_id = json.loads(str(payload))
        if (account_id, user_id) in self.tabs:
            self._pending.put_nowait((account_id, user_id, int(feed_id)))

    async def listen(self, stop: asyncio.Event) -> None:
        """Background loop: LISTEN for new feed rows and push them to local tabs, in order."""
        conn: asyncpg.pool.PoolConnectionProxy = await self.pool.acquire()
        await conn.add_listener(store.FEED_CHANNEL, self._on_notify)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                getter = asyncio.ensure_future(self._pending.get())
                await asyncio.wait([getter, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                batch = [getter.result()]
                while not self._pending.empty():
                    batch.append(self._pending.get_nowait())
                try:
                    await self._push(batch)
                except (OSError, asyncpg.PostgresError) as exc:  # tabs resume from their last id on reconnect
                    _LOG.warning("fan-out read failed", error=str(exc), items=len(batch))
        finally:
            stopping.cancel()
            await conn.remove_listener(store.FEED_CHANNEL, self._on_notify)
            await self.pool.release(conn)

    async def _push(self, batch: list[tuple[str, str, int]]) -> None:
        items = [b for b in batch if b[2] > 0]
        rows = await store.items_with_unread(self.pool, items) if items else {}
        counts_only = {(a, u) for a, u, i in batch if i == 0}
        counts = await store.unread_counts(self.pool, list(counts_only)) if counts_only else {}
        for account_id, user_id, feed_id in batch:
            tabs = self.tabs.get((account_id, user_id), ())
            if feed_id == 0:
                text = json.dumps({"type": "unread", "unread": counts.get((account_id, user_id), 0)})
            else:
                found = rows.get((account_id, user_id, feed_id))
                if found is None:
                    continue
                item, unread = found
                text = json.dumps({"type": "item", "item": item.to_json(), "unread": unread})
            for tab in list(tabs):
                tab.offer(feed_id, text)

    async def keep_presence(self, stop: asyncio.Event) -> None:
        """Background loop: refresh this replica's presence rows and purge expired ones."""
        every = max(self.presence_ttl / 3, 0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)
            try:
                for account_id, user_id in list(self.tabs):
                    await presence.touch(self.pool, account_id, user_id, self.replica, self.replica, self.presence_ttl)
                await presence.purge_expired(self.pool)
            except (OSError, asyncpg.PostgresError) as exc:  # presence is best effort; rows expire on their own
                _LOG.warning("presence refresh failed", error=str(exc))
        for account_id, user_id in list(self.tabs):
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await presence.remove(self.pool, account_id, user_id, self.replica)
