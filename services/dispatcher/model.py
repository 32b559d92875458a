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
    include_followers: bool = False  # also the followers of ``object``, expanded at fan-out


@dataclass(frozen=True)
class Accepted:
    """An event written (or a replay of one written before)."""

    notification_id: uuid.UUID
    replayed: bool = False


def event_fields(event: Event) -> dict[str, Any]:
    """The parts of an event its notification row has no column for, as stored for fan-out."""
    return {
        "source": event.source,
        "owners": list(event.owner_user_ids),
        "custom": list(event.custom_property_user_ids),
        "recipients": list(event.recipient_user_ids),
        "mentioned": list(event.mentioned_user_ids),
        "variables": event.variables,
        "activity": event.activity_id,
        "team": event.team_id,
        "unassigned": event.unassigned,
        "followers": event.include_followers,
    }


def stored_event(
    *,
    account_id: str,
    topic: str,
    occurred_at: datetime,
    idempotency_key: str,
    body_hash: bytes,
    actor_user_id: str,
    obj: dict[str, str],
    fields: dict[str, Any],
) -> Event:
    """The event as accepted, from its notification row (the inverse of ``event_fields``)."""
    return Event(
        account_id=account_id,
        topic=topic,
        occurred_at=occurred_at,
        idempotency_key=idempotency_key,
        body_hash=body_hash,
        actor_user_id=actor_user_id,
        source=fields.get("source", ""),
        object=ObjectRef(**{k: obj.get(k, "") for k in ("type", "id", "display_name", "url", "owner_user_id")}),
        owner_user_ids=tuple(fields.get("owners", ())),
        custom_property_user_ids=tuple(fields.get("custom", ())),
        recipient_user_ids=tuple(fields.get("recipients", ())),
        mentioned_user_ids=tuple(fields.get("mentioned", ())),
        variables=fields.get("variables", {}),
        activity_id=fields.get("activity", ""),
        team_id=fields.get("team", ""),
        unassigned=bool(fields.get("unassigned", False)),
        include_followers=bool(fields.get("followers", False)),
    )
