"""All SQL of the preferences service: the directory and every preference layer."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any, TypeAlias

import asyncpg
from belfry.errors import Aborted, NotFound

from services.preferences.model import (
    Account,
    AuditEntry,
    Choices,
    QuietHours,
    Team,
    TeamMember,
    User,
    UserPreferences,
    UserSettings,
)

# Stores take a plain connection or one borrowed from a pool.
Conn: TypeAlias = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

_USER_COLUMNS = (
    "account_id, user_id, email, display_name, locale, time_zone, permission_set, tool_access, super_admin, active"
)


def _user(row: asyncpg.Record) -> User:
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


def _settings(row: asyncpg.Record | None) -> UserSettings:
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


# --- directory ---------------------------------------------------------------


async def upsert_account(conn: Conn, account: Account) -> Account:
    """Create or update an account."""
    await conn.execute(
        """insert into preferences.accounts (account_id, name, tier) values ($1, $2, $3)
           on conflict (account_id) do update set name = excluded.name, tier = excluded.tier, updated_at = now()""",
        account.account_id,
        account.name,
        account.tier,
    )
    await bump_seq(conn, account.account_id, "")
    return account


async def get_account(conn: Conn, account_id: str) -> Account | None:
    """The account, or None."""
    row = await conn.fetchrow(
        "select account_id, name, tier from preferences.accounts where account_id = $1", account_id
    )
    return None if row is None else Account(row["account_id"], row["name"], row["tier"])


async def require_account(conn: Conn, account_id: str, *, field: str = "account_id") -> Account:
    """The account, or NotFound naming it."""
    account = await get_account(conn, account_id)
    if account is None:
        raise NotFound(f"account {account_id!r} does not exist; create it with UpsertAccount first", field=field)
    return account


async def upsert_user(conn: Conn, user: User) -> User:
    """Create or update a user (the account must exist)."""
    await require_account(conn, user.account_id, field="user.account_id")
    await bump_seq(conn, user.account_id, user.user_id)
    row = await conn.fetchrow(
        f"""insert into preferences.users ({_USER_COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            on conflict (account_id, user_id) do update set email = excluded.email,
              display_name = excluded.display_name, locale = excluded.locale, time_zone = excluded.time_zone,
              permission_set = excluded.permission_set, tool_access = excluded.tool_access,
              super_admin = excluded.super_admin, active = excluded.active, updated_at = now()
            returning {_USER_COLUMNS}""",
        user.account_id,
        user.user_id,
        user.email,
        user.display_name,
        user.locale,
        user.time_zone,
        user.permission_set,
        list(user.tool_access),
        user.super_admin,
        user.active,
    )
    assert row is not None  # an upsert with RETURNING always returns its row
    return _user(row)


async def get_users(conn: Conn, account_id: str, user_ids: Sequence[str]) -> dict[str, User]:
    """The named users of one account that exist, by id."""
    rows = await conn.fetch(
        f"select {_USER_COLUMNS} from preferences.users where account_id = $1 and user_id = any($2::text[])",
        account_id,
        list(user_ids),
    )
    return {r["user_id"]: _user(r) for r in rows}


async def upsert_team(conn: Conn, team: Team) -> Team:
    """Create or replace a team and its members (the account must exist)."""
    await require_account(conn, team.account_id, field="team.account_id")
    await conn.execute(
        """insert into preferences.teams (account_id, team_id, name) values ($1, $2, $3)
           on conflict (account_id, team_id) do update set name = excluded.name""",
        team.account_id,
        team.team_id,
        team.name,
    )
    await conn.execute(
        "delete from preferences.team_members where account_id = $1 and team_id = $2", team.account_id, team.team_id
    )
    await conn.executemany(
        "insert into preferences.team_members (account_id, team_id, user_id, is_primary) values ($1, $2, $3, $4)",
        [(team.account_id, team.team_id, m.user_id, m.primary) for m in team.members],
    )
    return team


async def get_team(conn: Conn, account_id: str, team_id: str) -> Team | None:
    """The team with its members (ordered by user id), or None."""
    row = await conn.fetchrow(
        "select name from preferences.teams where account_id = $1 and team_id = $2", account_id, team_id
    )
    if row is None:
        return None
    members = await conn.fetch(
        """select user_id, is_primary from preferences.team_members
           where account_id = $1 and team_id = $2 order by user_id""",
        account_id,
        team_id,
    )
    return Team(account_id, team_id, row["name"], tuple(TeamMember(m["user_id"], m["is_primary"]) for m in members))


# --- reading preferences -------------------------------------------------------


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


async def defaults_version(conn: Conn, account_id: str) -> int:
    """The account's defaults/profiles version (0 when the account is unknown)."""
    value = await conn.fetchval("select defaults_version from preferences.accounts where account_id = $1", account_id)
    return int(value or 0)


async def batch_inputs(
    conn: Conn, account_id: str, topic: str, user_ids: Sequence[str]
) -> tuple[dict[str, User], dict[str, UserPreferences]]:
    """Directory facts and own preferences (for one topic) of many users, in three reads."""
    ids = list(user_ids)
    users = await get_users(conn, account_id, ids)
    settings = await conn.fetch(
        "select * from preferences.user_settings where account_id = $1 and user_id = any($2::text[])", account_id, ids
    )
    choices = await conn.fetch(
        """select user_id, channel, enabled, null as sound from preferences.user_choices
           where account_id = $1 and topic = $2 and user_id = any($3::text[])
           union all
           select user_id, null, null, sound from preferences.user_topic_sounds
           where account_id = $1 and topic = $2 and user_id = any($3::text[])""",
        account_id,
        topic,
        ids,
    )
    by_user: dict[str, tuple[Choices, dict[str, str]]] = {}
    for row in choices:
        own, sounds = by_user.setdefault(row["user_id"], ({}, {}))
        if row["sound"] is None:
            own[(topic, row["channel"])] = row["enabled"]
        else:
            sounds[topic] = row["sound"]
    prefs: dict[str, UserPreferences] = {}
    settings_by_user = {r["user_id"]: r for r in settings}
    for user_id in users:
        own, sounds = by_user.get(user_id, ({}, {}))
        prefs[user_id] = UserPreferences(_settings(settings_by_user.get(user_id)), own, sounds)
    return users, prefs


async def account_layers(conn: Conn, account_id: str, topic: str | None = None) -> tuple[dict[str, Choices], Choices]:
    """Role profiles (by permission set) and account defaults, for one topic or all."""
    rows = await conn.fetch(
        """select permission_set, topic, channel, enabled from preferences.role_profile_choices
           where account_id = $1 and ($2::text is null or topic = $2)
           union all
           select null, topic, channel, enabled from preferences.account_defaults
           where account_id = $1 and ($2::text is null or topic = $2)""",
        account_id,
        topic,
    )
    profiles: dict[str, Choices] = {}
    defaults: Choices = {}
    for r in rows:
        target = defaults if r["permission_set"] is None else profiles.setdefault(r["permission_set"], {})
        target[(r["topic"], r["channel"])] = r["enabled"]
    return profiles, defaults


async def user_preferences(conn: Conn, account_id: str, user_id: str) -> UserPreferences:
    """Everything one user chose, over every topic."""
    settings = await conn.fetchrow(
        "select * from preferences.user_settings where account_id = $1 and user_id = $2", account_id, user_id
    )
    choices = await conn.fetch(
        "select topic, channel, enabled from preferences.user_choices where account_id = $1 and user_id = $2",
        account_id,
        user_id,
    )
    sounds = await conn.fetch(
        "select topic, sound from preferences.user_topic_sounds where account_id = $1 and user_id = $2",
        account_id,
        user_id,
    )
    return UserPreferences(
        _settings(settings),
        {(r["topic"], r["channel"]): r["enabled"] for r in choices},
        {r["topic"]: r["sound"] for r in sounds},
    )


# --- writing a user's preferences ------------------------------------------------


async def lock_user(conn: Conn, account_id: str, user_id: str, expected: int) -> int:
    """Lock the user's settings row, check the version, bump it; returns the new version.

    Call inside a transaction: the row lock serialises two tabs writing at once,
    and a stale ``expected`` (≠ 0) is refused with the current version.
    """
    await conn.execute(
        """insert into preferences.user_settings (account_id, user_id, version) values ($1, $2, 0)
           on conflict do nothing""",
        account_id,
        user_id,
    )
    current = await conn.fetchval(
        "select version from preferences.user_settings where account_id = $1 and user_id = $2 for update",
        account_id,
        user_id,
    )
    if expected and expected != current:
        raise Aborted(
            f"your preferences changed elsewhere (version {current}, you sent {expected}); reload and try again"
        )
    new = int(current) + 1
    await bump_seq(conn, account_id, user_id)
    await conn.execute(
        "update preferences.user_settings set version = $3, updated_at = now() where account_id = $1 and user_id = $2",
        account_id,
        user_id,
        new,
    )
    return new


async def set_choices(conn: Conn, account_id: str, user_id: str, choices: Choices) -> None:
    """Upsert the user's own choices."""
    await conn.executemany(
        """insert into preferences.user_choices (account_id, user_id, topic, channel, enabled) values ($1, $2, $3, $4, $5)
           on conflict (account_id, user_id, topic, channel) do update set enabled = excluded.enabled""",
        [(account_id, user_id, t, c, e) for (t, c), e in choices.items()],
    )


async def audit(
    conn: Conn,
    account_id: str,
    *,
    actor: str,
    user_id: str,
    via: str,
    what: str,
    old: Any,
    new: Any,
) -> None:
    """Record one change (in the transaction of the change itself)."""
    await conn.execute(
        """insert into preferences.audit_log (account_id, actor_user_id, user_id, via, what, old_value, new_value)
           values ($1, $2, $3, $4, $5, $6, $7)""",
        account_id,
        actor,
        user_id,
        via,
        what,
        old,
        new,
    )


async def list_audit(
    conn: Conn, account_id: str, user_id: str | None, *, before: int | None, limit: int
) -> list[AuditEntry]:
    """Newest-first audit entries of one user (or of the whole account when ``user_id`` is None)."""
    rows = await conn.fetch(
        """select id, at, actor_user_id, user_id, via, what, old_value, new_value from preferences.audit_log
           where account_id = $1 and ($2::text is null or user_id = $2) and ($3::bigint is null or id < $3)
           order by id desc limit $4""",
        account_id,
        user_id,
        before,
        limit,
    )
    return [
        AuditEntry(
            r["id"], r["at"], r["actor_user_id"], r["user_id"], r["via"], r["what"], r["old_value"], r["new_value"]
        )
        for r in rows
    ]


def as_json(value: object) -> str:
    """A stable JSON text for audit values shown to people."""
    return json.dumps(value, sort_keys=True, default=str)


def utcnow() -> dt.datetime:
    """The current time, UTC (the service's default clock)."""
    return dt.datetime.now(dt.UTC)


async def save_settings(conn: Conn, account_id: str, user_id: str, s: UserSettings) -> None:
    """Write the settings block (the row exists: ``lock_user`` created it)."""
    await conn.execute(
        """update preferences.user_settings set channels_off = $3, red_dot = $4, default_sound = $5, muted = $6,
             quiet_enabled = $7, quiet_days = $8, quiet_start = $9, quiet_end = $10
           where account_id = $1 and user_id = $2""",
        account_id,
        user_id,
        sorted(s.channels_off),
        s.red_dot,
        s.default_sound,
        s.muted,
        s.quiet.enabled,
        list(s.quiet.days),
        s.quiet.start,
        s.quiet.end,
    )


async def set_topic_sound(conn: Conn, account_id: str, user_id: str, topic: str, sound: str) -> None:
    """Set (or, with "", remove) one topic's pop-up sound."""
    await conn.execute(
        "delete from preferences.user_topic_sounds where account_id = $1 and user_id = $2 and topic = $3",
        account_id,
        user_id,
        topic,
    )
    if sound:
        await conn.execute(
            "insert into preferences.user_topic_sounds (account_id, user_id, topic, sound) values ($1, $2, $3, $4)",
            account_id,
            user_id,
            topic,
            sound,
        )


async def reset_user(conn: Conn, account_id: str, user_id: str) -> None:
    """Remove every own choice and sound and put the settings back to their defaults (keeping the version)."""
    await conn.execute(
        "delete from preferences.user_choices where account_id = $1 and user_id = $2", account_id, user_id
    )
    await conn.execute(
        "delete from preferences.user_topic_sounds where account_id = $1 and user_id = $2", account_id, user_id
    )
    await save_settings(conn, account_id, user_id, UserSettings())


# --- account defaults and role profiles ------------------------------------------


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
        f"select {_USER_COLUMNS} from preferences.users where account_id = $1 and active order by user_id", account_id
    )
    users = [_user(r) for r in rows]
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
    return users, {u.user_id: UserPreferences(_settings(by_user.get(u.user_id)), own.get(u.user_id, {})) for u in users}
