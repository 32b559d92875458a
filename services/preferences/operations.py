"""User-facing changes of preferences: validated, version-checked, audited, all or nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import asyncpg
from belfry import i18n
from belfry.auth import Caller
from belfry.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

from services.preferences import store
from services.preferences.catalogue import Topic
from services.preferences.engine import Engine
from services.preferences.model import Account, AuditEntry, Choices, User, UserPreferences, UserSettings
from services.preferences.store import Conn

Change = Callable[[Conn, int], Awaitable[None]]
MAX_CHOICES = 2000  # more than every (topic, channel) pair of the catalogue


class Operations:
    """Identify the caller, then read or change their own preferences."""

    def __init__(self, pool: asyncpg.Pool, engine: Engine, *, app_url: str) -> None:
        self.pool = pool
        self.engine = engine
        self.catalogue = engine.catalogue
        self.app_url = app_url

    async def identify(self, caller: Caller) -> tuple[User, Account]:
        """The caller's directory record and account; only active members get in."""
        async with self.pool.acquire() as conn:
            account = await store.get_account(conn, caller.account_id)
            users = await store.get_users(conn, caller.account_id, [caller.user_id])
        user = users.get(caller.user_id)
        if account is None or user is None or not user.active:
            raise PermissionDenied("your token names no active user of this account; ask an administrator")
        return user, account

    def topic_for(self, user: User, key: str, channel: str | None, *, field: str = "topic") -> Topic:
        """A topic the user may see, and (when given) a channel it allows."""
        topic = self.catalogue.topics.get(key)
        if topic is None:
            raise InvalidArgument(f"unknown topic {key!r}; ListTopics names every topic", field=field)
        if not topic.visible(super_admin=user.super_admin, tool_access=frozenset(user.tool_access)):
            raise FailedPrecondition(
                f"topic {key!r} is not available to you (it needs {topic.visible_to})", field=field
            )
        if channel is not None and channel not in topic.channels:
            raise InvalidArgument(
                f"topic {key!r} is not sent on {channel}; it allows {', '.join(topic.channels)}", field="channel"
            )
        return topic

    async def get(self, user: User) -> UserPreferences:
        """Everything the user chose."""
        async with self.pool.acquire() as conn:
            return await store.user_preferences(conn, user.account_id, user.user_id)

    async def _write(
        self, user: User, expected: int, what: str, new: object, change: Change, *, via: str = "user"
    ) -> int:
        """Lock + version check, apply ``change``, audit old → new; one transaction."""
        if expected < 0:
            raise InvalidArgument("expected_version cannot be negative", field="expected_version")
        async with self.pool.acquire() as conn, conn.transaction():
            old = await store.user_preferences(conn, user.account_id, user.user_id)
            version = await store.lock_user(conn, user.account_id, user.user_id, expected)
            await change(conn, version)
            await store.audit(
                conn,
                user.account_id,
                actor=user.user_id if via == "user" else "",
                user_id=user.user_id,
                via=via,
                what=what,
                old=describe(old, what, new),
                new=new,
            )
            return version

    async def set_choices(
        self, user: User, choices: Choices, expected: int, *, what: str = "choice", via: str = "user"
    ) -> int:
        """Set several own (topic, channel) choices at once."""
        if len(choices) > MAX_CHOICES:
            raise InvalidArgument(f"at most {MAX_CHOICES} choices per call", field="choices")
        for (key, channel), enabled in choices.items():
            topic = self.topic_for(user, key, channel)
            if topic.locked and not enabled:
                raise FailedPrecondition(f"topic {key!r} is locked: it cannot be switched off", field="choice.enabled")

        async def change(conn: Conn, _: int) -> None:
            await store.set_choices(conn, user.account_id, user.user_id, choices)

        return await self._write(user, expected, what, _choices_json(choices), change, via=via)

    async def clear_channels(self, user: User, channels: Sequence[str], expected: int) -> int:
        """Every unlocked topic the user may see switched off on these channels."""
        if not channels:
            raise InvalidArgument("name the tab's channels to clear", field="channels")
        choices: Choices = {}
        access = frozenset(user.tool_access)
        for topic in self.catalogue.topics.values():
            if topic.locked or not topic.visible(super_admin=user.super_admin, tool_access=access):
                continue
            choices.update({(topic.key, c): False for c in channels if c in topic.channels})
        return await self.set_choices(user, choices, expected, what="clear_channel")

    async def update_settings(self, user: User, settings: UserSettings, expected: int) -> int:
        """Replace the channel settings block (switches, red dot, sound, mute, quiet hours)."""
        if settings.default_sound:
            self.catalogue.check_sound(settings.default_sound, field="settings.default_sound")
        if any(d < 1 or d > 7 for d in settings.quiet.days):
            raise InvalidArgument(
                "quiet hours days are ISO weekdays 1 (Monday) to 7 (Sunday)", field="settings.quiet_hours.days"
            )
        if settings.quiet.enabled and not settings.quiet.days:
            raise InvalidArgument("quiet hours need at least one day", field="settings.quiet_hours.days")

        async def change(conn: Conn, _: int) -> None:
            await store.save_settings(conn, user.account_id, user.user_id, settings)

        return await self._write(user, expected, "settings", settings_json(settings), change)

    async def set_muted(self, user: User, muted: bool, expected: int) -> int:
        """Mute or unmute pop-up sounds, keeping every other setting."""
        current = (await self.get(user)).settings
        return await self.update_settings(user, _replace(current, muted=muted), expected)

    async def set_topic_sound(self, user: User, key: str, sound: str, expected: int) -> int:
        """One topic's pop-up sound ("" = back to the default)."""
        self.topic_for(user, key, "popup")
        if sound:
            self.catalogue.check_sound(sound, field="sound")

        async def change(conn: Conn, _: int) -> None:
            await store.set_topic_sound(conn, user.account_id, user.user_id, key, sound)

        return await self._write(user, expected, "topic_sound", {"topic": key, "sound": sound}, change)

    async def reset(self, user: User, expected: int) -> int:
        """Forget every own choice, sound and setting: the defaults apply again."""

        async def change(conn: Conn, version: int) -> None:
            await store.reset_user(conn, user.account_id, user.user_id)

        return await self._write(user, expected, "reset", {}, change)

    async def reset_topic(self, user: User, key: str, channels: Sequence[str], expected: int) -> int:
        """Forget the user's own choices of one topic on ``channels`` (every channel of it when empty)."""
        topic = self.topic_for(user, key, None)
        for channel in channels:
            self.topic_for(user, key, channel, field="channels")
        forget = sorted(set(channels) or set(topic.channels))

        async def change(conn: Conn, _: int) -> None:
            await store.forget_choices(conn, user.account_id, user.user_id, key, forget)

        return await self._write(user, expected, "reset_topic", {"topic": key, "channels": forget}, change)

    async def unsubscribe_topic(self, account_id: str, user_id: str, key: str) -> tuple[str, str, bool]:
        """The unsubscribe link's topic as its page names it: (label, language, locked), in the user's language."""
        user = await self.require_user(account_id, user_id)
        if not user.active:
            raise NotFound(f"user {user_id!r} is not an active user of account {account_id!r}", field="user_id")
        topic = self.topic_for(user, key, "email")
        return topic.name(user.locale), i18n.language(user.locale), topic.locked

    async def unsubscribe(self, account_id: str, user_id: str, topic: str) -> int:
        """The email unsubscribe link's effect: the topic off for email (audited as "email-link")."""
        user = await self.require_user(account_id, user_id)
        if not user.active:
            raise NotFound(f"user {user_id!r} is not an active user of account {account_id!r}", field="user_id")
        return await self.set_choices(user, {(topic, "email"): False}, 0, what="unsubscribe", via="email-link")

    async def audit(self, account_id: str, user_id: str | None, *, before: int | None, limit: int) -> list[AuditEntry]:
        """Newest-first audit entries of one user, or of the account when ``user_id`` is None."""
        async with self.pool.acquire() as conn:
            return await store.list_audit(conn, account_id, user_id, before=before, limit=limit)

    async def require_user(self, account_id: str, user_id: str) -> User:
        """Another user of the same account (for admins reading the audit log)."""
        async with self.pool.acquire() as conn:
            found = await store.get_users(conn, account_id, [user_id])
        if user_id not in found:
            raise NotFound(f"user {user_id!r} is not a user of your account", field="user_id")
        return found[user_id]


def _replace(s: UserSettings, *, muted: bool) -> UserSettings:
    return UserSettings(s.version, s.channels_off, s.red_dot, s.default_sound, muted, s.quiet)


def _choices_json(choices: Choices) -> dict[str, bool]:
    return {f"{t}/{c}": e for (t, c), e in sorted(choices.items())}


def settings_json(s: UserSettings) -> dict[str, object]:
    """Settings as the audit log shows them."""
    q = s.quiet
    return {
        "channels_off": sorted(s.channels_off),
        "red_dot": s.red_dot,
        "default_sound": s.default_sound,
        "muted": s.muted,
        "quiet_hours": {"enabled": q.enabled, "days": list(q.days), "start": str(q.start)[:5], "end": str(q.end)[:5]},
    }


def describe(old: UserPreferences, what: str, new: object) -> object:
    """The part of the old state that the change replaces, for the audit log."""
    if what in {"settings"}:
        return settings_json(old.settings)
    if what == "topic_sound" and isinstance(new, dict):
        return {"topic": new["topic"], "sound": old.sounds.get(str(new["topic"]), "")}
    if what == "reset":
        return {"choices": _choices_json(old.choices), "sounds": old.sounds, "settings": settings_json(old.settings)}
    if what == "reset_topic" and isinstance(new, dict):
        previous = _choices_json(old.choices)
        keys = [f"{new['topic']}/{c}" for c in new["channels"]]
        return {k: previous[k] for k in keys if k in previous}
    if isinstance(new, dict):
        previous = _choices_json(old.choices)
        return {k: previous.get(k) for k in new}
    return None
