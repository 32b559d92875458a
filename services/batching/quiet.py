"""Per-channel deliveries for what batching enqueues, with quiet hours applied as the dispatcher does.

Held deliveries are rows in the queue whose ``available_at`` is the end of the
user's quiet hours: the queue makes them claimable then and expires them past
their time to live, so no separate release loop is needed. The bell is not
held: it collects at once, silently (no pop-up, no sound, no OS notification
from a live tab). Locked topics bypass quiet hours.

The bell delivery's pop-up and browser flags come from the user's current
preferences (the handoff carries queue channels, where the pop-up and the
in-tab browser notification ride on the bell).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from belfry.message import Message
from belfry.queue import NewDelivery

from services.batching.prefs import Recipient


def _bell(message: Message, recipient: Recipient | None, quiet: bool) -> Message | None:
    """The bell delivery's message, or None when none of its flags is on."""
    if recipient is None or not recipient.known:
        flags = replace(message, sound=message.sound if message.popup else "")
    else:
        on = recipient.switched_on
        popup = "popup" in on and not quiet
        flags = replace(
            message,
            bell="bell" in on,
            popup=popup,
            browser="browser" in on and not quiet,
            sound=recipient.popup_sound if popup else "",
        )
    return flags if flags.bell or flags.popup or flags.browser else None


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
        available_at = None
        if channel == "bell":
            sent = _bell(message, recipient, quiet_until is not None)
            if sent is None:
                continue
        else:
            sent = replace(message, bell=False, popup=False, sound="", browser=channel == "browser")
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


def decisions(sent: Sequence[NewDelivery], recipient: Recipient | None) -> list[dict[str, str]]:
    """The merged notification's per-channel decisions, in the dispatcher's status format.

    ``[{"c": preference channel, "s": state, "r": reason}]`` for what ``sent``
    (from ``deliveries``) carries: the bell delivery stands for the bell and the
    pop-up (silenced by quiet hours: ``suppressed``/``quiet_hours``); every other
    delivery is its own channel, ``held``/``quiet_hours`` when it waits for the
    end of quiet hours.
    """
    out: list[dict[str, str]] = []
    for d in sent:
        if d.channel == "bell":
            if d.payload.get("bell"):
                out.append({"c": "bell", "s": "accepted", "r": ""})
            if d.payload.get("popup"):
                out.append({"c": "popup", "s": "accepted", "r": ""})
            elif recipient is not None and recipient.in_quiet_hours and "popup" in recipient.switched_on:
                out.append({"c": "popup", "s": "suppressed", "r": "quiet_hours"})
        elif d.available_at is not None:
            out.append({"c": d.channel, "s": "held", "r": "quiet_hours"})
        else:
            out.append({"c": d.channel, "s": "accepted", "r": ""})
    return out
