"""When a weekly digest fires, in the user's time zone, across daylight-saving changes.

A digest belongs to a *period*: the local date it fires on ("2026-03-30").
The period, not the instant, is what makes a digest fire exactly once: the
instant of "Monday 08:00 in Europe/Paris" moves by an hour across a DST change,
and a local time that happens twice (the autumn fold) or never (the spring
gap) still names one period. Gap times fire at the same wall-clock offset
after the change (02:30 in a 02:00→03:00 gap fires at 03:30); folded times
fire at their first occurrence.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class Weekly:
    """A day of the week and a local time of day."""

    weekday: int  # Monday = 0
    at: time

    @classmethod
    def parse(cls, text: str) -> Weekly:
        """``"mon 08:00"`` → Weekly(0, 08:00); raises ValueError with a readable message."""
        parts = text.strip().lower().split()
        if len(parts) != 2 or parts[0][:3] not in _DAYS:
            raise ValueError(f"expected '<day> HH:MM' such as 'mon 08:00', got {text!r}")
        try:
            at = time.fromisoformat(parts[1])
        except ValueError as exc:
            raise ValueError(f"expected a time HH:MM in {text!r}") from exc
        return cls(_DAYS.index(parts[0][:3]), at.replace(second=0, microsecond=0))

    def __str__(self) -> str:
        return f"{_DAYS[self.weekday]} {self.at:%H:%M}"


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; UTC when it is empty or unknown (a user's bad setting must not stop digests)."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def fire_instant(period: date, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of local ``at`` on local date ``period`` (first occurrence of a folded time)."""
    return datetime.combine(period, at, tzinfo=tz).replace(fold=0).astimezone(UTC)


def next_fire(after: datetime, weekly: Weekly, tz: ZoneInfo) -> tuple[date, datetime]:
    """The first period (local date) of ``weekly`` whose instant is strictly after ``after``."""
    day = after.astimezone(tz).date() - timedelta(days=1)
    while True:
        if day.weekday() == weekly.weekday:
            instant = fire_instant(day, weekly.at, tz)
            if instant > after:
                return day, instant
        day += timedelta(days=1)
