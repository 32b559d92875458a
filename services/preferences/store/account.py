"""SQL of the account-level layers: account defaults and role profiles."""

from __future__ import annotations

from collections.abc import Sequence

from belfry.errors import Aborted

from services.preferences.model import (
    Choices,
    User,
    UserPreferences,
)
from services.preferences.store.common import USER_COLUMNS, Conn, bump_seq, settings_from_row, user_from_row


async def defaults_version(conn: Conn, account_id: str) -> int:
    """The account's defaults/profiles version (0 when the account is unknown)."""
    value = await conn.fetchval("select defaults_version from preferences.accounts where account_id = $1", account_id)
    return int(value or 0)


async def lock_account_defaults(conn: Conn, account_id: str, expected: int) -> int:
    """Lock the account row, check the defaults version, bump it; returns the new version."""
    current = await conn.fetchval(
        "select defaults_version from preferences.accounts where account_id = $1 for update", account_id
    )
    if expected and expected != current:
        raise Aborted(
            f"the account's defaults changed elsewhere (version {current}, you sent {expected}); reload and try again"
        )
    new = int(current) + 1
    await conn.execute("update preferences.accounts set defaults_version = $2 where account_id = $1", account_id, new)
    await bump_seq(conn, account_id, "")
    return new


async def replace_account_defaults(conn: Conn, account_id: str, choices: Choices) -> None:
    """Replace the whole set of account defaults."""
    await conn.execute("delete from preferences.account_defaults where account_id = $1", account_id)
    await conn.executemany(
        "insert into preferences.account_defaults (account_id, topic, channel, enabled) values ($1, $2, $3, $4)",
        [(account_id, t, c, e) for (t, c), e in choices.items()],
    )


async def profile_versions(conn: Conn, account_id: str) -> dict[str, int]:
    """Every role profile of the account with its version."""
    rows = await conn.fetch(
        "select permission_set, version from preferences.role_profiles where account_id = $1 order by permission_set",
        account_id,
    )
    return {r["permission_set"]: r["version"] for r in rows}


async def permission_sets(conn: Conn, account_id: str) -> list[str]:
    """The permission sets the account's active users hold in the directory, sorted."""
    rows = await conn.fetch(
        """select distinct permission_set from preferences.users
           where account_id = $1 and active and permission_set <> '' order by permission_set""",
        account_id,
    )
    return [r["permission_set"] for r in rows]


async def lock_profile(conn: Conn, account_id: str, permission_set: str) -> int | None:
    """Lock one profile row; its version, or None when it does not exist."""
    value = await conn.fetchval(
        """select version from preferences.role_profiles
           where account_id = $1 and permission_set = $2 for update""",
        account_id,
        permission_set,
    )
    return None if value is None else int(value)


async def save_profile(conn: Conn, account_id: str, permission_set: str, version: int, choices: Choices) -> None:
    """Create or replace a profile and its choices at ``version``."""
    await conn.execute(
        """insert into preferences.role_profiles (account_id, permission_set, version) values ($1, $2, $3)
           on conflict (account_id, permission_set) do update set version = excluded.version""",
        account_id,
        permission_set,
        version,
    )
    await conn.execute(
        "delete from preferences.role_profile_choices where account_id = $1 and permission_set = $2",
        account_id,
        permission_set,
    )
    await conn.executemany(
        """insert into preferences.role_profile_choices (account_id, permission_set, topic, channel, enabled)
           values ($1, $2, $3, $4, $5)""",
        [(account_id, permission_set, t, c, e) for (t, c), e in choices.items()],
    )


async def delete_profile(conn: Conn, account_id: str, permission_set: str) -> None:
    """Remove a profile (its choices go with it)."""
    await conn.execute(
        "delete from preferences.role_profiles where account_id = $1 and permission_set = $2",
        account_id,
        permission_set,
    )


async def account_snapshot_inputs(
    conn: Conn, account_id: str, topics: Sequence[str]
) -> tuple[list[User], dict[str, UserPreferences]]:
    """Every active user of the account with their own preferences for ``topics``."""
    rows = await conn.fetch(
        f"select {USER_COLUMNS} from preferences.users where account_id = $1 and active order by user_id", account_id
    )
    users = [user_from_row(r) for r in rows]
    settings = await conn.fetch("select * from preferences.user_settings where account_id = $1", account_id)
    choices = await conn.fetch(
        """select user_id, topic, channel, enabled from preferences.user_choices
           where account_id = $1 and topic = any($2::text[])""",
        account_id,
        list(topics),
    )
    own: dict[str, Choices] = {}
    for r in choices:
        own.setdefault(r["user_id"], {})[(r["topic"], r["channel"])] = r["enabled"]
    by_user = {r["user_id"]: r for r in settings}
    return users, {
        u.user_id: UserPreferences(settings_from_row(by_user.get(u.user_id)), own.get(u.user_id, {})) for u in users
    }
