"""Rows the dispatcher hands to the batching service through the queue.

Assignments that must be held and merged, and the facts the weekly and
Friday digests need, travel as deliveries on the ``batching`` queue channel,
written in the dispatcher's own transaction: a crash between the two services
loses nothing, and no service writes another's tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from belfry.message import Message


@dataclass(frozen=True)
class Assignment:
    """One object assigned to one user, to be merged with others of the same type."""

    message: Message  # the single-object notification as it would be sent alone
    channels: tuple[str, ...]  # queue channels enabled for this user on this topic
    object_type: str
    object_id: str
    assigned_at: str  # ISO 8601, UTC: the window opens here
    expires_at: str  # ISO 8601, UTC: the topic's time to live

    kind = "assignment"


@dataclass(frozen=True)
class DigestFact:
    """A task or workflow-enrolment change the weekly/Friday digests report."""

    account_id: str
    user_id: str
    topic: str  # the event's topic, e.g. "tasks.task_created"
    object_type: str
    object_id: str
    display_name: str
    url: str
    occurred_at: str  # ISO 8601, UTC
    data: dict[str, Any]  # event variables (due date, status, workflow, ...)

    kind = "digest_fact"


def to_payload(item: Assignment | DigestFact) -> dict[str, Any]:
    """The delivery payload for ``item``."""
    body = asdict(item)
    body["kind"] = item.kind
    return body


def from_payload(payload: dict[str, Any]) -> Assignment | DigestFact:
    """Parse a ``batching`` delivery payload."""
    body = {k: v for k, v in payload.items() if k != "kind"}
    if payload.get("kind") == Assignment.kind:
        body["message"] = Message.from_json(body["message"])
        body["channels"] = tuple(body["channels"])
        return Assignment(**body)
    if payload.get("kind") == DigestFact.kind:
        return DigestFact(**body)
    raise ValueError(f"unknown batching payload kind {payload.get('kind')!r}")
