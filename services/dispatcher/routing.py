"""From one recipient's preferences to queue deliveries (pure: no I/O).

Preference channels map to queue channels as the channel registry
(``belfry.channels``) says: bell, pop-up and browser share one "bell"
delivery whose message carries the three flags (the gateway shows it in live
tabs), the browser also has its own "browser" delivery (web push drops it
when a live tab has it), and every other channel has its own. Assignment
topics go to batching instead, which merges them over its window.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from belfry import channels, delivery
from belfry.handoff import Assignment, DigestFact, to_payload
from belfry.message import Message
from belfry.preferences import Recipient, Topic
from belfry.queue import NewDelivery

from services.dispatcher.model import Event

ACCEPTED = "accepted"
SUPPRESSED = "suppressed"
HELD = "held"
BATCHED = "batched"

QUIET_HOURS = "quiet_hours"
PREFERENCE_OFF = "preference_off"
NOT_ALLOWED = "channel_not_allowed"
EMAIL_ONLY = "email_only"

# Digest facts share the queue key (account, notification, user, channel)
# with an assignment of the same event, so they travel under an id derived
# from the notification's.
_DIGEST_NAMESPACE = uuid.UUID("5d0c8c4e-52a4-4b8e-9a43-2f6f3d1b7f10")


@dataclass(frozen=True)
class Routed:
    """One recipient's channel decisions and the deliveries that carry them."""

    channels: list[dict[str, str]]  # [{"c": channel, "s": state, "r": reason}]
    deliveries: list[NewDelivery]
    held_until: datetime | None


def digest_notification_id(notification_id: uuid.UUID) -> uuid.UUID:
    """The id a digest fact travels under (distinct from an assignment of the same event)."""
    return uuid.uuid5(_DIGEST_NAMESPACE, str(notification_id))


def expires_at(event: Event, topic: Topic) -> datetime:
    """The topic's time to live, counted from when the event happened."""
    return event.occurred_at + timedelta(seconds=topic.ttl_seconds)


def _decide(topic: Topic, recipient: Recipient, email_only: bool) -> dict[str, tuple[bool, str, str]]:
    """channel → (enabled, reason when off, sound) after the topic's and the rule's limits."""
    answers = {c.channel: c for c in recipient.channels}
    out: dict[str, tuple[bool, str, str]] = {}
    for channel in channels.NAMES:
        choice = answers.get(channel)
        if channel not in topic.allowed_channels:
            out[channel] = (False, NOT_ALLOWED, "")
        elif email_only and channel != "email":
            out[channel] = (False, EMAIL_ONLY, "")
        elif choice is None or not choice.enabled:
            out[channel] = (False, (choice.reason if choice else "") or PREFERENCE_OFF, "")
        else:
            out[channel] = (True, "", choice.sound)
    return out


@dataclass(frozen=True)
class Decision:
    """What one recipient's preferences decide for a topic, the same for every event of a call.

    Computed once per (recipient, topic) and shared by that recipient's events:
    the channel record is one list object, so its JSON is encoded once too.
    """

    decided: dict[str, tuple[bool, str, str]]
    on: frozenset[str]
    queue_channels: tuple[str, ...]
    quiet: bool
    held_until: datetime | None
    channels: list[dict[str, str]]  # the status record (do not mutate: it is shared)


def decide(topic: Topic, recipient: Recipient, *, email_only: bool = False) -> Decision:
    """One recipient's channel decisions for ``topic`` (pure; reusable across that recipient's events)."""
    decided = _decide(topic, recipient, email_only)
    on = frozenset(c for c, (enabled, _, _) in decided.items() if enabled)
    quiet = recipient.held_until(topic.locked) is not None
    state: dict[str, tuple[str, str]] = {}
    if topic.batching == "assignment":
        state = dict.fromkeys(on, (BATCHED, ""))
    else:
        for channel in on:
            if quiet and channel == "popup":
                state[channel] = (SUPPRESSED, QUIET_HOURS)
            elif quiet and channel != "bell":
                state[channel] = (HELD, QUIET_HOURS)
            else:
                state[channel] = (ACCEPTED, "")
    return Decision(
        decided=decided,
        on=on,
        queue_channels=channels.queue_channels(on),
        quiet=quiet,
        held_until=recipient.quiet_until if quiet and topic.batching != "assignment" else None,
        channels=_record(decided, state),
    )


def route(
    notification_id: uuid.UUID,
    event: Event,
    topic: Topic,
    recipient: Recipient,
    message: Message,
    *,
    email_only: bool = False,
    decision: Decision | None = None,
) -> Routed:
    """The deliveries for one recipient who passed the rules (``decision``: from ``decide``, when reused)."""
    d = decision or decide(topic, recipient, email_only=email_only)
    if topic.batching == "assignment":
        # Handed over even with every channel off: batching needs every assignment to take
        # the object out of the previous assignee's open window (the undo rule).
        return Routed(d.channels, [_assignment(notification_id, event, topic, message, d.queue_channels)], None)
    deliveries = delivery.build(
        message,
        d.queue_channels,
        on=d.on,
        sound=d.decided["popup"][2],
        held_until=d.held_until,
        expires_at=expires_at(event, topic),
        notification_id=notification_id,
    )
    return Routed(d.channels, deliveries, d.held_until)


def _record(decided: dict[str, tuple[bool, str, str]], state: dict[str, tuple[str, str]]) -> list[dict[str, str]]:
    """Every preference channel's decision, as stored for the status API."""
    out = []
    for channel in channels.NAMES:
        enabled, reason, _ = decided[channel]
        if enabled:
            s, r = state.get(channel, (ACCEPTED, ""))
        else:
            s, r = SUPPRESSED, reason
        out.append({"c": channel, "s": s, "r": r})
    return out


def silent_assignment(notification_id: uuid.UUID, event: Event, topic: Topic, message: Message) -> NewDelivery:
    """The handoff of an assignment nobody is told about (self-assignment): ``channels=()``.

    Batching still needs it to take the object out of the previous assignee's window.
    """
    return _assignment(notification_id, event, topic, message, ())


def _assignment(
    notification_id: uuid.UUID, event: Event, topic: Topic, message: Message, queue_channels: tuple[str, ...]
) -> NewDelivery:
    """The handoff of one assignment (``message``'s user) to batching, on the batching channel."""
    expiry = expires_at(event, topic)
    assignment = Assignment(
        message=message,
        channels=queue_channels,
        object_type=event.object.type,
        object_id=event.object.id,
        assigned_at=event.occurred_at.isoformat(),
        expires_at=expiry.isoformat(),
    )
    return NewDelivery(
        account_id=event.account_id,
        notification_id=notification_id,
        user_id=message.user_id,
        channel="batching",
        topic=event.topic,
        payload=to_payload(assignment),
        expires_at=expiry,
    )


def digest_fact(notification_id: uuid.UUID, event: Event, user_id: str) -> NewDelivery:
    """A task/workflow fact for the digests, on the batching channel."""
    fact = DigestFact(
        account_id=event.account_id,
        user_id=user_id,
        topic=event.topic,
        object_type=event.object.type,
        object_id=event.object.id,
        display_name=event.object.display_name,
        url=event.object.url,
        occurred_at=event.occurred_at.isoformat(),
        data=dict(event.variables),
    )
    return NewDelivery(
        account_id=event.account_id,
        notification_id=digest_notification_id(notification_id),
        user_id=user_id,
        channel="batching",
        topic=event.topic,
        payload=to_payload(fact),
        # Digests are weekly: a fact is worth keeping until the next one is sent.
        expires_at=event.occurred_at + timedelta(days=8),
    )
