"""Property test: the service agrees with a separately written model of the precedence rules.

The model below restates the specification from scratch (its own topic facts,
its own order of rules) and never calls the production code; the service is
driven only through its public gRPC API on real PostgreSQL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import cast

from belfry.api.directory.v1 import directory_pb2
from belfry.api.preferences.v1 import preferences_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.preferences.conftest import Prefs
from tests.preferences.preferences_helpers import CHANNELS, choice, decisions, set_masters_off

ALL = frozenset(CHANNELS)
USUAL = frozenset({"email", "bell", "popup", "browser", "mobile"})


@dataclass(frozen=True)
class Facts:
    """What the specification says about one topic."""

    allowed: frozenset[str]
    defaults: frozenset[str]
    locked: bool = False
    needs: str = ""  # "super_admin", "forms" or "" (everyone)


FACTS = {
    "contacts.contact_assigned": Facts(ALL, USUAL),
    "account.billing": Facts(frozenset({"email", "bell"}), frozenset({"email", "bell"}), locked=True),
    "payments.payment_failed": Facts(ALL, USUAL, needs="super_admin"),
    "forms.submission": Facts(ALL, USUAL, needs="forms"),
    "website_visits.contact_visited": Facts(frozenset({"email"}), frozenset({"email"})),
    "tasks.weekly_digest": Facts(frozenset({"email"}), frozenset()),
    "email.opened": Facts(ALL, frozenset({"bell", "popup", "browser", "mobile"})),
}

Layer = dict[str, bool]


def model(
    facts: Facts,
    *,
    enterprise: bool,
    super_admin: bool,
    forms: bool,
    masters_off: frozenset[str],
    own: Layer,
    profile: Layer,
    default: Layer,
) -> dict[str, tuple[bool, str]]:
    """The rules as the specification states them, channel by channel."""
    can_see = {"": True, "super_admin": super_admin, "forms": forms}[facts.needs]
    answer: dict[str, tuple[bool, str]] = {}
    for channel in CHANNELS:
        if channel not in facts.allowed:
            answer[channel] = (False, "channel_not_allowed")
            continue
        if not can_see:
            answer[channel] = (False, "not_visible")
            continue
        if facts.locked:
            answer[channel] = (True, "locked")
            continue
        if channel in masters_off:
            answer[channel] = (False, "master_off")
            continue
        # User choice > role profile > account default (enterprise only) > product default.
        candidates = [("user", own)]
        if enterprise:
            candidates += [("role_profile", profile), ("account_default", default)]
        answer[channel] = next(
            ((layer[channel], name) for name, layer in candidates if channel in layer),
            (channel in facts.defaults, "product_default"),
        )
    return answer


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    """A topic, the user's directory facts and every layer of choices."""
    topic = draw(st.sampled_from(sorted(FACTS)))
    facts = FACTS[topic]
    allowed = sorted(facts.allowed)

    def layer(values: st.SearchStrategy[bool]) -> st.SearchStrategy[Layer]:
        return st.dictionaries(st.sampled_from(allowed), values, max_size=len(allowed))

    # Locked topics refuse "off" from users and any admin choice.
    own_values = st.just(True) if facts.locked else st.booleans()
    admin = st.just({}) if facts.locked else layer(st.booleans())
    return {
        "topic": topic,
        "enterprise": draw(st.booleans()),
        "super_admin": draw(st.booleans()),
        "forms": draw(st.booleans()),
        "masters_off": frozenset(draw(st.sets(st.sampled_from(CHANNELS)))),
        "own": draw(layer(own_values)),
        "profile": draw(admin),
        "default": draw(admin),
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=scenarios())
async def test_service_matches_the_model(prefs_service: Prefs, s: dict[str, object]) -> None:
    svc = prefs_service
    account_id = f"acc_{uuid.uuid4().hex[:12]}"
    topic = str(s["topic"])
    own, profile, default = (cast(Layer, s[k]) for k in ("own", "profile", "default"))
    masters_off = cast(frozenset[str], s["masters_off"])
    # Everything is set while the account is enterprise and the user sees every topic...
    await svc.account(account_id)
    await svc.user(account_id, "boss", super_admin=True, permission_set="admin")
    await svc.user(account_id, "ana", super_admin=True, tool_access=["forms"])
    boss, ana = svc.auth(account_id, "boss"), svc.auth(account_id, "ana")
    for channel, enabled in own.items():
        await svc.prefs.SetPreference(
            preferences_pb2.SetPreferenceRequest(choice=choice(topic, channel, enabled)), metadata=ana
        )
    if default:
        await svc.prefs.SetAccountDefaults(
            preferences_pb2.SetAccountDefaultsRequest(choices=[choice(topic, c, e) for c, e in default.items()]),
            metadata=boss,
        )
    if profile:
        await svc.prefs.CreateRoleProfile(
            preferences_pb2.CreateRoleProfileRequest(
                profile=preferences_pb2.RoleProfile(
                    permission_set="sales", choices=[choice(topic, c, e) for c, e in profile.items()]
                )
            ),
            metadata=boss,
        )
    if masters_off:
        await set_masters_off(svc, account_id, "ana", set(masters_off))
    # ...then the directory moves to the drawn facts.
    tool_access = ["forms"] if s["forms"] else []
    await svc.user(account_id, "ana", super_admin=bool(s["super_admin"]), tool_access=tool_access)
    if not s["enterprise"]:
        await svc.account(account_id, directory_pb2.TIER_PROFESSIONAL)
    expected = model(
        FACTS[topic],
        enterprise=bool(s["enterprise"]),
        super_admin=bool(s["super_admin"]),
        forms=bool(s["forms"]),
        masters_off=masters_off,
        own=own,
        profile=profile,
        default=default,
    )
    assert await decisions(svc, account_id, topic, "ana") == expected
