"""From validated events to plans: rules applied, preferences asked, rows prepared.

Events are grouped by (account, topic) so one ``EffectiveBatch`` call serves
a whole group; stored facts the rules need (inbox visits, team primary
members) are looked up once per group. Nothing here writes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from belfry.errors import BelfryError, InvalidArgument
from belfry.message import Item, Message
from belfry.queue import NewDelivery

from services.dispatcher import render, rules, store
from services.dispatcher.model import Event, Recipient, Topic
from services.dispatcher.preferences import Preferences
from services.dispatcher.routing import Decision, Routed, decide, digest_fact, route, silent_assignment


@dataclass(frozen=True)
class Plan:
    """Everything one event will write, before the first-mention check."""

    event: Event
    notification_id: uuid.UUID
    topic: Topic
    verdicts: tuple[rules.Verdict, ...]
    routed: dict[str, Routed]  # per user who passed the rules
    digest: tuple[NewDelivery, ...]  # batching handoffs beyond the routed ones: digest facts, silent assignments


class Planner:
    """Builds plans for many events at once."""

    def __init__(self, pool: asyncpg.Pool, preferences: Preferences, labels: render.Labels) -> None:
        self._pool = pool
        self._preferences = preferences
        self._labels = labels

    async def plan(self, events: Sequence[Event]) -> list[Plan | BelfryError]:
        """One plan (or the reason there is none) per event, in order."""
        groups: dict[tuple[str, str], list[int]] = {}
        for i, event in enumerate(events):
            groups.setdefault((event.account_id, event.topic), []).append(i)
        out: list[Plan | BelfryError | None] = [None] * len(events)

        async def one_group(indexes: list[int]) -> None:
            try:
                plans = await self._plan_group([events[i] for i in indexes])
            except BelfryError as exc:
                plans = [exc] * len(indexes)
            for i, p in zip(indexes, plans, strict=True):
                out[i] = p

        await asyncio.gather(*(one_group(ix) for ix in groups.values()))
        return [p for p in out if p is not None]

    async def _plan_group(self, events: list[Event]) -> list[Plan | BelfryError]:
        account_id, topic_key = events[0].account_id, events[0].topic
        teams: dict[str, list[str]] = {}
        for event in events:
            if rules.is_unassigned_team_conversation(event) and event.team_id not in teams:
                teams[event.team_id] = await self._preferences.primary_members(account_id, event.team_id)
        visited: set[str] = set()
        if rules.category_of(topic_key) == rules.CONVERSATIONS:
            names = {u for e in events for u in rules.candidates(e)} | {u for t in teams.values() for u in t}
            visited = await store.visited(self._pool, account_id, sorted(names))
        verdicts = [
            rules.decide(e, visited=visited, team_primary=teams.get(e.team_id) if e.unassigned else None)
            for e in events
        ]
        users = {v.user_id for vs in verdicts for v in vs} | {e.actor_user_id for e in events if e.actor_user_id}
        topic, people = await self._preferences.effective(account_id, topic_key, sorted(users))
        decisions: dict[tuple[str, bool], Decision] = {}
        return [self._plan_one(e, vs, topic, people, decisions) for e, vs in zip(events, verdicts, strict=True)]

    def _plan_one(
        self,
        event: Event,
        verdicts: list[rules.Verdict],
        topic: Topic,
        people: dict[str, Recipient],
        decisions: dict[tuple[str, bool], Decision],
    ) -> Plan | BelfryError:
        if not verdicts:
            return InvalidArgument(
                "the event names no recipients: set recipient_user_ids, owner_user_ids, "
                "custom_property_user_ids, mentioned_user_ids or object.owner_user_id",
                field="event.recipient_user_ids",
            )
        for v in verdicts:
            person = people.get(v.user_id)
            if person is None or not person.known:
                return InvalidArgument(
                    f"user {v.user_id!r} is not an active member of account {event.account_id!r}",
                    field="event.recipient_user_ids",
                )
        nid = uuid.uuid4()
        actor = people.get(event.actor_user_id)
        actor_name = actor.display_name if actor is not None and actor.known else ""
        email_only = rules.email_only(event.topic)
        routed = {}
        for v in verdicts:
            if v.reason:
                continue
            person = people[v.user_id]
            # The group's events share topic and preferences: decide once per recipient.
            decision = decisions.get((v.user_id, email_only))
            if decision is None:
                decision = decisions[v.user_id, email_only] = decide(topic, person, email_only=email_only)
            message = self._message(nid, event, topic, person, actor_name)
            routed[v.user_id] = route(nid, event, topic, person, message, email_only=email_only, decision=decision)
        digest = (
            tuple(digest_fact(nid, event, v.user_id) for v in verdicts)
            if rules.feeds_digest(event.topic, topic.batching)
            else ()
        )
        if topic.batching == "assignment":
            # A self-assignment tells nobody, but it still moves the object: batching must see it.
            digest += tuple(
                silent_assignment(nid, event, topic, self._message(nid, event, topic, people[v.user_id], actor_name))
                for v in verdicts
                if v.reason == rules.SELF_ACTION
            )
        return Plan(event, nid, topic, tuple(verdicts), routed, digest)

    def _message(self, nid: uuid.UUID, event: Event, topic: Topic, person: Recipient, actor_name: str) -> Message:
        obj = event.object
        locale = render.language(person.locale)
        return Message(
            notification_id=str(nid),
            account_id=event.account_id,
            user_id=person.user_id,
            topic=event.topic,
            title=render.title(self._labels.title(event.topic, locale), obj.display_name),
            body=render.body(obj.display_name, actor_name, locale),
            url=obj.url,
            occurred_at=event.occurred_at.isoformat(),
            actor_user_id=event.actor_user_id,
            recipient_email=person.email,
            recipient_name=person.display_name,
            locked=topic.locked,
            locale=locale,
            items=(Item(obj.type, obj.id, obj.display_name, obj.url),) if obj.id else (),
            variables=event.variables,
        )
