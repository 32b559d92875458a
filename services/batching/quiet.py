"""Per-channel deliveries for what batching enqueues: ``belfry.delivery``, as for the dispatcher.

Held deliveries are rows in the queue whose ``available_at`` is the end of the
user's quiet hours: the queue makes them claimable then and expires them past
their time to live, so no separate release loop is needed. The bell is not
held: it collects at once, silently. Locked topics bypass quiet hours.

The bell delivery's pop-up and browser flags come from the user's current
preferences (the handoff carries queue channels, where the pop-up and the
in-tab browser notification ride on the bell); without an answer from
preferences, from the message as the dispatcher made it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from belfry import delivery
from belfry.message import Message
from belfry.preferences import Recipient
from belfry.queue import NewDelivery


def deliveries(
    message: Message,
    channels: Sequence[str],
    *,
    recipient: Recipient | None,
    locked: bool,
    expires_at: datetime,
) -> list[NewDelivery]:
    """One delivery per queue channel for ``message``, held or silenced by quiet hours."""
    if recipient is not None and recipient.email:
        message = replace(message, recipient_email=recipient.email, recipient_name=recipient.display_name)
    if recipient is None or not recipient.known:
        on = {flag for flag in ("bell", "popup", "browser") if getattr(message, flag)}
        return delivery.build(message, channels, on=on, sound=message.sound, held_until=None, expires_at=expires_at)
    return delivery.build(
        message,
        channels,
        on=recipient.on,
        sound=recipient.popup_sound,
        held_until=recipient.held_until(locked or message.locked),
        expires_at=expires_at,
    )


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
            elif recipient is not None and recipient.in_quiet_hours and "popup" in recipient.on:
                out.append({"c": "popup", "s": "suppressed", "r": "quiet_hours"})
        elif d.available_at is not None:
            out.append({"c": d.channel, "s": "held", "r": "quiet_hours"})
        else:
            out.append({"c": d.channel, "s": "accepted", "r": ""})
    return out
