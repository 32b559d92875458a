"""EffectiveBatch with a per-replica cache that is never stale.

The dispatcher asks for up to 1,000 recipients of one topic per event, so
the answer is cached per (account, topic): the account-level layers, and one
serialised ``RecipientDecision`` per user. Every call first reads the
account's change counter (one row; every write that can change an answer
bumps it in its own transaction), and drops the entry when it moved. A
``Set`` that returned is therefore seen by the next call on every replica,
with no timer involved. Users with quiet hours are decided on every call
(the answer depends on the clock); everyone else's answer depends only on
stored data and is served from the cache as bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
from belfry import text
from belfry.api.preferences.v1 import preferences_pb2
from belfry.errors import InvalidArgument, NotFound

from services.preferences import convert, store
from services.preferences.catalogue import Topic
from services.preferences.directory import check_id
from services.preferences.engine import NOTHING_CHOSEN, Engine
from services.preferences.model import Choices, Decision, User, UserPreferences
from services.preferences.precedence import decide

MAX_ENTRIES = 256  # (account, topic) pairs kept per replica


def _delimited(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (tag, varint length, bytes)."""
    size, out = len(payload), bytearray([(number << 3) | 2])
    while size > 0x7F:
        out.append((size & 0x7F) | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out) + payload


@dataclass
class _Entry:
    seq: int
    enterprise: bool
    profiles: dict[str, Choices]
    defaults: Choices
    static: dict[str, bytes] = field(default_factory=dict)  # user id → field 1 of the response, ready
    live: dict[str, tuple[User, UserPreferences]] = field(default_factory=dict)  # quiet hours: per call

    def forget(self, user_ids: set[str], seq: int) -> None:
        """Drop what is known about these users; the rest is still right at ``seq``."""
        for user_id in user_ids:
            self.static.pop(user_id, None)
            self.live.pop(user_id, None)
        self.seq = seq


class BatchAnswers:
    """Answers EffectiveBatch from the cache, loading only what it lacks."""

    def __init__(self, pool: asyncpg.Pool, engine: Engine, max_batch: int) -> None:
        self._pool = pool
        self._engine = engine
        self._max_batch = max_batch
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    async def answer(
        self, account_id: str, topic_key: str, user_ids: Sequence[str]
    ) -> preferences_pb2.EffectiveBatchResponse:
        """The response for these users, in request order (unknown users: known=false)."""
        check_id(account_id, "account_id")
        topic = self._engine.catalogue.topic(topic_key)
        if len(user_ids) > self._max_batch:
            raise InvalidArgument(
                f"user_ids names {len(user_ids)} users; at most {self._max_batch} per call, split the request",
                field="user_ids",
            )
        text.check_all(user_ids, "user_ids")
        async with self._pool.acquire() as conn:
            # The counter is read before any data: data loaded afterwards is at least this fresh.
            found = await store.account_seq(conn, account_id)
            if found is None:
                raise NotFound(
                    f"account {account_id!r} does not exist; create it with UpsertAccount first", field="account_id"
                )
            tier, seq = found
            key = (account_id, topic.key)
            entry = self._entries.get(key)
            if entry is not None and entry.seq < seq:
                changed = await store.changes_since(conn, account_id, entry.seq, seq)
                if changed is None or "" in changed:
                    entry = None  # account-wide change, or too far behind: start over
                else:
                    entry.forget(changed, seq)
            if entry is None:
                profiles, defaults = await store.account_layers(conn, account_id, topic.key)
                entry = _Entry(seq, tier == "enterprise", profiles, defaults)
                self._entries[key] = entry
                while len(self._entries) > MAX_ENTRIES:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(key)
            missing = [u for u in dict.fromkeys(user_ids) if u not in entry.static and u not in entry.live]
            fresh = _Entry(seq, entry.enterprise, entry.profiles, entry.defaults)
            if missing:
                users, prefs = await store.batch_inputs(conn, account_id, topic.key, missing)
                self._learn(fresh, topic, missing, users, prefs)
                # Another call may have moved the entry on meanwhile: only data
                # loaded for the entry's own counter value may join it.
                if entry.seq == seq:
                    entry.static.update(fresh.static)
                    entry.live.update(fresh.live)
        parts = [self._part(fresh, topic, u) or self._part(entry, topic, u) for u in user_ids]
        parts.append(_delimited(2, convert.topic_info_pb(topic).SerializeToString()))
        return preferences_pb2.EffectiveBatchResponse.FromString(b"".join(parts))

    def _part(self, entry: _Entry, topic: Topic, user_id: str) -> bytes:
        """The recipient's field from ``entry``, or b"" when it holds nothing for them."""
        static = entry.static.get(user_id)
        if static is not None:
            return static
        if user_id in entry.live:
            user, own = entry.live[user_id]
            return self._decide(entry, topic, user, own)
        return b""

    def _decide(self, entry: _Entry, topic: Topic, user: User | None, prefs: UserPreferences) -> bytes:
        profile = entry.profiles.get(user.permission_set, {}) if user is not None else {}
        decision = decide(
            topic,
            user,
            enterprise=entry.enterprise,
            own=prefs,
            profile=profile,
            account=entry.defaults,
            default_sound=self._engine.catalogue.default_sound,
            now=self._engine.now(),
        )
        return decision_bytes(user.user_id if user else "", decision)

    def _learn(
        self, entry: _Entry, topic: Topic, ids: list[str], users: dict[str, User], prefs: dict[str, UserPreferences]
    ) -> None:
        for user_id in ids:
            user = users.get(user_id)
            own = prefs.get(user_id, NOTHING_CHOSEN)
            if user is not None and user.active and own.settings.quiet.enabled and not topic.locked:
                entry.live[user_id] = (user, own)
            elif user is None:
                unknown = decide(
                    topic,
                    None,
                    enterprise=False,
                    own=own,
                    profile={},
                    account={},
                    default_sound="",
                    now=self._engine.now(),
                )
                entry.static[user_id] = decision_bytes(user_id, unknown)
            else:
                entry.static[user_id] = self._decide(entry, topic, user, own)


def decision_bytes(user_id: str, decision: Decision) -> bytes:
    """Field 1 of EffectiveBatchResponse for one recipient."""
    return _delimited(1, convert.decision_pb(user_id, decision).SerializeToString())
