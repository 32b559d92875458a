"""Quiet hours for what batching enqueues, the same way the dispatcher does it.

Held deliveries are rows in the queue whose ``available_at`` is the end of the
user's quiet hours: the queue makes them claimable then and expires them past
their time to live, so no separate release loop is needed. The bell is not
held: it collects at once, silently (no pop-up sound). Locked topics bypass
quiet hours.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from belfry.message import Message
from belfry.queue import NewDelivery

from services.batching.prefs import Recipient


def deliveries(
    message: Message,
    channels: Sequence[str],
    *,
    recipient: Recipient | None,
    locked: bool,
    expires_at: datetime,
) -> list[NewDelivery]:
    """One delivery per queue channel for ``message``, held or silenced by quiet hours."""
    quiet_until = None
    if recipient is not None and recipient.in_quiet_hours and not locked and not message.locked:
        quiet_until = recipient.quiet_until
    if recipient is not None and recipient.email:
        message = replace(message, recipient_email=recipient.email, recipient_name=recipient.display_name)
    out: list[NewDelivery] = []
    for channel in dict.fromkeys(channels):
        sent = message
        available_at = None
        if quiet_until is not None:
            if channel == "bell":
                # Silent: no pop-up sound, and no OS notification from a live tab
                # (the browser channel is held like the others).
                sent = replace(message, sound="", browser=False)
            else:
                available_at = quiet_until
        out.append(
            NewDelivery(
                account_id=message.account_id,
                notification_id=uuid.UUID(message.notification_id),
                user_id=message.user_id,
                channel=channel,
                topic=message.topic,
                payload=sent.to_json(),
                expires_at=expires_at,
                available_at=available_at,
            )
        )
    return out
