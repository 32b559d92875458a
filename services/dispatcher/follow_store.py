"""SQL of follows and mutes (``dispatcher.follows``): the API's reads and writes, fan-out's look-ups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.dispatcher.store import Conn


@dataclass(frozen=True)
class FollowRow:
    """One user's relation to one object."""

    object_type: str
    object_id: str
    user_id: str
    following: bool
    muted: bool
    source: str
    updated_at: datetime


_COLUMNS = "object_type, object_id, user_id, following, muted, source, updated_at"


def _row(r: asyncpg.Record) -> FollowRow:
    return FollowRow(
        *(r[c] for c in ("object_type", "object_id", "user_id", "following", "muted", "source", "updated_at"))
    )


# An explicit choice: following (which makes the follow explicit) or muted (which leaves how it began).
_SET = {
    "following": """
        insert into dispatcher.follows (account_id, object_type, object_id, user_id, following, muted, source)
        values ($1, $2, $3, $4, $5, false, 'explicit')
        on conflict (account_id, object_type, object_id, user_id) do update
            set following = $5, source = 'explicit', updated_at = now()
        returning object_type, object_id, user_id, following, muted, source, updated_at
    """,
    "muted": """
        insert into dispatcher.follows (account_id, object_type, object_id, user_id, following, muted, source)
        values ($1, $2, $3, $4, false, $5, 'explicit')
        on conflict (account_id, object_type, object_id, user_id) do update
            set muted = $5, updated_at = now()
        returning object_type, object_id, user_id, following, muted, source, updated_at
    """,
}


async def set_flag(
    pool: asyncpg.Pool, account_id: str, object_type: str, object_id: str, user_id: str, *, flag: str, value: bool
) -> FollowRow:
    """Set ``following`` or ``muted`` for one user and object (an explicit choice); return the row."""
    row = await pool.fetchrow(_SET[flag], account_id, object_type, object_id, user_id, value)
    assert row is not None
    return _row(row)


async def user_follows(
    pool: asyncpg.Pool, account_id: str, user_id: str, after: tuple[str, str], limit: int
) -> list[FollowRow]:
    """A user's follows and mutes, by object, after the (type, id) position."""
    rows = await pool.fetch(
        f"""
        select {_COLUMNS} from dispatcher.follows
        where account_id = $1 and user_id = $2 and (following or muted) and (object_type, object_id) > ($3, $4)
        order by object_type, object_id limit $5
        """,
        account_id,
        user_id,
        after[0],
        after[1],
        limit,
    )
    return [_row(r) for r in rows]


async def followers(
    conn: Conn | asyncpg.Pool,
    account_id: str,
    object_type: str,
    object_id: str,
    *,
    after: str = "",
    limit: int | None = None,
) -> list[FollowRow]:
    """The object's followers (following, not muted), by user id, after ``after``."""
    rows = await conn.fetch(
        f"""
        select {_COLUMNS} from dispatcher.follows
        where account_id = $1 and object_type = $2 and object_id = $3 and following and not muted and user_id > $4
        order by user_id limit $5
        """,
        account_id,
        object_type,
        object_id,
        after,
        limit,
    )
    return [_row(r) for r in rows]


async def muted(
    conn: Conn | asyncpg.Pool, account_id: str, asks: Sequence[tuple[str, str, Sequence[str]]]
) -> set[tuple[str, str, str]]:
    """Which (object type, object id, user) of ``asks`` (object type, object id, users) muted their object.

    One statement for a whole fan-out batch: a round trip per event cost more than the planning itself.
    """
    types: list[str] = []
    ids: list[str] = []
    users: list[str] = []
    for object_type, object_id, who in asks:
        for user in who:
            types.append(object_type)
            ids.append(object_id)
            users.append(user)
    if not users:
        return set()
    rows = await conn.fetch(
        """
        select f.object_type, f.object_id, f.user_id
        from unnest($2::text[], $3::text[], $4::text[]) as a(object_type, object_id, user_id)
        join dispatcher.follows f on f.account_id = $1 and f.object_type = a.object_type
            and f.object_id = a.object_id and f.user_id = a.user_id
        where f.muted
        """,
        account_id,
        types,
        ids,
        users,
    )
    return {(r["object_type"], r["object_id"], r["user_id"]) for r in rows}


async def auto_follow(conn: Conn, rows: Sequence[tuple[str, str, str, str, str]]) -> None:
    """Record automatic follows (account, type, id, user, source); an existing row (an explicit choice) wins."""
    if not rows:
        return
    ordered = sorted(set(rows))
    await conn.execute(
        """
        insert into dispatcher.follows (account_id, object_type, object_id, user_id, following, source)
        select a, t, i, u, true, s from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) as x(a, t, i, u, s)
        on conflict do nothing
        """,
        [r[0] for r in ordered],
        [r[1] for r in ordered],
        [r[2] for r in ordered],
        [r[3] for r in ordered],
        [r[4] for r in ordered],
    )
