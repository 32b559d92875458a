"""Effective preferences: loads every layer and applies ``precedence.decide``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

import asyncpg
from belfry.errors import InvalidArgument

from services.preferences import store
from services.preferences.catalogue import Catalogue, Topic
from services.preferences.directory import check_id
from services.preferences.model import Decision, User, UserPreferences
from services.preferences.precedence import decide

Clock = Callable[[], dt.datetime]
NOTHING_CHOSEN = UserPreferences()


class Engine:
    """Answers "what does this user get for this topic" for one or many users."""

    def __init__(self, pool: asyncpg.Pool, catalogue: Catalogue, clock: Clock, max_batch: int) -> None:
        self._pool = pool
        self.catalogue = catalogue
        self._clock = clock
        self._max_batch = max_batch

    def now(self) -> dt.datetime:
        """The service clock (injected in tests)."""
        return self._clock()

    async def effective_batch(
        self, account_id: str, topic_key: str, user_ids: Sequence[str]
    ) -> tuple[Topic, list[Decision]]:
        """One decision per requested user id, in request order (unknown users: known=False)."""
        check_id(account_id, "account_id")
        topic = self.catalogue.topic(topic_key)
        if len(user_ids) > self._max_batch:
            raise InvalidArgument(
                f"user_ids names {len(user_ids)} users; at most {self._max_batch} per call, split the request",
                field="user_ids",
            )
        async with self._pool.acquire() as conn:
            account = await store.require_account(conn, account_id)
            users, prefs = await store.batch_inputs(conn, account_id, topic.key, user_ids)
            profiles, defaults = await store.account_layers(conn, account_id, topic.key)
        now = self._clock()
        enterprise = account.tier == "enterprise"
        decisions = []
        for user_id in user_ids:
            user = users.get(user_id)
            profile = profiles.get(user.permission_set, {}) if user is not None else {}
            decisions.append(
                decide(
                    topic,
                    user,
                    enterprise=enterprise,
                    own=prefs.get(user_id, NOTHING_CHOSEN),
                    profile=profile,
                    account=defaults,
                    default_sound=self.catalogue.default_sound,
                    now=now,
                )
            )
        return topic, decisions

    async def for_user(self, user: User, enterprise: bool) -> list[tuple[Topic, Decision]]:
        """The user's decision for every topic of the catalogue (the settings page)."""
        async with self._pool.acquire() as conn:
            own = await store.user_preferences(conn, user.account_id, user.user_id)
            profiles, defaults = await store.account_layers(conn, user.account_id)
        now = self._clock()
        profile = profiles.get(user.permission_set, {})
        return [
            (
                topic,
                decide(
                    topic,
                    user,
                    enterprise=enterprise,
                    own=own,
                    profile=profile,
                    account=defaults,
                    default_sound=self.catalogue.default_sound,
                    now=now,
                ),
            )
            for topic in self.catalogue.topics.values()
        ]
