"""Plain frozen dataclasses for the directory and preferences (protobuf stops at the servicer)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Account:
    """A tenant."""

    account_id: str
    name: str
    tier: str


@dataclass(frozen=True)
class User:
    """A user as the directory knows them."""

    account_id: str
    user_id: str
    email: str
    display_name: str = ""
    locale: str = "en"
    time_zone: str = "UTC"
    permission_set: str = ""
    tool_access: tuple[str, ...] = ()
    super_admin: bool = False
    active: bool = True


@dataclass(frozen=True)
class TeamMember:
    """One member of a team; primary members get unassigned-conversation notices."""

    user_id: str
    primary: bool


@dataclass(frozen=True)
class Team:
    """Users of an account working together."""

    account_id: str
    team_id: str
    name: str
    members: tuple[TeamMember, ...]


@dataclass(frozen=True)
class QuietHours:
    """Do-not-disturb hours in the user's time zone; end <= start ends the next day."""

    enabled: bool = False
    days: tuple[int, ...] = ()  # ISO weekdays on which a window starts
    start: dt.time = dt.time(22, 0)
    end: dt.time = dt.time(7, 0)


@dataclass(frozen=True)
class UserSettings:
    """Channel-level settings of one user; version 0 = never written."""

    version: int = 0
    channels_off: frozenset[str] = frozenset()
    red_dot: bool = True
    default_sound: str = ""  # "" = the product's default sound
    muted: bool = False
    quiet: QuietHours = QuietHours()


# (topic, channel) → on/off: the shape of every layer of choices.
Choices = dict[tuple[str, str], bool]


@dataclass(frozen=True)
class UserPreferences:
    """Everything one user chose: settings, per-topic choices and sounds."""

    settings: UserSettings = UserSettings()
    choices: Choices = field(default_factory=dict)
    sounds: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ChannelDecision:
    """One channel's answer; ``reason`` is where it came from (see precedence)."""

    channel: str
    enabled: bool
    reason: str
    sound: str = ""


@dataclass(frozen=True)
class Decision:
    """What one recipient gets for one topic."""

    user_id: str
    known: bool
    channels: tuple[ChannelDecision, ...]
    in_quiet_hours: bool = False
    quiet_until: dt.datetime | None = None
    user: User | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One change of preferences."""

    id: int
    at: dt.datetime
    actor_user_id: str
    user_id: str
    via: str
    what: str
    old_value: object
    new_value: object
