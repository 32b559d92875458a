"""Checks on one event before anything is looked up or written.

Each failure is an ``InvalidArgument`` naming the field and what to do, so a
producer can fix the event without reading our code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from belfry.errors import InvalidArgument

from services.dispatcher.model import Event

MAX_IDS = 1000  # users named in one event, all lists together
MAX_TEXT = 2048  # characters of one id, name or URL
MAX_KEY = 200  # characters of an idempotency key


@dataclass(frozen=True)
class Limits:
    """Bounds on what one event may carry."""

    max_event_bytes: int = 64 * 1024
    max_future: timedelta = timedelta(minutes=5)


def check_size(size: int, limits: Limits) -> None:
    """The encoded event must fit the documented size."""
    if size > limits.max_event_bytes:
        raise InvalidArgument(
            f"the event is {size} bytes encoded; at most {limits.max_event_bytes} are accepted "
            "(send large content by URL, not inline)",
            field="event",
        )


def check(event: Event, now: datetime, limits: Limits) -> None:
    """Raise ``InvalidArgument`` for the first problem found in ``event``."""
    if not event.account_id:
        raise InvalidArgument("event.account_id is required", field="event.account_id")
    if not event.topic:
        raise InvalidArgument(
            "event.topic is required (a catalogue key such as 'deals.deal_assigned')", field="event.topic"
        )
    if not event.idempotency_key:
        raise InvalidArgument(
            "event.idempotency_key is required: retries are only safe when the producer names each event",
            field="event.idempotency_key",
        )
    if len(event.idempotency_key) > MAX_KEY:
        raise InvalidArgument(
            f"event.idempotency_key is longer than {MAX_KEY} characters", field="event.idempotency_key"
        )
    if event.occurred_at > now + limits.max_future:
        raise InvalidArgument(
            f"event.occurred_at {event.occurred_at.isoformat()} is in the future "
            f"(more than {int(limits.max_future.total_seconds())} s ahead of the server clock)",
            field="event.occurred_at",
        )
    _check_users(event)
    _check_object(event)
    if event.include_followers and not (event.object.type and event.object.id):
        raise InvalidArgument(
            "include_followers needs the object whose followers to tell: set event.object.type and event.object.id",
            field="event.object",
        )
    if event.unassigned and not event.team_id:
        raise InvalidArgument("an unassigned conversation needs event.team_id (its team inbox)", field="event.team_id")


def _check_users(event: Event) -> None:
    lists = {
        "event.recipient_user_ids": event.recipient_user_ids,
        "event.owner_user_ids": event.owner_user_ids,
        "event.custom_property_user_ids": event.custom_property_user_ids,
        "event.mentioned_user_ids": event.mentioned_user_ids,
    }
    if sum(len(ids) for ids in lists.values()) > MAX_IDS:
        raise InvalidArgument(f"an event may name at most {MAX_IDS} users in all", field="event.recipient_user_ids")
    for name, ids in lists.items():
        for user_id in ids:
            if not user_id:
                raise InvalidArgument(f"{name} contains an empty user id", field=name)
            if len(user_id) > MAX_TEXT:
                raise InvalidArgument(f"{name} contains a user id longer than {MAX_TEXT} characters", field=name)


def _check_object(event: Event) -> None:
    obj = event.object
    for name, text in (("event.object.display_name", obj.display_name), ("event.object.url", obj.url)):
        if len(text) > MAX_TEXT:
            raise InvalidArgument(f"{name} is longer than {MAX_TEXT} characters", field=name)
    if obj.url and not obj.url.startswith(("https://", "http://", "/")):
        raise InvalidArgument("event.object.url must be an http(s) URL or a path of the app", field="event.object.url")
    # Browsers drop tabs and newlines from a URL and read "\" as "/": "//host", "/\host" and
    # "/<tab>/host" all name another host, not a path of the app.
    if any(c in obj.url for c in "\t\n\r") or obj.url.replace("\\", "/").startswith("//"):
        raise InvalidArgument(
            "event.object.url is a path of the app only with one leading '/' ('//host' names another host) "
            "and never holds tabs or line breaks",
            field="event.object.url",
        )
