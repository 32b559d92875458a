"""Account defaults and role profiles: super admins of enterprise accounts only.

Every change is one transaction: the new layer, the audit rows, and a notice
to each user whose effective preferences it changed. The notice is published
through the dispatcher like every other notification (topic
``account.preferences_changed``, locked, email only), so it has a status
timeline: the transaction writes it as a handoff row on the queue channel
"dispatcher" (``notices`` publishes it), so it is never lost nor sent for a
change that rolled back.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import cast

import asyncpg
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from belfry.queue.store import NewDelivery, enqueue
from google.protobuf import json_format

from services.preferences import store
from services.preferences.directory import check_id
from services.preferences.model import Account, Choices, User
from services.preferences.operations import MAX_CHOICES, Operations
from services.preferences.precedence import decide
from services.preferences.store import Conn

NOTICE_TOPIC = "account.preferences_changed"
# (user, topic, channel) → on/off for every active user over some topics.
Snapshot = dict[tuple[str, str, str], bool]


def require_admin(user: User, account: Account) -> None:
    """Super admins of enterprise accounts only."""
    if not user.super_admin:
        raise PermissionDenied("only super admins may manage the account's default preferences and profiles")
    if account.tier != "enterprise":
        raise FailedPrecondition(
            f"account defaults and notification profiles need the enterprise tier; this account is {account.tier}"
        )


class Admin:
    """Reads and changes of the account-level layers."""

    def __init__(self, ops: Operations) -> None:
        self._ops = ops
        self._catalogue = ops.catalogue

    def check_choices(self, choices: Choices, field: str) -> None:
        """Known topics, allowed channels, never a locked topic, a bounded number."""
        if len(choices) > MAX_CHOICES:
            raise InvalidArgument(f"at most {MAX_CHOICES} choices per call", field=field)
        for key, channel in choices:
            topic = self._catalogue.topics.get(key)
            if topic is None:
                raise InvalidArgument(f"unknown topic {key!r}; ListTopics names every topic", field=field)
            if channel not in topic.channels:
                raise InvalidArgument(f"topic {key!r} is not sent on {channel}", field=field)
            if topic.locked:
                raise FailedPrecondition(f"topic {key!r} is locked: its defaults cannot be changed", field=field)

    async def get_defaults(self, account: Account) -> tuple[Choices, int]:
        """The account defaults and their version."""
        async with self._ops.pool.acquire() as conn:
            _, defaults = await store.account_layers(conn, account.account_id)
            return defaults, await store.defaults_version(conn, account.account_id)

    async def set_defaults(self, admin: User, choices: Choices, expected: int) -> int:
        """Replace the account defaults; returns the new version."""
        self.check_choices(choices, "choices")
        async with self._ops.pool.acquire() as conn, conn.transaction():
            _, old = await store.account_layers(conn, admin.account_id)
            version = await store.lock_account_defaults(conn, admin.account_id, expected)
            topics = sorted({t for t, _ in (*old, *choices)})
            before = await self._snapshot(conn, admin.account_id, topics)
            await store.replace_account_defaults(conn, admin.account_id, choices)
            await self._after(conn, admin, "admin_default", "account_defaults", before, topics, old, choices)
            return version

    async def profiles(self, account: Account) -> list[tuple[str, Choices, int]]:
        """Every role profile: (permission set, choices, version)."""
        async with self._ops.pool.acquire() as conn:
            versions = await store.profile_versions(conn, account.account_id)
            layers, _ = await store.account_layers(conn, account.account_id)
        return [(name, layers.get(name, {}), v) for name, v in versions.items()]

    async def permission_sets(self, account: Account) -> list[str]:
        """The account's permission sets (from the directory): what a role profile may be made for."""
        async with self._ops.pool.acquire() as conn:
            return await store.permission_sets(conn, account.account_id)

    async def profile(self, account: Account, permission_set: str) -> tuple[Choices, int]:
        """One profile; NotFound when absent."""
        for name, choices, version in await self.profiles(account):
            if name == permission_set:
                return choices, version
        raise NotFound(f"no notification profile for permission set {permission_set!r}", field="permission_set")

    async def save_profile(
        self, admin: User, permission_set: str, choices: Choices, expected: int, *, create: bool
    ) -> int:
        """Create (ALREADY_EXISTS if present) or update (NOT_FOUND if absent) a profile."""
        check_id(permission_set, "profile.permission_set")
        self.check_choices(choices, "profile.choices")
        async with self._ops.pool.acquire() as conn, conn.transaction():
            current = await store.lock_profile(conn, admin.account_id, permission_set)
            if create and current is not None:
                raise AlreadyExists(f"a profile for {permission_set!r} exists; update it instead", field="profile")
            if not create and current is None:
                raise NotFound(f"no notification profile for permission set {permission_set!r}", field="profile")
            if expected and expected != current:
                raise_stale(current)
            layers, _ = await store.account_layers(conn, admin.account_id)
            old = layers.get(permission_set, {})
            topics = sorted({t for t, _ in (*old, *choices)})
            await store.lock_account_defaults(conn, admin.account_id, 0)
            before = await self._snapshot(conn, admin.account_id, topics)
            version = (current or 0) + 1
            await store.save_profile(conn, admin.account_id, permission_set, version, choices)
            await self._after(conn, admin, "role_profile", f"profile:{permission_set}", before, topics, old, choices)
            return version

    async def delete_profile(self, admin: User, permission_set: str, expected: int) -> None:
        """Remove a profile; its users fall back to the account defaults."""
        async with self._ops.pool.acquire() as conn, conn.transaction():
            current = await store.lock_profile(conn, admin.account_id, permission_set)
            if current is None:
                raise NotFound(f"no notification profile for permission set {permission_set!r}", field="permission_set")
            if expected and expected != current:
                raise_stale(current)
            layers, _ = await store.account_layers(conn, admin.account_id)
            old = layers.get(permission_set, {})
            topics = sorted({t for t, _ in old})
            await store.lock_account_defaults(conn, admin.account_id, 0)
            before = await self._snapshot(conn, admin.account_id, topics)
            await store.delete_profile(conn, admin.account_id, permission_set)
            await self._after(conn, admin, "role_profile", f"profile:{permission_set}", before, topics, old, {})

    async def _snapshot(self, conn: Conn, account_id: str, topics: Sequence[str]) -> Snapshot:
        users, prefs = await store.account_snapshot_inputs(conn, account_id, topics)
        profiles, defaults = await store.account_layers(conn, account_id)
        now = self._ops.engine.now()
        result: Snapshot = {}
        for key in topics:
            topic = self._catalogue.topics[key]
            for user in users:
                d = decide(
                    topic,
                    user,
                    enterprise=True,
                    own=prefs[user.user_id],
                    profile=profiles.get(user.permission_set, {}),
                    account=defaults,
                    default_sound="",
                    now=now,
                )
                result.update({(user.user_id, key, c.channel): c.enabled for c in d.channels})
        return result

    async def _after(
        self,
        conn: Conn,
        admin: User,
        via: str,
        what: str,
        before: Snapshot,
        topics: Sequence[str],
        old: Choices,
        new: Choices,
    ) -> None:
        """Audit the change, then audit and notify every user whose effective preferences moved."""
        await store.audit(
            conn, admin.account_id, actor=admin.user_id, user_id="", via=via, what=what,
            old=_json(old), new=_json(new),
        )  # fmt: skip
        after = await self._snapshot(conn, admin.account_id, topics)
        changed: dict[str, dict[str, tuple[bool, bool]]] = {}
        for key, was in before.items():
            now_on = after.get(key, was)
            if now_on != was:
                changed.setdefault(key[0], {})[f"{key[1]}/{key[2]}"] = (was, now_on)
        if not changed:
            return
        users = await store.get_users(conn, admin.account_id, list(changed))
        deliveries = []
        for user_id, diff in sorted(changed.items()):
            await store.audit(
                conn, admin.account_id, actor=admin.user_id, user_id=user_id, via=via, what="effective",
                old={k: v[0] for k, v in diff.items()}, new={k: v[1] for k, v in diff.items()},
            )  # fmt: skip
            deliveries.append(self._notice(users[user_id], admin, diff))
        # A pooled connection proxies a Connection; the queue module types the plain one.
        await enqueue(cast(asyncpg.Connection, conn), deliveries)

    def _notice(self, user: User, admin: User, diff: dict[str, tuple[bool, bool]]) -> NewDelivery:
        """The handoff of one user's notice: the dispatcher event, on the queue channel "dispatcher".

        The changed topics, named in the user's language, are the event's
        object ("<label>: Deal assigned to you; ..."). The actor is the system,
        not the admin: the dispatcher never tells people about their own
        actions, and an admin whose own answers moved is told too.
        """
        now = self._ops.engine.now()
        handoff = uuid.uuid4()
        names = sorted({self._catalogue.topics[k.split("/")[0]].name(user.locale) for k in diff})
        event = pb.Event(
            account_id=user.account_id,
            topic=NOTICE_TOPIC,
            actor=pb.Actor(source=pb.ACTOR_SOURCE_UI),
            object=pb.ObjectRef(type="preferences", display_name="; ".join(names), url=f"{self._ops.app_url}/settings"),
            recipient_user_ids=[user.user_id],
            idempotency_key=f"preferences-notice/{handoff}",
        )
        event.occurred_at.FromDatetime(now)
        event.variables.update({"changes": {k: v[1] for k, v in sorted(diff.items())}, "changed_by": admin.user_id})
        return NewDelivery(
            account_id=user.account_id,
            notification_id=handoff,
            user_id=user.user_id,
            channel="dispatcher",
            topic=NOTICE_TOPIC,
            payload=json_format.MessageToDict(event, preserving_proto_field_name=True),
            expires_at=now + dt.timedelta(seconds=self._catalogue.topics[NOTICE_TOPIC].ttl_seconds),
        )


def raise_stale(current: int | None) -> None:
    """ABORTED naming the current version."""

    raise Aborted(f"the profile changed elsewhere (version {current}); reload and try again")


def _json(choices: Choices) -> dict[str, bool]:
    return {f"{t}/{c}": e for (t, c), e in sorted(choices.items())}
