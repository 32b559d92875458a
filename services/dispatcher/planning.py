"""From accepted events to plans: rules applied, preferences asked, rows prepared.

Events are grouped by (account, topic) so one ``EffectiveBatch`` call serves
a whole group; stored facts the rules need (inbox visits, team primary
members) are looked up once per group. Nothing here writes. ``admit`` is the
accept path's part: the cheap checks a producer hears about synchronously.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from belfry import i18n
from belfry.errors import BelfryError, InvalidArgument
from belfry.message import Item, Message
from belfry.preferences import REFUSED, Preferences, Recipient, Topic
from belfry.queue import NewDelivery

from services.dispatcher import follow_store, follows, render, rules, store
from services.dispatcher.model import Event
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
    next_position: int | None = None  # more candidates left past this chunk: fan out from here next
    follows: tuple[tuple[str, str], ...] = ()  # automatic follows of the event's object: (user, source)


@dataclass(frozen=True)
class Job:
    """One accepted event to expand: candidates ``[position, position + chunk)`` in user id order (0: all)."""

    event: Event
    notification_id: uuid.UUID
    position: int = 0
    chunk: int = 0


_T = TypeVar("_T")

# How long the accept path trusts that an (account, topic) pair exists.
_ADMIT_SECONDS = 30.0


class Planner:
    """Builds plans for many events at once."""

    def __init__(
        self, pool: asyncpg.Pool, preferences: Preferences, auto_follow: follows.AutoFollow | None = None
    ) -> None:
        self._pool = pool
        self._preferences = preferences
        self._auto_follow = auto_follow or follows.parse(follows.DEFAULT)
        self._known: dict[tuple[str, str], float] = {}

    async def admit(self, events: Sequence[Event]) -> list[BelfryError | None]:
        """Per event, the reason to refuse it now (None: accept): it names nobody, or its account or topic is unknown.

        Known (account, topic) pairs are remembered for a short while, so the
        accept path asks preferences once per pair, not once per event.
        """
        now = time.monotonic()
        pairs = {(e.account_id, e.topic) for e in events}
        missing = [p for p in pairs if self._known.get(p, 0.0) < now]
        answers = await asyncio.gather(*(self._check_pair(*p) for p in missing))
        refused = {p: a for p, a in zip(missing, answers, strict=True) if a is not None}
        for pair in missing:
            if pair not in refused:
                self._known[pair] = now + _ADMIT_SECONDS
        return [refused.get((e.account_id, e.topic)) or _names_nobody(e) for e in events]

    async def _check_pair(self, account_id: str, topic: str) -> BelfryError | None:
        try:
            await self._preferences.effective(account_id, topic, [])
        except REFUSED as exc:
            return exc
        return None

    async def plan(self, jobs: Sequence[Job], conn: store.Conn | None = None) -> list[Plan | BelfryError]:
        """One plan (or the reason there is none) per job, in order.

        ``conn``: the fan-out's own transaction. The facts planning reads
        (followers, mutes, inbox visits) are read on it, one query at a time,
        so a worker never waits for a second pool connection while it holds
        one (with a small pool, that wait could last forever).
        """
        reads = _Reads(conn or self._pool)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.event.account_id, job.event.topic), []).append(i)
        out: list[Plan | BelfryError | None] = [None] * len(jobs)

        async def one_group(indexes: list[int]) -> None:
            try:
                plans = await self._plan_group([jobs[i] for i in indexes], reads)
            except BelfryError as exc:
                plans = [exc] * len(indexes)
            for i, p in zip(indexes, plans, strict=True):
                out[i] = p

        await asyncio.gather(*(one_group(ix) for ix in groups.values()))
        return [p for p in out if p is not None]

    async def _plan_group(self, jobs: list[Job], reads: _Reads) -> list[Plan | BelfryError]:
        jobs = [await _with_followers(job, reads) for job in jobs]
        events = [job.event for job in jobs]
        account_id, topic_key = events[0].account_id, events[0].topic
        teams: dict[str, list[str]] = {}
        for event in events:
            if rules.is_unassigned_team_conversation(event) and event.team_id not in teams:
                teams[event.team_id] = await self._preferences.primary_members(account_id, event.team_id)
        visited: set[str] = set()
        if rules.category_of(topic_key) == rules.CONVERSATIONS:
            names = {u for e in events for u in rules.candidates(e)} | {u for t in teams.values() for u in t}
            visited = await reads.run(store.visited, account_id, sorted(names))
        windows = [
            _window(
                rules.decide(
                    job.event,
                    visited=visited,
                    team_primary=teams.get(job.event.team_id) if job.event.unassigned else None,
                ),
                job,
            )
            for job in jobs
        ]
        users = {v.user_id for vs, _ in windows for v in vs} | {e.actor_user_id for e in events if e.actor_user_id}
        topic, people = await self._preferences.effective(account_id, topic_key, sorted(users))
        mutes = await _muted(jobs, windows, reads)
        decisions: dict[tuple[str, bool], Decision] = {}
        return [
            self._plan_one(job, vs, more, topic, people, decisions, muted=muted)
            for job, (vs, more), muted in zip(jobs, windows, mutes, strict=True)
        ]

    def _plan_one(
        self,
        job: Job,
        candidates: list[rules.Verdict],
        next_position: int | None,
        topic: Topic,
        people: dict[str, Recipient],
        decisions: dict[tuple[str, bool], Decision],
        *,
        muted: set[str],
    ) -> Plan | BelfryError:
        event, nid = job.event, job.notification_id
        # Users the directory does not know (or no longer lists as active) are recorded, not told;
        # so are those who muted the object, unless the topic is locked.
        verdicts = [
            rules.Verdict(v.user_id, rules.NOT_A_MEMBER)
            if (p := people.get(v.user_id)) is None or not p.known
            else rules.Verdict(v.user_id, rules.MUTED)
            if v.user_id in muted and not topic.locked
            else v
            for v in candidates
        ]
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
        # Automatic follows once per event (its first chunk), for members only.
        auto = (
            follows.automatic(event, assignment=topic.batching == "assignment", rules=self._auto_follow)
            if job.position == 0
            else []
        )
        known = tuple((u, s) for u, s in auto if (p := people.get(u)) is not None and p.known)
        return Plan(event, nid, topic, tuple(verdicts), routed, digest, next_position, known)

    def _message(self, nid: uuid.UUID, event: Event, topic: Topic, person: Recipient, actor_name: str) -> Message:
        obj = event.object
        locale = i18n.language(person.locale)
        return Message(
            notification_id=str(nid),
            account_id=event.account_id,
            user_id=person.user_id,
            topic=event.topic,
            title=render.title(topic.label(locale), obj.display_name),
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


def _window(verdicts: list[rules.Verdict], job: Job) -> tuple[list[rules.Verdict], int | None]:
    """The job's chunk of the candidates (in user id order, so a resumed expansion continues where it stopped)."""
    if not job.chunk:
        return verdicts, None
    ordered = sorted(verdicts, key=lambda v: v.user_id)
    end = job.position + job.chunk
    return ordered[job.position : end], end if end < len(ordered) else None


def _names_nobody(event: Event) -> BelfryError | None:
    if rules.candidates(event) or rules.is_unassigned_team_conversation(event) or event.include_followers:
        return None
    return InvalidArgument(
        "the event names no recipients: set recipient_user_ids, owner_user_ids, "
        "custom_property_user_ids, mentioned_user_ids or object.owner_user_id",
        field="event.recipient_user_ids",
    )


class _Reads:
    """Planning's database reads, on one connection (or the pool), one at a time."""

    def __init__(self, conn: store.Conn | asyncpg.Pool) -> None:
        self.conn = conn
        self._lock = asyncio.Lock()

    async def run(self, query: Callable[..., Awaitable[_T]], *args: object) -> _T:
        """``query(conn, *args)``, never two at once on the connection."""
        async with self._lock:
            return await query(self.conn, *args)


async def _with_followers(job: Job, reads: _Reads) -> Job:
    """The job with its object's followers added to the named recipients, when the event asks for them."""
    obj = job.event.object
    if not job.event.include_followers or not obj.type or not obj.id:
        return job
    found = await reads.run(follow_store.followers, job.event.account_id, obj.type, obj.id)
    named = set(job.event.recipient_user_ids)
    extra = tuple(f.user_id for f in found if f.user_id not in named)
    event = dataclasses.replace(job.event, recipient_user_ids=job.event.recipient_user_ids + extra)
    return dataclasses.replace(job, event=event)


async def _muted(
    jobs: list[Job], windows: list[tuple[list[rules.Verdict], int | None]], reads: _Reads
) -> list[set[str]]:
    """For each job, which of its candidates muted the event's object (one query for the group)."""
    asks = [
        (job.event.object.type, job.event.object.id, [v.user_id for v in vs])
        for job, (vs, _) in zip(jobs, windows, strict=True)
        if job.event.object.type and job.event.object.id and vs
    ]
    found = await reads.run(follow_store.muted, jobs[0].event.account_id, asks) if asks else set()
    return [
        {v.user_id for v in vs if (job.event.object.type, job.event.object.id, v.user_id) in found}
        for job, (vs, _) in zip(jobs, windows, strict=True)
    ]
