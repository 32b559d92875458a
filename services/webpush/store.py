"""All SQL of the web push service (schema ``webpush``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from belfry.errors import AlreadyExists, FailedPrecondition

DEFAULT_MAX_PER_USER = 20  # subscriptions one user may hold unless configured otherwise


@dataclass(frozen=True)
class Subscription:
    """A browser's push subscription for one user."""

    account_id: str
    user_id: str
    subscription_id: uuid.UUID
    endpoint: str
    p256dh: str
    auth: str
    label: str
    created_at: datetime
    last_success_at: datetime | None
    vapid_key: str = ""  # the VAPID public key the browser subscribed with ('' only before it was recorded)


_COLUMNS = "account_id, user_id, subscription_id, endpoint, p256dh, auth, label, created_at, last_success_at, vapid_key"


def _row(r: asyncpg.Record) -> Subscription:
    return Subscription(**dict(r))


async def upsert(
    pool: asyncpg.Pool,
    account_id: str,
    user_id: str,
    endpoint: str,
    p256dh: str,
    auth: str,
    label: str,
    *,
    max_per_user: int = DEFAULT_MAX_PER_USER,
    vapid_key: str = "",
) -> Subscription:
    """Insert, or update the keys and label of the user's own row with this endpoint (its id is kept).

    An endpoint another user of the account holds stays theirs (AlreadyExists);
    a user holding ``max_per_user`` subscriptions adds no new one
    (FailedPrecondition). One user's registrations take turns (an advisory
    lock on the user), so concurrent ones cannot pass the cap together.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "select pg_advisory_xact_lock(hashtextextended($1, 0))", f"webpush\x1f{account_id}\x1f{user_id}"
        )
        holder = await conn.fetchval(
            "select user_id from webpush.subscriptions where account_id = $1 and endpoint = $2", account_id, endpoint
        )
        if holder is None:
            held = await conn.fetchval(
                "select count(*) from webpush.subscriptions where account_id = $1 and user_id = $2", account_id, user_id
            )
            if held >= max_per_user:
                raise FailedPrecondition(
                    f"this user already has {held} push subscriptions (at most {max_per_user}); "
                    "delete one (DeleteSubscription) before adding another",
                    field="endpoint",
                )
        row = await conn.fetchrow(
            f"""
            insert into webpush.subscriptions
              (account_id, user_id, subscription_id, endpoint, p256dh, auth, label, vapid_key)
            values ($1, $2, $3, $4, $5, $6, $7, $8)
            on conflict (account_id, endpoint) do update
              set p256dh = excluded.p256dh, auth = excluded.auth, label = excluded.label, vapid_key = excluded.vapid_key
              where webpush.subscriptions.user_id = excluded.user_id
            returning {_COLUMNS}
            """,
            account_id,
            user_id,
            uuid.uuid4(),
            endpoint,
            p256dh,
            auth,
            label,
            vapid_key,
        )
    if row is None:  # the endpoint is another user's (held before, or taken concurrently)
        raise AlreadyExists(
            "this push endpoint is registered to another user of the account and stays theirs; "
            "unsubscribe the browser (pushManager) and subscribe again for a new endpoint",
            field="endpoint",
        )
    return _row(row)


async def list_for_user(pool: asyncpg.Pool, account_id: str, user_id: str) -> list[Subscription]:
    """The user's subscriptions, newest first."""
    rows = await pool.fetch(
        f"select {_COLUMNS} from webpush.subscriptions where account_id = $1 and user_id = $2"
        " order by created_at desc, subscription_id",
        account_id,
        user_id,
    )
    return [_row(r) for r in rows]


async def delete(pool: asyncpg.Pool, account_id: str, user_id: str, subscription_id: uuid.UUID) -> bool:
    """Delete one of the user's subscriptions; False when there was none."""
    status = await pool.execute(
        "delete from webpush.subscriptions where account_id = $1 and user_id = $2 and subscription_id = $3",
        account_id,
        user_id,
        subscription_id,
    )
    return status.endswith(" 1")


async def mark_success(pool: asyncpg.Pool, sub: Subscription) -> None:
    """Remember when the push service last accepted a push for this subscription."""
    await pool.execute(
        "update webpush.subscriptions set last_success_at = now()"
        " where account_id = $1 and user_id = $2 and subscription_id = $3",
        sub.account_id,
        sub.user_id,
        sub.subscription_id,
    )


async def stamp_vapid_key(pool: asyncpg.Pool, public_key: str) -> int:
    """Record ``public_key`` on the subscriptions made before keys were recorded; → how many."""
    status = await pool.execute("update webpush.subscriptions set vapid_key = $1 where vapid_key = ''", public_key)
    return int(status.split()[-1])
