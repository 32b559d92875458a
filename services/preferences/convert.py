"""Protobuf ↔ dataclass conversions shared by the two servicers."""

from __future__ import annotations

import datetime as dt

from belfry import channels
from belfry.api.common.v1 import common_pb2
from belfry.api.directory.v1 import directory_pb2
from belfry.api.preferences.v1 import preferences_pb2
from belfry.errors import InvalidArgument
from google.protobuf import timestamp_pb2

from services.preferences.catalogue import Topic
from services.preferences.model import (
    Account,
    ChannelDecision,
    Decision,
    QuietHours,
    Team,
    TeamMember,
    User,
    UserSettings,
)

_TIERS = {
    directory_pb2.TIER_STARTER: "starter",
    directory_pb2.TIER_PROFESSIONAL: "professional",
    directory_pb2.TIER_ENTERPRISE: "enterprise",
}
_TIER_PB = {v: k for k, v in _TIERS.items()}


def channel_name(value: int, *, field: str) -> str:
    """The channel's name; unknown or unspecified is INVALID_ARGUMENT."""
    found = channels.BY_VALUE.get(value)
    if found is None:
        raise InvalidArgument(f"unknown channel {value}; use one of {', '.join(channels.NAMES)}", field=field)
    return found.name


def channel_pb(name: str) -> common_pb2.Channel.ValueType:
    """The enum value of a channel name."""
    return channels.BY_NAME[name].value


def channel_views() -> list[preferences_pb2.ChannelView]:
    """Every channel as the settings page shows it (ListTopics), from the channel registry."""
    return [
        preferences_pb2.ChannelView(channel=c.value, name=c.label, tab=c.tab, tab_name=channels.TABS[c.tab])
        for c in channels.PREFERENCE
    ]


def tier_name(value: int) -> str:
    """The tier's name; unspecified is INVALID_ARGUMENT."""
    try:
        return _TIERS[value]  # type: ignore[index]  # enum values are ints at run time
    except KeyError:
        raise InvalidArgument(
            "account.tier must be STARTER, PROFESSIONAL or ENTERPRISE", field="account.tier"
        ) from None


def account_pb(account: Account) -> directory_pb2.Account:
    """An account message."""
    return directory_pb2.Account(account_id=account.account_id, name=account.name, tier=_TIER_PB[account.tier])


def user_from_pb(msg: directory_pb2.User) -> User:
    """A user dataclass (validation is the directory module's)."""
    return User(
        account_id=msg.account_id,
        user_id=msg.user_id,
        email=msg.email,
        display_name=msg.display_name,
        locale=msg.locale or "en",
        time_zone=msg.time_zone or "UTC",
        permission_set=msg.permission_set,
        tool_access=tuple(sorted(set(msg.tool_access))),
        super_admin=msg.super_admin,
        active=msg.active,
    )


def user_pb(user: User) -> directory_pb2.User:
    """A user message."""
    return directory_pb2.User(
        account_id=user.account_id,
        user_id=user.user_id,
        email=user.email,
        display_name=user.display_name,
        locale=user.locale,
        time_zone=user.time_zone,
        permission_set=user.permission_set,
        tool_access=list(user.tool_access),
        super_admin=user.super_admin,
        active=user.active,
    )


def team_from_pb(msg: directory_pb2.Team) -> Team:
    """A team dataclass."""
    members = tuple(TeamMember(m.user_id, m.primary) for m in msg.members)
    return Team(msg.account_id, msg.team_id, msg.name, members)


def team_pb(team: Team) -> directory_pb2.Team:
    """A team message."""
    return directory_pb2.Team(
        account_id=team.account_id,
        team_id=team.team_id,
        name=team.name,
        members=[directory_pb2.TeamMember(user_id=m.user_id, primary=m.primary) for m in team.members],
    )


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    """A protobuf timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def _channel_decision(c: ChannelDecision) -> preferences_pb2.ChannelDecision:
    return preferences_pb2.ChannelDecision(
        channel=channel_pb(c.channel), enabled=c.enabled, reason=c.reason, sound=c.sound
    )


def decision_pb(user_id: str, d: Decision) -> preferences_pb2.RecipientDecision:
    """A recipient decision with the directory facts the dispatcher needs."""
    msg = preferences_pb2.RecipientDecision(
        user_id=user_id,
        channels=[_channel_decision(c) for c in d.channels],
        in_quiet_hours=d.in_quiet_hours,
        known=d.known,
    )
    if d.quiet_until is not None:
        msg.quiet_until.FromDatetime(d.quiet_until)
    if d.user is not None:
        msg.email = d.user.email
        msg.display_name = d.user.display_name
        msg.locale = d.user.locale
        msg.time_zone = d.user.time_zone
    return msg


def topic_info_pb(topic: Topic) -> preferences_pb2.TopicInfo:
    """What the dispatcher and batching need to know about the topic itself, its labels included."""
    return preferences_pb2.TopicInfo(
        key=topic.key,
        locked=topic.locked,
        ttl_seconds=topic.ttl_seconds,
        category=topic.category,
        batching=topic.batching,
        allowed_channels=[channel_pb(c) for c in topic.channels],
        labels=topic.names,
    )


def settings_pb(s: UserSettings, default_sound: str) -> preferences_pb2.ChannelSettings:
    """The channel settings block as the settings page shows it."""
    q = s.quiet
    return preferences_pb2.ChannelSettings(
        switches=[
            preferences_pb2.ChannelSwitch(channel=channel_pb(c), enabled=c not in s.channels_off)
            for c in channels.NAMES
        ],
        red_dot=s.red_dot,
        default_sound=s.default_sound or default_sound,
        muted=s.muted,
        quiet_hours=preferences_pb2.QuietHours(
            enabled=q.enabled, days=list(q.days), start=q.start.strftime("%H:%M"), end=q.end.strftime("%H:%M")
        ),
    )


def _clock(value: str, field: str) -> dt.time:
    if len(value) == 5 and value[2] == ":":
        try:
            return dt.time.fromisoformat(value)
        except ValueError:
            pass
    raise InvalidArgument(f"{value!r} is not a time of day as HH:MM", field=field)


def settings_from_pb(msg: preferences_pb2.ChannelSettings) -> UserSettings:
    """Channel settings from a request (the sound and the days are checked by the caller)."""
    off = {channel_name(s.channel, field="settings.switches.channel") for s in msg.switches if not s.enabled}
    q = msg.quiet_hours
    quiet = QuietHours(
        enabled=q.enabled,
        days=tuple(sorted(set(q.days))),
        start=_clock(q.start or "22:00", "settings.quiet_hours.start"),
        end=_clock(q.end or "07:00", "settings.quiet_hours.end"),
    )
    return UserSettings(
        channels_off=frozenset(off), red_dot=msg.red_dot, default_sound=msg.default_sound, muted=msg.muted, quiet=quiet
    )
