"""What the providers receive: a provider-neutral push (they answer with ``belfry.queue.sender.Result``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Push:
    """One notification for one device."""

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
