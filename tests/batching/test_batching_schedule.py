"""The digest schedule as a property: every period once, at its local time, in any zone."""

from __future__ import annotations

import datetime as dt
import itertools
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.batching.schedule import Weekly, next_fire, zone

# Hypothesis draws naive datetimes between naive bounds; the test attaches UTC.
_EARLIEST = dt.datetime(2020, 1, 1)  # noqa: DTZ001 - see above
_LATEST = dt.datetime(2035, 1, 1)  # noqa: DTZ001 - see above
ZONES = ["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "America/Santiago", "UTC"]


def _local_exists(local: dt.datetime, tz: ZoneInfo) -> bool:
    """True when the wall-clock time ``local`` happens at all in ``tz`` (not in a spring gap)."""
    there = local.replace(tzinfo=tz)
    return there.astimezone(dt.UTC).astimezone(tz).replace(tzinfo=None) == local


@settings(deadline=None, max_examples=300)
@given(
    start=st.datetimes(min_value=_EARLIEST, max_value=_LATEST),
    zone_name=st.sampled_from(ZONES),
    weekday=st.integers(0, 6),
    hour=st.integers(0, 23),
    minute=st.sampled_from([0, 15, 30, 45]),
)
def test_consecutive_fires_are_one_per_local_week_at_the_local_time(
    start: dt.datetime, zone_name: str, weekday: int, hour: int, minute: int
) -> None:
    tz = ZoneInfo(zone_name)
    weekly = Weekly(weekday, dt.time(hour, minute))
    after = start.replace(tzinfo=dt.UTC)
    seen = []
    for _ in range(6):
        period, instant = next_fire(after, weekly, tz)
        assert instant > after
        assert period.weekday() == weekday
        local = dt.datetime.combine(period, weekly.at)
        if _local_exists(local, tz):
            # The first occurrence of the local time (an autumn fold has two).
            assert instant.astimezone(tz).replace(tzinfo=None) == local
            assert instant.astimezone(tz).fold == 0
        seen.append(period)
        after = instant
    # No week skipped, none repeated.
    assert [(b - a).days for a, b in itertools.pairwise(seen)] == [7] * 5


def test_parse_and_print() -> None:
    assert Weekly.parse("Monday 08:00") == Weekly(0, dt.time(8, 0))
    assert str(Weekly.parse("fri 16:30")) == "fri 16:30"
    for bad in ("mon", "someday 08:00", "mon 25:00", "mon 8h"):
        with pytest.raises(ValueError, match="expected"):
            Weekly.parse(bad)


def test_an_unknown_time_zone_falls_back_to_utc() -> None:
    assert zone("Mars/Olympus") == ZoneInfo("UTC")
    assert zone("") == ZoneInfo("UTC")
