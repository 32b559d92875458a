"""The rendered notification every sender receives in a delivery's payload.

The dispatcher (or batching, for merged notifications and digests) builds one
``Message`` per notification and stores it as JSON in each delivery row; every
sender reads the same shape. Text fields are untrusted producer input: senders
escape them for their medium (HTML, headers, JSON), never interpret them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Item:
    """One object behind a (possibly merged) notification."""

    type: str
    id: str
    display_name: str
    url: str


@dataclass(frozen=True)
class Message:
    """What to tell one user about one notification, on any channel."""

    notification_id: str
    account_id: str
    user_id: str
    topic: str
    title: str
    body: str
    url: str
    occurred_at: str  # ISO 8601, UTC
    actor_user_id: str = ""
    recipient_email: str = ""  # the email delivery's address (from the directory)
    recipient_name: str = ""
    # The in-app ("bell") delivery carries what the live tab should do with it:
    bell: bool = True  # keep it in the feed behind the bell
    popup: bool = False  # show a toast
    browser: bool = False  # show an OS-level notification from the live tab
    sound: str = ""  # pop-up sound; empty = silent
    locked: bool = False  # support/billing: bypasses quiet hours and switches
    locale: str = "en"
    items: tuple[Item, ...] = ()  # merged notifications name every object
    variables: dict[str, Any] = field(default_factory=dict)

    @property
    def merged_count(self) -> int:
        """How many objects this notification stands for (1 when not merged)."""
        return max(1, len(self.items))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict for the delivery payload (built field by field: ``asdict``'s deep copies cost on the publish path)."""
        body = {name: getattr(self, name) for name in _FIELDS}
        body["items"] = tuple(
            {"type": i.type, "id": i.id, "display_name": i.display_name, "url": i.url} for i in self.items
        )
        body["variables"] = dict(self.variables)
        return body

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        """Parse a delivery payload (unknown keys are ignored, so old rows keep working)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["items"] = tuple(Item(**i) for i in known.get("items", ()))
        return cls(**known)


_FIELDS = tuple(Message.__dataclass_fields__)
