"""All SQL of the mobile service (schema ``mobile``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from belfry.errors import AlreadyExists, FailedPrecondition

DEFAULT_MAX_PER_USER = 20  # devices one user may hold unless configured otherwise


@dataclass(frozen=True)
class Device:
    """An app install that can receive pushes."""

    account_id: str
    user_id: str
    device_id: uuid.UUID
    platform: str  # "android" | "ios"
    token: str
    app_id: str
    label: str
    created_at: datetime


_COLUMNS = "account_id, user_id, device_id, platform, token, app_id, label, created_at"


async def upsert(
    pool: asyncpg.Pool,
    account_id: str,
    user_id: str,
    platform: str,
    token: str,
    app_id: str,
    label: str,
    *,
    max_per_user: int = DEFAULT_MAX_PER_USER,
) -> Device:
    """Insert, or update the app id and label of the user's own row with this token (its id is kept).

    A token another user of the account holds stays theirs (AlreadyExists); a
    user holding ``max_per_user`` devices adds no new one (FailedPrecondition).
    One user's registrations take turns (an advisory lock on the user).
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "select pg_advisory_xact_lock(hashtextextended($1, 0))", f"mobile\x1f{account_id}\x1f{user_id}"
        )
        holder = await conn.fetchval(
            "select user_id from mobile.devices where account_id = $1 and platform = $2 and token = $3",
            account_id,
            platform,
            token,
        )
        if holder is None:
            held = await conn.fetchval(
                "select count(*) from mobile.devices where account_id = $1 and user_id = $2", account_id, user_id
            )
            if held >= max_per_user:
                raise FailedPrecondition(
                    f"this user already has {held} devices (at most {max_per_user}); "
                    "delete one (DeleteDevice) before adding another",
                    field="token",
                )
        row = await conn.fetchrow(
            f"""
            insert into mobile.devices (account_id, user_id, device_id, platform, token, app_id, label)
            values ($1, $2, $3, $4, $5, $6, $7)
            on conflict (account_id, platform, token) do update
              set app_id = excluded.app_id, label = excluded.label
              where mobile.devices.user_id = excluded.user_id
            returning {_COLUMNS}
            """,
            account_id,
            user_id,
            uuid.uuid4(),
            platform,
            token,
            app_id,
            label,
        )
    if row is None:  # the token is another user's (held before, or taken concurrently)
        raise AlreadyExists(
            "this device token is registered to another user of the account and stays theirs; "
            "that user signs out on the device (DeleteDevice) first",
            field="token",
        )
    return Device(**dict(row))


async def list_for_user(pool: asyncpg.Pool, account_id: str, user_id: str) -> list[Device]:
    """The user's devices, oldest first."""
    rows = await pool.fetch(
        f"select {_COLUMNS} from mobile.devices where account_id = $1 and user_id = $2 order by created_at, device_id",
        account_id,
        user_id,
    )
    return [Device(**dict(r)) for r in rows]


async def delete(pool: asyncpg.Pool, account_id: str, user_id: str, device_id: uuid.UUID) -> bool:
    """Forget one device; False when there was none."""
    status = await pool.execute(
        "delete from mobile.devices where account_id = $1 and user_id = $2 and device_id = $3",
        account_id,
        user_id,
        device_id,
    )
    return status.endswith(" 1")


async def badge(pool: asyncpg.Pool, account_id: str, user_id: str, notification_id: uuid.UUID | None) -> int:
    """The user's unread count for a push's badge: their unread bell items (the gateway's view), and the
    notification being pushed when its bell item is due but not stored yet (its bell delivery still queued).

    Read only: ``gateway.unread_counts`` and ``gateway.read_state`` are the gateway's contract,
    ``queue.deliveries`` the queue's.
    """
    value = await pool.fetchval(
        """
        select coalesce((select unread from gateway.unread_counts where account_id = $1 and user_id = $2), 0)
             + (exists (select 1 from queue.deliveries
                        where account_id = $1 and notification_id = $3 and user_id = $2 and channel = 'bell'
                          and state in ('queued', 'leased'))
                and not exists (select 1 from gateway.read_state
                                where account_id = $1 and user_id = $2 and notification_id = $3))::int
        """,
        account_id,
        user_id,
        notification_id,
    )
    return int(value)
