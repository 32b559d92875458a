"""All SQL of the mobile service (schema ``mobile``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg


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
    pool: asyncpg.Pool, account_id: str, user_id: str, platform: str, token: str, app_id: str, label: str
) -> Device:
    """Insert, or move/update the account's row with this token (its id is kept)."""
    row = await pool.fetchrow(
        f"""
        insert into mobile.devices (account_id, user_id, device_id, platform, token, app_id, label)
        values ($1, $2, $3, $4, $5, $6, $7)
        on conflict (account_id, platform, token) do update
          set user_id = excluded.user_id, app_id = excluded.app_id, label = excluded.label
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
    assert row is not None  # insert … returning always yields a row
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
