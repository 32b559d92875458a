"""Routing one recipient's preferences to queue deliveries (pure)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

from belfry.handoff import Assignment, from_payload
from belfry.message import Item, Message
from belfry.preferences import ChannelChoice, Recipient, Topic

from services.dispatcher import routing
from services.dispatcher.model import Event

NOW = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)
ALL = ("email", "bell", "popup", "browser", "other_apps", "mobile")
NID = uuid.uuid4()


def topic(**kw: object) -> Topic:
    base: dict[str, object] = {
        "key": "deals.stage_changed",
        "locked": False,
        "ttl_seconds": 3600,
        "category": "deals",
        "batching": "",
        "allowed_channels": ALL,
    }
    base.update(kw)
    return Topic(**base)  # type: ignore[arg-type]


def person(on: tuple[str, ...], *, quiet_until: dt.datetime | None = None) -> Recipient:
    return Recipient(
        user_id="u",
        known=True,
        channels=tuple(
            ChannelChoice(c, c in on, "" if c in on else "preference_off", "ping" if c == "popup" else "") for c in ALL
        ),
        in_quiet_hours=quiet_until is not None,
        quiet_until=quiet_until,
    )


EVENT = Event(account_id="a", topic="deals.stage_changed", occurred_at=NOW, idempotency_key="k", body_hash=b"")
MESSAGE = Message(str(NID), "a", "u", "deals.stage_changed", "t", "b", "", NOW.isoformat())


def by_channel(r: routing.Routed) -> dict[str, Message]:
    return {d.channel: Message.from_json(d.body) for d in r.deliveries}


def test_desktop_channels_share_one_bell_delivery_plus_browser_push() -> None:
    r = routing.route(NID, EVENT, topic(), person(("bell", "popup", "browser", "email")), MESSAGE)
    out = by_channel(r)
    assert set(out) == {"bell", "browser", "email"}
    assert out["bell"].bell and out["bell"].popup and out["bell"].browser and out["bell"].sound == "ping"
    assert all(d.expires_at == NOW + dt.timedelta(hours=1) for d in r.deliveries)
    assert {c["c"]: c["s"] for c in r.channels}["mobile"] == routing.SUPPRESSED


def test_quiet_hours_hold_all_but_a_silent_bell() -> None:
    until = NOW + dt.timedelta(hours=3)
    r = routing.route(NID, EVENT, topic(), person(("bell", "popup", "browser", "email", "mobile")), MESSAGE)
    quiet = routing.route(
        NID, EVENT, topic(), person(("bell", "popup", "browser", "email", "mobile"), quiet_until=until), MESSAGE
    )
    assert all(d.available_at is None for d in r.deliveries)
    held = {d.channel: d.available_at for d in quiet.deliveries}
    assert held == {"bell": None, "browser": until, "email": until, "mobile": until}
    bell = by_channel(quiet)["bell"]
    assert bell.bell and not bell.popup and not bell.browser and bell.sound == ""
    states = {c["c"]: (c["s"], c["r"]) for c in quiet.channels}
    assert states["email"] == (routing.HELD, routing.QUIET_HOURS)
    assert states["popup"] == (routing.SUPPRESSED, routing.QUIET_HOURS)
    assert quiet.held_until == until


def test_locked_topics_bypass_quiet_hours() -> None:
    r = routing.route(
        NID, EVENT, topic(locked=True), person(("email",), quiet_until=NOW + dt.timedelta(hours=1)), MESSAGE
    )
    assert [d.available_at for d in r.deliveries] == [None]


def test_assignment_topics_go_to_batching_with_the_enabled_channels() -> None:
    r = routing.route(NID, EVENT, topic(batching="assignment"), person(("bell", "email")), MESSAGE)
    assert [d.channel for d in r.deliveries] == ["batching"]
    item = from_payload(r.deliveries[0].payload)
    assert isinstance(item, Assignment)
    assert item.channels == ("bell", "email")
    assert {c["c"]: c["s"] for c in r.channels}["email"] == routing.BATCHED


def test_email_only_and_disallowed_channels() -> None:
    r = routing.route(NID, EVENT, topic(allowed_channels=("email", "bell")), person(ALL), MESSAGE, email_only=True)
    assert [d.channel for d in r.deliveries] == ["email"]
    reasons = {c["c"]: c["r"] for c in r.channels}
    assert reasons["bell"] == routing.EMAIL_ONLY and reasons["mobile"] == routing.NOT_ALLOWED


def test_fast_payload_is_what_asdict_gives() -> None:
    rich = Message(
        str(NID),
        "a",
        "u",
        "deals.stage_changed",
        "Titre",
        "Corps <b>",
        "https://x",
        NOW.isoformat(),
        actor_user_id="v",
        recipient_email="u@example.test",
        popup=True,
        sound="ping",
        items=(Item("deal", "D-1", "Deal", "https://x/1"),),
        variables={"stage": "won", "nested": {"n": [1, 2]}},
    )
    assert rich.to_json() == dataclasses.asdict(rich)
    assert Message.from_json(rich.to_json()) == rich
