"""The dispatcher's domain types (protobuf stops at the servicer)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# Actor sources.
SOURCES = ("", "ui", "api", "import", "workflow")


@dataclass(frozen=True)
class ObjectRef:
    """The object the event is about (display name and URL are untrusted text)."""

    type: str = ""
    id: str = ""
    display_name: str = ""
    url: str = ""
    owner_user_id: str = ""


@dataclass(frozen=True)
class Event:
    """One validated event, ready for the rules."""

    account_id: str
    topic: str
    occurred_at: datetime
    idempotency_key: str
    body_hash: bytes  # SHA-256 of the event without its key: replays must match it
    actor_user_id: str = ""
    source: str = ""
    object: ObjectRef = field(default_factory=ObjectRef)
    owner_user_ids: tuple[str, ...] = ()
    custom_property_user_ids: tuple[str, ...] = ()
    recipient_user_ids: tuple[str, ...] = ()
    mentioned_user_ids: tuple[str, ...] = ()
    variables: dict[str, Any] = field(default_factory=dict)
    activity_id: str = ""
    team_id: str = ""
    unassigned: bool = False


@dataclass(frozen=True)
class ChannelChoice:
    """Preferences' answer for one channel of one recipient."""

    channel: str
    enabled: bool
    reason: str = ""
    sound: str = ""


@dataclass(frozen=True)
class Recipient:
    """Preferences' answer for one user: directory facts, channels, quiet hours."""

    user_id: str
    known: bool
    email: str = ""
    display_name: str = ""
    locale: str = "en"
    time_zone: str = "UTC"
    channels: tuple[ChannelChoice, ...] = ()
    in_quiet_hours: bool = False
    quiet_until: datetime | None = None


@dataclass(frozen=True)
class Topic:
    """What the dispatcher needs to know about a topic."""

    key: str
    locked: bool
    ttl_seconds: int
    category: str
    batching: str  # "assignment" | "digest" | ""
    allowed_channels: tuple[str, ...]


@dataclass(frozen=True)
class Accepted:
    """An event written (or a replay of one written before)."""

    notification_id: uuid.UUID
    replayed: bool = False
