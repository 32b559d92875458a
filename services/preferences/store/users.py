"""SQL of one user's preferences: reads for decisions, version-checked writes, the audit log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from belfry.errors import Aborted

from services.preferences.model import (
    AuditEntry,
    Choices,
    User,
    UserPreferences,
    UserSettings,
)
from services.preferences.store.common import Conn, bump_seq, settings_from_row
from services.preferences.store.directory import get_users


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
        prefs[user_id] = UserPreferences(settings_from_row(settings_by_user.get(user_id)), own, sounds)
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
        settings_from_row(settings),
        {(r["topic"], r["channel"]): r["enabled"] for r in choices},
        {r["topic"]: r["sound"] for r in sounds},
    )


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


async def forget_choices(conn: Conn, account_id: str, user_id: str, topic: str, channels: list[str]) -> None:
    """Remove the user's own choices of one topic on these channels."""
    await conn.execute(
        """delete from preferences.user_choices
           where account_id = $1 and user_id = $2 and topic = $3 and channel = any($4::text[])""",
        account_id,
        user_id,
        topic,
        channels,
    )


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
