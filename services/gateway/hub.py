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
import time
from collections import defaultdict, deque

import asyncpg
from belfry import background, log
from belfry.queue import presence

from services.gateway import store

_LOG = log.get(__name__)

UserKey = tuple[str, str]
# Put on the pending queue when the database closes the listening connection.
_LISTENER_LOST: tuple[str, str, int] = ("", "", -1)


CLOSE_SLOW_CONSUMER = 4408
CLOSE_TOKEN_EXPIRED = 4403


class Tab:
    """One websocket connection: who it is, what it still has to send, and why it must close.

    A hand-rolled outbox (a deque and one future) rather than an asyncio.Queue
    plus helper tasks: idle connections are the common case, and each one
    should cost as little memory as possible.
    """

    __slots__ = ("_timer", "_waiter", "account_id", "closing", "expires_at", "frames", "limit", "user_id")

    def __init__(self, account_id: str, user_id: str, limit: int, expires_at: float) -> None:
        self.account_id = account_id
        self.user_id = user_id
        self.limit = limit
        self.expires_at = expires_at  # token expiry, epoch seconds; refreshed by the client
        self.frames: deque[tuple[int, str]] = deque()
        self.closing: tuple[int, str] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    @property
    def key(self) -> UserKey:
        """The (account, user) the tab belongs to."""
        return (self.account_id, self.user_id)

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        delay = max(self.expires_at - time.time(), 0.0)
        self._timer = loop.call_later(delay, self._check_expiry)

    def _check_expiry(self) -> None:
        if time.time() >= self.expires_at:
            self.stop(CLOSE_TOKEN_EXPIRED, "the token expired: refresh it to stay connected")
        else:
            self._arm()  # refreshed meanwhile

    def offer(self, feed_id: int, text: str) -> None:
        """Queue a frame; a full outbox marks the tab as a slow consumer to disconnect."""
        if self.closing is not None:
            return
        if len(self.frames) >= self.limit:
            self.stop(CLOSE_SLOW_CONSUMER, "too slow: reconnect and resume from your last id")
            return
        self.frames.append((feed_id, text))
        self._wake()

    def stop(self, code: int, reason: str) -> None:
        """Ask the writer to close the connection (the first reason wins)."""
        if self.closing is None:
            self.closing = (code, reason)
        if self._timer is not None:
            self._timer.cancel()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> tuple[int, str] | None:
        """The next frame to send, or None once the tab must close."""
        while True:
            if self.closing is not None:
                return None
            if self.frames:
                return self.frames.popleft()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class Hub:
    """The tabs connected to this replica, keyed by user, and the presence rows behind them."""

    def __init__(self, pool: asyncpg.Pool, replica: str, presence_ttl: float) -> None:
        self.pool = pool
        self.replica = replica
        self.presence_ttl = presence_ttl
        self.tabs: dict[UserKey, set[Tab]] = defaultdict(set)
        self._pending: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()
        self._relisten = False  # the listening connection was lost: tabs resume once it is back

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

    def close_all(self, code: int = 1001, reason: str = "server shutting down: reconnect") -> None:
        """Ask every tab to close (1001: going away by default); pages reconnect and resume from their last id."""
        for tabs in list(self.tabs.values()):
            for tab in list(tabs):
                tab.stop(code, reason)

    @property
    def connections(self) -> int:
        """How many tabs this replica holds."""
        return sum(len(t) for t in self.tabs.values())

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        # A list of (account, user, feed id); feed id 0 = the user's unread count changed.
        for account_id, user_id, feed_id in json.loads(str(payload)):
            if (account_id, user_id) in self.tabs:
                self._pending.put_nowait((account_id, user_id, int(feed_id)))

    def _on_lost(self, *_: object) -> None:
        self._pending.put_nowait(_LISTENER_LOST)

    async def listen(self, stop: asyncio.Event) -> None:
        """Background loop: LISTEN for new feed rows and push them to local tabs, in order.

        If the database drops the listening connection (a restart, a reset),
        NOTIFYs sent meanwhile are gone: the loop ends with an error so the
        service's background runner listens again with backoff, and once the
        new LISTEN is in place every local tab is asked to reconnect (1012),
        which resumes it from its last id with nothing missed.
        """
        conn: asyncpg.pool.PoolConnectionProxy = await self.pool.acquire()
        conn.add_termination_listener(self._on_lost)
        await conn.add_listener(store.FEED_CHANNEL, self._on_notify)
        if self._relisten:
            self._relisten = False
            self.close_all(1012, "feed connection restored: resume")
        stopping = asyncio.ensure_future(stop.wait())
        lost = False
        try:
            while not stop.is_set():
                getter = asyncio.ensure_future(self._pending.get())
                await asyncio.wait([getter, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                if getter.result() == _LISTENER_LOST:
                    lost = self._relisten = True
                    self._drain_pending()
                    raise ConnectionResetError("the feed's listening connection was closed by the database")
                batch = [getter.result()]
                while not self._pending.empty():
                    batch.append(self._pending.get_nowait())
                try:
                    await self._push(batch)
                except (OSError, asyncpg.PostgresError) as exc:  # tabs resume from their last id on reconnect
                    _LOG.warning("fan-out read failed", error=str(exc), items=len(batch))
        finally:
            stopping.cancel()
            if not lost:
                conn.remove_termination_listener(self._on_lost)
                await conn.remove_listener(store.FEED_CHANNEL, self._on_notify)
            with contextlib.suppress(Exception):  # a connection the database dropped is already gone
                await self.pool.release(conn)

    def _drain_pending(self) -> None:
        while not self._pending.empty():
            self._pending.get_nowait()

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
        """Background loop: refresh this replica's presence rows and purge expired ones; remove them at stop."""

        async def refresh() -> None:
            for account_id, user_id in list(self.tabs):
                await presence.touch(self.pool, account_id, user_id, self.replica, self.replica, self.presence_ttl)
            await presence.purge_expired(self.pool)

        # Presence is best effort: a failed refresh is retried, and rows expire on their own meanwhile.
        await background.every("presence refresh", max(self.presence_ttl / 3, 0.05), refresh, stop)
        for account_id, user_id in list(self.tabs):
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await presence.remove(self.pool, account_id, user_id, self.replica)
