"""One recipient's queue deliveries of one message, bell flags and quiet hours applied (pure: no I/O).

The dispatcher (immediate notifications) and batching (merged notifications
and digests) both build their rows here, so the rules are written once:

- the bell delivery tells a live tab what to do: keep it in the feed
  (``bell``), show a toast (``popup``, playing ``sound``), show an OS
  notification (``browser``); with none of the three on there is no bell
  delivery;
- in quiet hours (``held_until`` set) the bell goes at once but silently (no
  toast, no sound, no OS notification) and every other channel waits until
  ``held_until``: the queue releases it then, or expires it past its time to
  live. Callers pass ``held_until=None`` for locked topics, which bypass quiet
  hours (``Recipient.held_until`` decides);
- a delivery on another channel carries no bell flags (``browser`` marks the
  web-push one).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any

from belfry.message import Message
from belfry.queue import NewDelivery


def bell_flags(on: Collection[str], sound: str, *, quiet: bool) -> dict[str, Any] | None:
    """The bell delivery's flags for the preference channels ``on``, or None when none of them is on."""
    popup = "popup" in on and not quiet
    flags = {"bell": "bell" in on, "popup": popup, "browser": "browser" in on and not quiet}
    if not any(flags.values()):
        return None
    return {**flags, "sound": sound if popup else ""}


def build(
    message: Message,
    queue_channels: Iterable[str],
    *,
    on: Collection[str],
    sound: str,
    held_until: datetime | None,
    expires_at: datetime,
    notification_id: uuid.UUID | None = None,
) -> list[NewDelivery]:
    """One delivery per queue channel (in the given order) for the recipient of ``message``.

    ``on`` is the preference channels switched on and ``sound`` the pop-up's
    sound; both only shape the bell delivery.
    """
    nid = notification_id or uuid.UUID(message.notification_id)
    base = message.to_json()
    out: list[NewDelivery] = []
    for channel in dict.fromkeys(queue_channels):
        available_at = None
        if channel == "bell":
            flags = bell_flags(on, sound, quiet=held_until is not None)
            if flags is None:
                continue
            payload = flags
        else:
            payload = {"bell": False, "popup": False, "sound": "", "browser": channel == "browser"}
            available_at = held_until
        out.append(
            NewDelivery(
                account_id=message.account_id,
                notification_id=nid,
                user_id=message.user_id,
                channel=channel,
                topic=message.topic,
                payload=payload,
                expires_at=expires_at,
                available_at=available_at,
                message=base,  # stored once for the recipient's channels (queue.messages)
            )
        )
    return out
