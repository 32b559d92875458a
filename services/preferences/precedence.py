"""The one function that decides a recipient's channels for a topic.

Order, per channel: a channel the topic does not allow is off; a topic the
user may not see is off everywhere; a locked topic is on; a master switch
that is off turns the (unlocked) topic off; then the first layer that has a
choice wins: the user's own choice → the role profile of the user's
permission set → the account default → the product default. Role profiles
and account defaults are enterprise features: they apply only while the
account is on the enterprise tier.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from belfry.channels import NAMES as CHANNELS

from services.preferences.catalogue import Topic
from services.preferences.model import ChannelDecision, Choices, Decision, QuietHours, User, UserPreferences


def quiet_window(quiet: QuietHours, time_zone: str, now: dt.datetime) -> dt.datetime | None:
    """The end (UTC) of the quiet-hours window ``now`` falls in, or None when outside one."""
    if not quiet.enabled or not quiet.days:
        return None
    try:
        zone = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    local = now.astimezone(zone)
    # A window that started yesterday may still be running (22:00 → 07:00).
    for offset in (-1, 0):
        day = local.date() + dt.timedelta(days=offset)
        if day.isoweekday() not in quiet.days:
            continue
        start = dt.datetime.combine(day, quiet.start, zone)
        end_day = day if quiet.end > quiet.start else day + dt.timedelta(days=1)
        end = dt.datetime.combine(end_day, quiet.end, zone)
        if start <= local < end:
            return end.astimezone(dt.UTC)
    return None


def _layer(
    topic: Topic, channel: str, layers: tuple[tuple[str, Mapping[tuple[str, str], bool]], ...]
) -> tuple[bool, str]:
    for source, choices in layers:
        chosen = choices.get((topic.key, channel))
        if chosen is not None:
            return chosen, source
    return channel in topic.defaults, "product_default"


def decide(
    topic: Topic,
    user: User | None,
    *,
    enterprise: bool,
    own: UserPreferences,
    profile: Choices,
    account: Choices,
    default_sound: str,
    now: dt.datetime,
) -> Decision:
    """Per-channel on/off (with the reason), pop-up sound and quiet hours for one user."""
    if user is None or not user.active:
        off = tuple(ChannelDecision(c, False, "unknown_user") for c in CHANNELS)
        return Decision(user.user_id if user else "", False, off)
    visible = topic.visible(super_admin=user.super_admin, tool_access=frozenset(user.tool_access))
    settings = own.settings
    layers: tuple[tuple[str, Mapping[tuple[str, str], bool]], ...] = (("user", own.choices),)
    if enterprise:
        layers = (*layers, ("role_profile", profile), ("account_default", account))
    quiet_until = None if topic.locked else quiet_window(settings.quiet, user.time_zone, now)
    channels: list[ChannelDecision] = []
    for channel in CHANNELS:
        if channel not in topic.channels:
            enabled, reason = False, "channel_not_allowed"
        elif not visible:
            enabled, reason = False, "not_visible"
        elif topic.locked:
            enabled, reason = True, "locked"
        elif channel in settings.channels_off:
            enabled, reason = False, "master_off"
        else:
            enabled, reason = _layer(topic, channel, layers)
        sound = ""
        if channel == "popup" and enabled and not settings.muted and quiet_until is None:
            sound = own.sounds.get(topic.key) or settings.default_sound or topic.sound or default_sound
        channels.append(ChannelDecision(channel, enabled, reason, sound))
    return Decision(user.user_id, True, tuple(channels), quiet_until is not None, quiet_until, user)
