"""Live app tabs: written by the websocket gateway, read by the web-push sender.

A tab's row expires after a short time unless the gateway refreshes it, so a
gateway replica that dies without cleaning up stops counting within seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg


async def touch_many(
    conn: asyncpg.Connection | asyncpg.Pool,
    users: Sequence[tuple[str, str]],
    connection: str,
    replica: str,
    ttl_seconds: float,
) -> None:
    """Record (or refresh) the rows of (account, user) pairs under one connection name for ``ttl_seconds``,
    in one statement.

    Rows are taken in key order, so two replicas refreshing users in common
    queue up instead of deadlocking.
    """
    if not users:
        return
    ordered = sorted(users)
    await conn.execute(
        """
        insert into queue.presence (account_id, user_id, connection, replica, expires_at)
        select a, u, $3, $4, now() + make_interval(secs => $5)
        from unnest($1::text[], $2::text[]) with ordinality as t(a, u, n) order by n
        on conflict (account_id, user_id, connection)
        do update set replica = excluded.replica, expires_at = excluded.expires_at
        """,
        [a for a, _ in ordered],
        [u for _, u in ordered],
        connection,
        replica,
        ttl_seconds,
    )


async def remove(conn: asyncpg.Connection | asyncpg.Pool, account_id: str, user_id: str, connection: str) -> None:
    """Forget a tab that closed."""
    await conn.execute(
        "delete from queue.presence where account_id = $1 and user_id = $2 and connection = $3",
        account_id,
        user_id,
        connection,
    )


async def has_live_tab(conn: asyncpg.Connection | asyncpg.Pool, account_id: str, user_id: str) -> bool:
    """Whether the user has at least one unexpired live tab."""
    return bool(
        await conn.fetchval(
            "select exists (select 1 from queue.presence where account_id = $1 and user_id = $2 and expires_at > now())",
            account_id,
            user_id,
        )
    )


async def purge_expired(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """Delete expired rows (run on a schedule by the gateway)."""
    status = await conn.execute("delete from queue.presence where expires_at <= now()")
    return int(status.split()[-1])
