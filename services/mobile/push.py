"""What the providers receive: a provider-neutral push (they answer with ``belfry.queue.sender.Result``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Push:
    """One notification for one device, or (``title`` empty) a badge update alone."""

    token: str
    app_id: str
    title: str
    body: str
    url: str
    notification_id: str
    topic: str
    collapse_id: str  # a newer push with the same id replaces an undelivered one
    expires_at: int  # Unix seconds; the provider drops it afterwards
    ttl_seconds: int
    high_priority: bool
    badge: int  # the user's unread count: the app icon shows what the bell shows


def badge_only(token: str, app_id: str, badge: int, collapse_id: str, expires_at: int, ttl_seconds: int) -> Push:
    """A push that only sets the app icon's badge (the user read something elsewhere): no alert, no sound."""
    return Push(token, app_id, "", "", "", "", "", collapse_id, expires_at, ttl_seconds, False, badge)
