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
import heapq
import json
import time
from collections import deque

import asyncpg
from belfry import background, log
from belfry.queue import presence

from services.gateway import store

_LOG = log.get(__name__)

UserKey = tuple[str, str]
# Put on the pending queue when the database closes the listening connection.
_LISTENER_LOST: tuple[str, str, int] = ("", "", -1)


# Presence rows refreshed per statement.
_PRESENCE_CHUNK = 1000

CLOSE_SLOW_CONSUMER = 4408
CLOSE_TOKEN_EXPIRED = 4403


class Tab:
    """One websocket connection as the hub sees it: who it is, what it still has to send, why it must close.

    Idle connections are the common case and each should cost as little
    memory as possible: the outbox (a deque) exists only while frames wait,
    the token's expiry is an entry in the hub's heap rather than a timer per
    tab, and the connection side (``ws.Connection``) is told by ``_wake``
    when there is something to send or a reason to close, instead of keeping
    a task suspended on a future.
    """

    __slots__ = ("account_id", "closing", "due", "expires_at", "frames", "limit", "user_id")

    def __init__(self, account_id: str, user_id: str, limit: int, expires_at: float) -> None:
        self.account_id = account_id
        self.user_id = user_id
        self.limit = limit
        self.expires_at = expires_at  # token expiry, epoch seconds; refreshed by the client
        self.due = expires_at  # when the hub's expiry heap next looks at this tab
        self.frames: deque[tuple[int, str]] | None = None  # made on the first frame, dropped once sent
        self.closing: tuple[int, str] | None = None

    def __lt__(self, other: Tab) -> bool:
        return self.due < other.due  # the expiry heap's order

    @property
    def key(self) -> UserKey:
        """The (account, user) the tab belongs to."""
        return (self.account_id, self.user_id)

    def offer(self, feed_id: int, text: str) -> None:
        """Queue a frame; a full outbox marks the tab as a slow consumer to disconnect."""
        if self.closing is not None:
            return
        frames = self.frames
        if frames is None:
            frames = self.frames = deque()
        if len(frames) >= self.limit:
            self.stop(CLOSE_SLOW_CONSUMER, "too slow: reconnect and resume from your last id")
            return
        frames.append((feed_id, text))
        self._wake()

    def stop(self, code: int, reason: str) -> None:
        """Ask the connection to close (the first reason wins)."""
        if self.closing is None:
            self.closing = (code, reason)
        self._wake()

    def take(self) -> tuple[int, str] | None:
        """The oldest frame waiting, or None (nothing waits, or the tab is closing: what waits is dropped)."""
        frames = self.frames
        if self.closing is not None or not frames:
            self.frames = None
            return None
        frame = frames.popleft()
        if not frames:
            self.frames = None
        return frame

    def _wake(self) -> None:
        """A frame waits or the tab must close: the connection's writer takes it from here."""


class Hub:
    """The tabs connected to this replica, keyed by user, and the presence rows behind them."""

    def __init__(self, pool: asyncpg.Pool, replica: str, presence_ttl: float) -> None:
        self.pool = pool
        self.replica = replica
        self.presence_ttl = presence_ttl
        # A list per user (a set costs four times the memory; a user holds a few tabs at most).
        self.tabs: dict[UserKey, list[Tab]] = {}
        self._expiring: list[Tab] = []  # heap by Tab.due: one timer for every tab's token expiry
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_at = 0.0
        self._left = 0  # tabs that left while (perhaps) still in the heap
        self._pending: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()
        self._relisten = False  # the listening connection was lost: tabs resume once it is back
        # Set while the feed channel is listened to. A tab reads its starting point only once it is: an item
        # announced before the LISTEN (a replica starting, or listening again) would reach it neither live nor
        # in its resume.
        self.listening = asyncio.Event()

    async def join(self, tab: Tab) -> None:
        """Register a tab (and its token's expiry); the user's presence row (one per user and replica) is refreshed."""
        tabs = self.tabs.get(tab.key)
        if tabs is None:
            tabs = self.tabs[tab.key] = []
        tabs.append(tab)
        self._watch(tab)
        if len(tabs) == 1:
            await presence.touch_many(self.pool, [tab.key], self.replica, self.replica, self.presence_ttl)

    async def leave(self, tab: Tab) -> None:
        """Forget a tab; the presence row goes with the user's last tab on this replica."""
        tabs = self.tabs.get(tab.key)
        if tabs is None or tab not in tabs:
            return
        tabs.remove(tab)
        self._forget(tab)
        if not tabs:
            del self.tabs[tab.key]
            await presence.remove(self.pool, tab.account_id, tab.user_id, self.replica)

    def _watch(self, tab: Tab) -> None:
        tab.due = tab.expires_at
        heapq.heappush(self._expiring, tab)
        if self._expiry_timer is None or tab.due < self._expiry_at:
            self._arm_expiry()

    def _forget(self, tab: Tab) -> None:
        """A tab left: its heap entry goes when its time comes, or sooner when left tabs are half the heap."""
        if tab.closing is None:
            tab.closing = (1000, "bye")  # what marks the heap entry as gone
        self._left += 1
        if self._left > 64 and self._left * 2 > len(self._expiring):
            self._expiring = [t for t in self._expiring if t.closing is None]
            heapq.heapify(self._expiring)
            self._left = 0

    def _arm_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if self._expiring:
            self._expiry_at = self._expiring[0].due
            delay = max(self._expiry_at - time.time(), 0.0)
            self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        """Close the tabs whose token expired; those refreshed meanwhile go back in the heap at their new expiry."""
        self._expiry_timer = None
        now = time.time()
        while self._expiring and self._expiring[0].due <= now:
            tab = heapq.heappop(self._expiring)
            if tab.closing is not None:
                continue  # closing or gone
            if tab.expires_at <= now:
                tab.stop(CLOSE_TOKEN_EXPIRED, "the token expired: refresh it to stay connected")
            else:
                tab.due = tab.expires_at
                heapq.heappush(self._expiring, tab)
        self._arm_expiry()

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
        self.listening.set()
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
            self.listening.clear()
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
            users = list(self.tabs)
            # A statement per chunk, not per user: 10,000 tabs cost ten round trips per refresh.
            for start in range(0, len(users), _PRESENCE_CHUNK):
                chunk = users[start : start + _PRESENCE_CHUNK]
                await presence.touch_many(self.pool, chunk, self.replica, self.replica, self.presence_ttl)
            await presence.purge_expired(self.pool)

        # Presence is best effort: a failed refresh is retried, and rows expire on their own meanwhile.
        await background.every("presence refresh", max(self.presence_ttl / 3, 0.05), refresh, stop)
        for account_id, user_id in list(self.tabs):
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await presence.remove(self.pool, account_id, user_id, self.replica)
