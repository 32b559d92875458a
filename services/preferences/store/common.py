"""Shared pieces of the store: row mapping and the per-account change counter."""

from __future__ import annotations

import datetime as dt
import json
from typing import TypeAlias

import asyncpg

from services.preferences.model import QuietHours, User, UserSettings

# Stores take a plain connection or one borrowed from a pool.
Conn: TypeAlias = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

USER_COLUMNS = (
    "account_id, user_id, email, display_name, locale, time_zone, permission_set, tool_access, super_admin, active"
)


def user_from_row(row: asyncpg.Record) -> User:
    """A directory user from a ``preferences.users`` row."""
    return User(
        account_id=row["account_id"],
        user_id=row["user_id"],
        email=row["email"],
        display_name=row["display_name"],
        locale=row["locale"],
        time_zone=row["time_zone"],
        permission_set=row["permission_set"],
        tool_access=tuple(row["tool_access"]),
        super_admin=row["super_admin"],
        active=row["active"],
    )


def settings_from_row(row: asyncpg.Record | None) -> UserSettings:
    """A user's settings from their ``user_settings`` row (defaults when there is none)."""
    if row is None:
        return UserSettings()
    return UserSettings(
        version=row["version"],
        channels_off=frozenset(row["channels_off"]),
        red_dot=row["red_dot"],
        default_sound=row["default_sound"],
        muted=row["muted"],
        quiet=QuietHours(row["quiet_enabled"], tuple(row["quiet_days"]), row["quiet_start"], row["quiet_end"]),
    )


CHANGE_LOG_KEEP = 1000


async def bump_seq(conn: Conn, account_id: str, user_id: str) -> None:
    """Mark the account changed, about one user ('' = account-wide), inside the writing transaction.

    The account row's lock orders the bumps: a change numbered n commits
    before n + 1 can be taken, so a reader that sees counter n sees every
    change log row up to n.
    """
    seq = await conn.fetchval(
        "update preferences.accounts set change_seq = change_seq + 1 where account_id = $1 returning change_seq",
        account_id,
    )
    if seq is None:
        return
    await conn.execute(
        "insert into preferences.changes (account_id, seq, user_id) values ($1, $2, $3)", account_id, seq, user_id
    )
    if seq % 100 == 0:  # trim now and then, not on every write
        await conn.execute(
            "delete from preferences.changes where account_id = $1 and seq <= $2", account_id, seq - CHANGE_LOG_KEEP
        )


async def changes_since(conn: Conn, account_id: str, after: int, upto: int) -> set[str] | None:
    """Users changed in (after, upto]; None when the log no longer covers that range."""
    rows = await conn.fetch(
        "select user_id from preferences.changes where account_id = $1 and seq > $2 and seq <= $3",
        account_id,
        after,
        upto,
    )
    if len(rows) != upto - after:
        return None
    return {r["user_id"] for r in rows}


async def account_seq(conn: Conn, account_id: str) -> tuple[str, int] | None:
    """(tier, change counter) of the account, or None when it does not exist."""
    row = await conn.fetchrow("select tier, change_seq from preferences.accounts where account_id = $1", account_id)
    return None if row is None else (row["tier"], int(row["change_seq"]))


def as_json(value: object) -> str:
    """A stable JSON text for audit values shown to people."""
    return json.dumps(value, sort_keys=True, default=str)


def utcnow() -> dt.datetime:
    """The current time, UTC (the service's default clock)."""
    return dt.datetime.now(dt.UTC)
