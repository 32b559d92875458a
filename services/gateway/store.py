"""All SQL of the gateway: the per-user feed, its read state, and the fan-out NOTIFY."""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from belfry import channels
from belfry.message import Message
from belfry.queue import NewDelivery, enqueue

# Every replica LISTENs here; the payload names (account, user, feed id) and
# each replica reads the row only when it holds a tab of that user.
FEED_CHANNEL = "belfry_gateway_feed"


@dataclass(frozen=True)
class FeedItem:
    """One row of a user's feed, as the web app shows it."""

    id: int
    notification_id: str
    topic: str
    title: str
    body: str
    url: str
    items: tuple[dict[str, str], ...]
    in_feed: bool
    popup: bool
    browser: bool
    sound: str
    created_at: datetime.datetime
    seen: bool
    read: bool
    archived: bool

    @property
    def count(self) -> int:
        """How many objects a merged notification stands for (1 when not merged)."""
        return max(1, len(self.items))

    def to_json(self) -> dict[str, Any]:
        """The JSON the web app receives (text is escaped by the page, never here)."""
        return {
            "id": self.id,
            "notification_id": self.notification_id,
            "topic": self.topic,
            "title": self.title,
            "body": self.body,
            "url": self.url,
            "items": list(self.items),
            "count": self.count,
            "in_feed": self.in_feed,
            "popup": self.popup,
            "browser": self.browser,
            "sound": self.sound,
            "created_at": self.created_at.isoformat(),
            "seen": self.seen,
            "read": self.read,
            "archived": self.archived,
        }


_COLUMNS = """id, notification_id, topic, title, body, url, items, in_feed, popup, browser, sound, created_at,
    seen_at is not null as seen, read_at is not null as read, archived_at is not null as archived"""


def _item(row: asyncpg.Record) -> FeedItem:
    items = row["items"]
    return FeedItem(
        id=row["id"],
        notification_id=str(row["notification_id"]),
        topic=row["topic"],
        title=row["title"],
        body=row["body"],
        url=row["url"],
        items=tuple(json.loads(items) if isinstance(items, str) else items),
        in_feed=row["in_feed"],
        popup=row["popup"],
        browser=row["browser"],
        sound=row["sound"],
        created_at=row["created_at"],
        seen=row["seen"],
        read=row["read"],
        archived=row["archived"],
    )


_ADD_MANY = """
with input as (
    select * from unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::jsonb[], $9::bool[], $10::bool[], $11::bool[], $12::text[])
        with ordinality as t(account_id, user_id, notification_id, topic, title, body, url, items,
                             in_feed, popup, browser, sound, ord)
),
fresh as (
    select i.* from input i
    where not exists (select 1 from gateway.feed f
                      where f.account_id = i.account_id and f.user_id = i.user_id
                        and f.notification_id = i.notification_id)
),
counts as (select account_id, user_id, count(*) as n from fresh group by account_id, user_id),
-- The upsert row-locks each user's counter until commit, so ids commit in the order they are numbered;
-- it takes them in key order, so two writers with users in common queue up instead of deadlocking.
bumped as (
    insert into gateway.feed_seq as s (account_id, user_id, last_id)
    select account_id, user_id, n from counts order by account_id, user_id
    on conflict (account_id, user_id) do update set last_id = s.last_id + excluded.last_id
    returning account_id, user_id, last_id
)
insert into gateway.feed (account_id, user_id, id, notification_id, topic, title, body, url, items,
                          in_feed, popup, browser, sound)
select f.account_id, f.user_id,
       b.last_id - c.n + row_number() over (partition by f.account_id, f.user_id order by f.ord),
       f.notification_id, f.topic, f.title, f.body, f.url, f.items, f.in_feed, f.popup, f.browser, f.sound
from fresh f join counts c using (account_id, user_id) join bumped b using (account_id, user_id)
returning account_id, user_id, id
"""

# pg_notify payloads must stay under 8000 bytes.
_NOTIFY_BYTES = 7000


async def add_many(pool: asyncpg.Pool, messages: Sequence[Message]) -> int:
    """Store messages under each user's next ids in one statement and announce them; how many were new.

    A message already stored (a redelivered queue row) is skipped. Every
    replica is told in the same transaction (delivered at commit, in order).
    """
    if not messages:
        return 0

    def items(m: Message) -> str:
        return json.dumps([{"type": i.type, "id": i.id, "display_name": i.display_name, "url": i.url} for i in m.items])

    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            _ADD_MANY,
            [m.account_id for m in messages],
            [m.user_id for m in messages],
            [uuid.UUID(m.notification_id) for m in messages],
            [m.topic for m in messages],
            [m.title for m in messages],
            [m.body for m in messages],
            [m.url for m in messages],
            [items(m) for m in messages],
            [m.bell for m in messages],
            [m.popup for m in messages],
            [m.browser for m in messages],
            [m.sound for m in messages],
        )
        triples = sorted(([r["account_id"], r["user_id"], r["id"]] for r in rows), key=lambda t: t[2])
        chunk: list[list[object]] = []
        for triple in triples:
            chunk.append(triple)
            if len(json.dumps(chunk)) > _NOTIFY_BYTES:
                chunk.pop()
                await conn.execute("select pg_notify($1, $2)", FEED_CHANNEL, json.dumps(chunk))
                chunk = [triple]
        if chunk:
            await conn.execute("select pg_notify($1, $2)", FEED_CHANNEL, json.dumps(chunk))
        return len(rows)


async def get(pool: asyncpg.Pool, account_id: str, user_id: str, feed_id: int) -> FeedItem | None:
    """One item of a user's feed."""
    row = await pool.fetchrow(
        f"select {_COLUMNS} from gateway.feed where account_id = $1 and user_id = $2 and id = $3",
        account_id,
        user_id,
        feed_id,
    )
    return None if row is None else _item(row)


async def since(
    pool: asyncpg.Pool, account_id: str, user_id: str, after_id: int, up_to: int, limit: int
) -> list[FeedItem]:
    """Items numbered after ``after_id`` and at most ``up_to``, oldest first, at most ``limit`` (for resume)."""
    rows = await pool.fetch(
        f"""select {_COLUMNS} from gateway.feed
            where account_id = $1 and user_id = $2 and id > $3 and id <= $4 order by id limit $5""",
        account_id,
        user_id,
        after_id,
        up_to,
        limit,
    )
    return [_item(r) for r in rows]


@dataclass(frozen=True)
class Position:
    """Where a user's feed stands: the newest id handed out and the unread count, as of one moment."""

    last_id: int
    unread: int


async def position(pool: asyncpg.Pool, account_id: str, user_id: str) -> Position:
    """The newest id and the unread count, read from one row, so one snapshot: the count is of ids up to it.

    Both live in ``gateway.feed_seq`` (the count kept by the feed's triggers,
    migration 0004): an item committed after the read is neither covered by
    the id nor counted.
    """
    row = await pool.fetchrow(
        "select last_id, unread from gateway.feed_seq where account_id = $1 and user_id = $2", account_id, user_id
    )
    return Position(0, 0) if row is None else Position(last_id=int(row["last_id"]), unread=int(row["unread"]))


async def last_id(pool: asyncpg.Pool, account_id: str, user_id: str) -> int:
    """The newest id handed out to the user (0 before the first item)."""
    value = await pool.fetchval(
        "select last_id from gateway.feed_seq where account_id = $1 and user_id = $2", account_id, user_id
    )
    return int(value or 0)


async def page(
    pool: asyncpg.Pool, account_id: str, user_id: str, *, before_id: int | None, limit: int, archived: bool
) -> list[FeedItem]:
    """Recent feed items, newest first, strictly older than ``before_id`` when given."""
    rows = await pool.fetch(
        f"""select {_COLUMNS} from gateway.feed
            where account_id = $1 and user_id = $2 and in_feed and ($3::bigint is null or id < $3)
              and (archived_at is not null) = $4
            order by id desc limit $5""",
        account_id,
        user_id,
        before_id,
        archived,
        limit,
    )
    return [_item(r) for r in rows]


async def unread_count(conn: asyncpg.Pool | asyncpg.Connection, account_id: str, user_id: str) -> int:
    """Unread, unarchived bell items of the user (the count the feed's triggers keep)."""
    value = await conn.fetchval(
        "select unread from gateway.feed_seq where account_id = $1 and user_id = $2", account_id, user_id
    )
    return int(value or 0)


_MARKS = {"read": "read_at", "seen": "seen_at", "archive": "archived_at"}
# The reverse operations: they clear the mark instead of setting it.
_UNMARKS = {"unread": "read_at", "unarchive": "archived_at"}
MARKS = frozenset(_MARKS) | frozenset(_UNMARKS)


async def mark(pool: asyncpg.Pool, account_id: str, user_id: str, ids: Sequence[int], what: str) -> int:
    """Set read/seen/archived, or clear read/archived (``unread``/``unarchive``), on the given ids of the
    user's own feed; how many rows changed (a row already in that state does not count)."""
    if what in _UNMARKS:
        column, value, before = _UNMARKS[what], "null", "is not null"
    else:
        column, value, before = _MARKS[what], "now()", "is null"
    status = await pool.execute(
        f"""update gateway.feed set {column} = {value}
            where account_id = $1 and user_id = $2 and id = any($3::bigint[]) and {column} {before}""",
        account_id,
        user_id,
        list(ids),
    )
    return int(status.split()[-1])


async def mark_notification_read(pool: asyncpg.Pool, account_id: str, user_id: str, notification_id: str) -> int:
    """Mark the user's feed item of one notification read (an email's "open it" link); how many rows changed."""
    try:
        wanted = uuid.UUID(notification_id)
    except ValueError:
        return 0
    status = await pool.execute(
        """update gateway.feed set read_at = now()
           where account_id = $1 and user_id = $2 and notification_id = $3 and read_at is null""",
        account_id,
        user_id,
        wanted,
    )
    return int(status.split()[-1])


async def mark_all_read(pool: asyncpg.Pool, account_id: str, user_id: str) -> int:
    """Mark every unread item of the user read."""
    status = await pool.execute(
        "update gateway.feed set read_at = now() where account_id = $1 and user_id = $2 and read_at is null",
        account_id,
        user_id,
    )
    return int(status.split()[-1])


async def items_with_unread(
    pool: asyncpg.Pool, keys: Sequence[tuple[str, str, int]]
) -> dict[tuple[str, str, int], tuple[FeedItem, int]]:
    """Several feed rows with their user's unread count, in one round trip (the fan-out read)."""
    rows = await pool.fetch(
        f"""
        with wanted as (select * from unnest($1::text[], $2::text[], $3::bigint[]) as w(account_id, user_id, id))
        select {_COLUMNS}, f.account_id, f.user_id, s.unread
        from wanted w join gateway.feed f using (account_id, user_id, id)
             join gateway.feed_seq s using (account_id, user_id)
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
    )
    return {(r["account_id"], r["user_id"], r["id"]): (_item(r), int(r["unread"])) for r in rows}


async def unread_counts(pool: asyncpg.Pool, users: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Unread counts of several users at once."""
    rows = await pool.fetch(
        """
        select w.account_id, w.user_id, coalesce(s.unread, 0) as unread
        from unnest($1::text[], $2::text[]) as w(account_id, user_id)
             left join gateway.feed_seq s using (account_id, user_id)
        """,
        [u[0] for u in users],
        [u[1] for u in users],
    )
    return {(r["account_id"], r["user_id"]): int(r["unread"]) for r in rows}


# A user's phones hear of a read-state change at most once per window, at its end (then with the count of
# that moment): the window is the rate limit of badge pushes.
BADGE_WINDOW_SECONDS = 10.0


async def sync_badges(pool: asyncpg.Pool, account_id: str, user_id: str) -> bool:
    """After the user's read state changed: queue one badge update for their phones; False when one is queued.

    The update is a mobile delivery released at the end of the current
    window; its notification id is derived from the user and the window, so
    every change within the window finds it queued (the queue's dedup key)
    and the sender, at the window's end, pushes the count of that moment.
    """
    window = int(datetime.datetime.now(datetime.UTC).timestamp() // BADGE_WINDOW_SECONDS)
    release = datetime.datetime.fromtimestamp((window + 1) * BADGE_WINDOW_SECONDS, datetime.UTC)
    update = NewDelivery(
        account_id=account_id,
        notification_id=uuid.uuid5(_BADGES, f"{account_id}\x1f{user_id}\x1f{window}"),
        user_id=user_id,
        channel="mobile",
        topic=channels.MOBILE_BADGE_TOPIC,
        payload={},
        expires_at=release + datetime.timedelta(hours=1),
        available_at=release,
        max_attempts=3,
    )
    async with pool.acquire() as conn:
        return bool(await enqueue(conn, [update]))


_BADGES = uuid.UUID("6c1d5f0e-4b8a-4f51-9d3e-2b7f0a9c5e11")  # namespace of badge updates' notification ids


async def announce_counts(pool: asyncpg.Pool, account_id: str, user_id: str) -> None:
    """Tell every replica the user's read state changed (feed id 0 = counts only)."""
    await pool.execute("select pg_notify($1, $2)", FEED_CHANNEL, json.dumps([[account_id, user_id, 0]]))


async def read_state_changed(pool: asyncpg.Pool, account_id: str, user_id: str) -> None:
    """The user's read state changed: every replica's tabs get the new counts, the user's phones their badge."""
    await sync_badges(pool, account_id, user_id)
    await announce_counts(pool, account_id, user_id)  # last: the caller's own answer follows the tabs' news closely
