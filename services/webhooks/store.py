"""All SQL of the webhooks service (schema ``webhooks``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from belfry.errors import FailedPrecondition
from cryptography.exceptions import InvalidTag

from services.webhooks.signing import SecretBox

DEFAULT_MAX_PER_USER = 10  # webhooks one user may hold unless configured otherwise


@dataclass(frozen=True)
class Webhook:
    """A user's connected endpoint (the secret stays sealed until a send needs it)."""

    account_id: str
    user_id: str
    webhook_id: uuid.UUID
    url: str
    label: str
    slack: bool
    secret_ciphertext: bytes
    disabled_at: datetime | None
    disabled_reason: str
    created_at: datetime


_COLUMNS = (
    "account_id, user_id, webhook_id, url, label, slack, secret_ciphertext, disabled_at, disabled_reason, created_at"
)


async def insert(
    pool: asyncpg.Pool,
    account_id: str,
    user_id: str,
    webhook_id: uuid.UUID,
    url: str,
    label: str,
    slack: bool,
    sealed: bytes,
    *,
    max_per_user: int = DEFAULT_MAX_PER_USER,
) -> Webhook | None:
    """Add a webhook; None when the user already connected this URL; FailedPrecondition at the cap.

    One user's connections take turns (an advisory lock on the user), so
    concurrent ones cannot pass the cap together.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "select pg_advisory_xact_lock(hashtextextended($1, 0))", f"webhooks\x1f{account_id}\x1f{user_id}"
        )
        held = await conn.fetchval(
            "select count(*) from webhooks.endpoints where account_id = $1 and user_id = $2", account_id, user_id
        )
        if held >= max_per_user:
            raise FailedPrecondition(
                f"this user already has {held} webhooks (at most {max_per_user}); "
                "delete one (DeleteWebhook) before connecting another",
                field="url",
            )
        row = await conn.fetchrow(
            f"""
            insert into webhooks.endpoints (account_id, user_id, webhook_id, url, label, slack, secret_ciphertext)
            values ($1, $2, $3, $4, $5, $6, $7)
            on conflict (account_id, user_id, url) do nothing
            returning {_COLUMNS}
            """,
            account_id,
            user_id,
            webhook_id,
            url,
            label,
            slack,
            sealed,
        )
    return None if row is None else Webhook(**dict(row))


async def list_for_user(
    pool: asyncpg.Pool, account_id: str, user_id: str, *, active_only: bool = False
) -> list[Webhook]:
    """The user's webhooks, oldest first; ``active_only`` leaves out disabled ones."""
    rows = await pool.fetch(
        f"select {_COLUMNS} from webhooks.endpoints where account_id = $1 and user_id = $2"
        " and (not $3 or disabled_at is null) order by created_at, webhook_id",
        account_id,
        user_id,
        active_only,
    )
    return [Webhook(**dict(r)) for r in rows]


async def delete(pool: asyncpg.Pool, account_id: str, user_id: str, webhook_id: uuid.UUID) -> bool:
    """Disconnect one of the user's webhooks; False when there was none."""
    status = await pool.execute(
        "delete from webhooks.endpoints where account_id = $1 and user_id = $2 and webhook_id = $3",
        account_id,
        user_id,
        webhook_id,
    )
    return status.endswith(" 1")


async def disable(pool: asyncpg.Pool, hook: Webhook, reason: str) -> None:
    """Stop using an endpoint that told us it is gone (410); the user sees why in ListWebhooks."""
    await pool.execute(
        "update webhooks.endpoints set disabled_at = now(), disabled_reason = $4"
        " where account_id = $1 and user_id = $2 and webhook_id = $3",
        hook.account_id,
        hook.user_id,
        hook.webhook_id,
        reason,
    )


async def reseal(pool: asyncpg.Pool, box: SecretBox, *, batch: int = 500) -> tuple[int, int]:
    """Re-seal under the current key every secret that opens only under another one: → (re-sealed, unopenable).

    Rows are read in key order a batch at a time; a row changed meanwhile (a
    new secret, a deleted webhook) is left as it is (the update matches the
    old ciphertext).
    """
    resealed = unopenable = 0
    after: tuple[str, uuid.UUID] = ("", uuid.UUID(int=0))
    while True:
        rows = await pool.fetch(
            "select account_id, webhook_id, secret_ciphertext from webhooks.endpoints"
            " where (account_id, webhook_id) > ($1, $2) order by account_id, webhook_id limit $3",
            after[0],
            after[1],
            batch,
        )
        for row in rows:
            account_id, webhook_id = row["account_id"], str(row["webhook_id"])
            try:
                secret, current = box.open_current(row["secret_ciphertext"], account_id, webhook_id)
            except InvalidTag:
                unopenable += 1
                continue
            if current:
                continue
            status = await pool.execute(
                "update webhooks.endpoints set secret_ciphertext = $4"
                " where account_id = $1 and webhook_id = $2 and secret_ciphertext = $3",
                account_id,
                row["webhook_id"],
                row["secret_ciphertext"],
                box.seal(secret, account_id, webhook_id),
            )
            resealed += status.endswith(" 1")
        if len(rows) < batch:
            return resealed, unopenable
        after = (rows[-1]["account_id"], rows[-1]["webhook_id"])
