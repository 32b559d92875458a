"""Every precedence rule, table-driven, through the real gRPC API on real PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from belfry.api.directory.v1 import directory_pb2
from belfry.api.preferences.v1 import preferences_pb2

from tests.preferences.conftest import Prefs
from tests.preferences.preferences_helpers import choice, decisions, set_masters_off

T = "contacts.contact_assigned"


@dataclass(frozen=True)
class Case:
    """One row: the layers set up, then the expected (enabled, reason) on one channel."""

    name: str
    topic: str = T
    channel: str = "email"
    own: bool | None = None
    profile: bool | None = None
    profile_set: str = "sales"  # the user's permission set is "sales"
    default: bool | None = None
    masters_off: frozenset[str] = frozenset()
    user: dict[str, object] = field(default_factory=dict)
    later: dict[str, object] | None = None  # directory change after the choices were made
    downgrade: bool = False  # the account leaves enterprise after the admin set things
    expected: tuple[bool, str] = (True, "product_default")


CASES = [
    Case("product default on"),
    Case("product default off", channel="other_apps", expected=(False, "product_default")),
    Case("account default beats product", default=False, expected=(False, "account_default")),
    Case("account default may switch on", channel="other_apps", default=True, expected=(True, "account_default")),
    Case("role profile beats account default", default=False, profile=True, expected=(True, "role_profile")),
    Case(
        "another set's profile does not apply",
        default=False,
        profile=True,
        profile_set="support",
        expected=(False, "account_default"),
    ),
    Case("user beats profile and default", own=False, profile=True, default=True, expected=(False, "user")),
    Case("user may switch on what defaults switched off", own=True, default=False, expected=(True, "user")),
    Case("admins choose mobile topics", channel="mobile", default=False, expected=(False, "account_default")),
    Case(
        "master switch off beats own choice", own=True, masters_off=frozenset({"email"}), expected=(False, "master_off")
    ),
    Case(
        "master switch off only on its channel",
        masters_off=frozenset({"email"}),
        channel="bell",
        expected=(True, "product_default"),
    ),
    Case(
        "locked beats master switch",
        topic="account.billing",
        masters_off=frozenset({"email"}),
        expected=(True, "locked"),
    ),
    Case("locked topic on the bell", topic="account.support", channel="bell", expected=(True, "locked")),
    Case("payments hidden from users", topic="payments.payment_failed", expected=(False, "not_visible")),
    Case(
        "a kept choice is off once the topic is hidden",
        topic="payments.payment_failed",
        own=True,
        user={"super_admin": True},
        later={"super_admin": False},
        expected=(False, "not_visible"),
    ),
    Case(
        "payments reach super admins",
        topic="payments.payment_failed",
        user={"super_admin": True},
        expected=(True, "product_default"),
    ),
    Case("forms need the forms tool", topic="forms.submission", expected=(False, "not_visible")),
    Case(
        "forms with the forms tool",
        topic="forms.submission",
        user={"tool_access": ["forms"]},
        expected=(True, "product_default"),
    ),
    Case(
        "website visits are email only",
        topic="website_visits.contact_visited",
        channel="bell",
        expected=(False, "channel_not_allowed"),
    ),
    Case("digests are opt-in", topic="tasks.weekly_digest", expected=(False, "product_default")),
    Case("digest opted in", topic="tasks.weekly_digest", own=True, expected=(True, "user")),
    Case(
        "defaults stop below enterprise",
        default=False,
        profile=False,
        downgrade=True,
        expected=(True, "product_default"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_precedence(svc: Prefs, account_id: str, case: Case) -> None:
    await svc.account(account_id)
    await svc.user(account_id, "boss", super_admin=True, permission_set="admin")
    await svc.user(account_id, "ana", **case.user)
    boss = svc.auth(account_id, "boss")
    if case.default is not None:
        await svc.prefs.SetAccountDefaults(
            preferences_pb2.SetAccountDefaultsRequest(choices=[choice(case.topic, case.channel, case.default)]),
            metadata=boss,
        )
    if case.profile is not None:
        profile = preferences_pb2.RoleProfile(
            permission_set=case.profile_set, choices=[choice(case.topic, case.channel, case.profile)]
        )
        await svc.prefs.CreateRoleProfile(preferences_pb2.CreateRoleProfileRequest(profile=profile), metadata=boss)
    if case.own is not None:
        await svc.prefs.SetPreference(
            preferences_pb2.SetPreferenceRequest(choice=choice(case.topic, case.channel, case.own)),
            metadata=svc.auth(account_id, "ana"),
        )
    if case.masters_off:
        await set_masters_off(svc, account_id, "ana", set(case.masters_off))
    if case.later is not None:
        await svc.user(account_id, "ana", **{**case.user, **case.later})
    if case.downgrade:
        await svc.account(account_id, directory_pb2.TIER_PROFESSIONAL)
    got = await decisions(svc, account_id, case.topic, "ana")
    assert got[case.channel] == case.expected
    # The user's own view agrees with the dispatcher's.
    own_view = await svc.prefs.Effective(
        preferences_pb2.EffectiveRequest(topic=case.topic), metadata=svc.auth(account_id, "ana")
    )
    assert [(c.enabled, c.reason) for c in own_view.decision.channels] == list(got.values())
