"""Authorisation denials, concurrency and bad input, through the real gRPC API with real tokens."""

from __future__ import annotations

import time

import grpc
import jwt
import pytest
from belfry.api.directory.v1 import directory_pb2
from belfry.api.preferences.v1 import preferences_pb2
from belfry.auth import TokenIssuer

from tests.preferences.conftest import Prefs
from tests.preferences.preferences_helpers import ch, choice, decisions

T = "deals.deal_assigned"


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call succeeded")


async def _setup(
    svc: Prefs, account_id: str, tier: directory_pb2.Tier.ValueType = directory_pb2.TIER_ENTERPRISE
) -> None:
    await svc.account(account_id, tier)
    await svc.user(account_id, "boss", super_admin=True)
    await svc.user(account_id, "ana")
    await svc.user(account_id, "old", active=False)


async def _audit_count(svc: Prefs, account_id: str) -> int:
    log = await svc.prefs.ListAuditLog(
        preferences_pb2.ListAuditLogRequest(account=True), metadata=svc.auth(account_id, "boss")
    )
    return len(log.entries)


async def test_tokens_are_required_and_checked(svc: Prefs, account_id: str, token_keys: dict[str, bytes]) -> None:
    await _setup(svc, account_id)
    request = preferences_pb2.GetPreferencesRequest()
    code, text = await _code(svc.prefs.GetPreferences(request))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "token" in text
    forged = jwt.encode(
        {
            "iss": "belfry",
            "aud": "belfry",
            "acc": account_id,
            "sub": "boss",
            "iat": int(time.time()),
            "exp": int(time.time()) + 60,
        },
        b"x" * 48,
        algorithm="HS256",
        headers={"kid": "k1"},
    )
    code, _ = await _code(svc.prefs.GetPreferences(request, metadata=(("authorization", f"Bearer {forged}"),)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    expired = TokenIssuer(token_keys, "k1", ttl_seconds=60).issue(account_id, "ana", now=time.time() - 3600)
    code, text = await _code(svc.prefs.GetPreferences(request, metadata=(("authorization", f"Bearer {expired}"),)))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "expired" in text


@pytest.mark.parametrize("user", ["old", "nobody"])
async def test_inactive_or_unknown_users_are_refused(svc: Prefs, account_id: str, user: str) -> None:
    await _setup(svc, account_id)
    code, _ = await _code(
        svc.prefs.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=svc.auth(account_id, user))
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_admin_rpcs_need_a_super_admin_of_an_enterprise_account(svc: Prefs, account_id: str) -> None:
    await _setup(svc, account_id)
    set_defaults = preferences_pb2.SetAccountDefaultsRequest(choices=[choice(T, "email", False)])
    profile = preferences_pb2.CreateRoleProfileRequest(profile=preferences_pb2.RoleProfile(permission_set="sales"))
    ana = svc.auth(account_id, "ana")
    for call in (
        svc.prefs.SetAccountDefaults(set_defaults, metadata=ana),
        svc.prefs.GetAccountDefaults(preferences_pb2.GetAccountDefaultsRequest(), metadata=ana),
        svc.prefs.CreateRoleProfile(profile, metadata=ana),
        svc.prefs.ListRoleProfiles(preferences_pb2.ListRoleProfilesRequest(), metadata=ana),
        svc.prefs.DeleteRoleProfile(preferences_pb2.DeleteRoleProfileRequest(permission_set="sales"), metadata=ana),
        svc.prefs.ListAuditLog(preferences_pb2.ListAuditLogRequest(account=True), metadata=ana),
        svc.prefs.ListAuditLog(preferences_pb2.ListAuditLogRequest(user_id="boss"), metadata=ana),
    ):
        code, _ = await _code(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED
    small = account_id + "s"
    await _setup(svc, small, directory_pb2.TIER_PROFESSIONAL)
    code, text = await _code(svc.prefs.SetAccountDefaults(set_defaults, metadata=svc.auth(small, "boss")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "enterprise" in text
    assert (await decisions(svc, account_id, T, "ana"))["email"] == (True, "product_default")


async def test_nothing_crosses_accounts(svc: Prefs, account_id: str) -> None:
    other = account_id + "o"
    await _setup(svc, account_id)
    await _setup(svc, other)
    # A super admin's defaults change their own account only.
    await svc.prefs.SetAccountDefaults(
        preferences_pb2.SetAccountDefaultsRequest(choices=[choice(T, "email", False)]),
        metadata=svc.auth(account_id, "boss"),
    )
    assert (await decisions(svc, account_id, T, "ana"))["email"] == (False, "account_default")
    assert (await decisions(svc, other, T, "ana"))["email"] == (True, "product_default")
    # A user's choice changes their own preferences only.
    await svc.prefs.SetPreference(
        preferences_pb2.SetPreferenceRequest(choice=choice(T, "bell", False)), metadata=svc.auth(other, "ana")
    )
    assert (await decisions(svc, account_id, T, "ana"))["bell"] == (True, "product_default")
    # A token for an account the user does not belong to gets nothing.
    await svc.user(other, "solo")
    code, _ = await _code(
        svc.prefs.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=svc.auth(account_id, "solo"))
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # The audit log of one account shows none of the other's entries.
    log = await svc.prefs.ListAuditLog(
        preferences_pb2.ListAuditLogRequest(account=True), metadata=svc.auth(other, "boss")
    )
    assert {e.user_id for e in log.entries} == {"ana"}


async def test_two_tabs_never_overwrite_each_other(svc: Prefs, account_id: str) -> None:
    await _setup(svc, account_id)
    ana = svc.auth(account_id, "ana")
    await svc.prefs.SetPreference(preferences_pb2.SetPreferenceRequest(choice=choice(T, "mobile", False)), metadata=ana)
    # Two tabs read the same version...
    read = await svc.prefs.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=ana)
    assert read.version == 1
    first = await svc.prefs.SetPreference(
        preferences_pb2.SetPreferenceRequest(choice=choice(T, "email", False), expected_version=read.version),
        metadata=ana,
    )
    assert first.version == 2
    # ...the second tab's write is refused with the current version, and writes nothing.
    stale = preferences_pb2.SetPreferenceRequest(choice=choice(T, "bell", False), expected_version=read.version)
    code, text = await _code(svc.prefs.SetPreference(stale, metadata=ana))
    assert code == grpc.StatusCode.ABORTED and "version 2" in text
    after = await svc.prefs.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=ana)
    assert after.version == 2
    assert sorted((c.topic, c.channel, c.enabled) for c in after.choices) == [
        (T, ch("email"), False),
        (T, ch("mobile"), False),
    ]
    retried = await svc.prefs.SetPreference(
        preferences_pb2.SetPreferenceRequest(choice=choice(T, "bell", False), expected_version=after.version),
        metadata=ana,
    )
    assert retried.version == 3


@pytest.mark.parametrize(
    ("make", "code", "text"),
    [
        (
            lambda: preferences_pb2.SetPreferenceRequest(choice=choice("nope.topic", "email", False)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown topic",
        ),
        (
            lambda: preferences_pb2.SetPreferenceRequest(choice=preferences_pb2.Choice(topic=T, enabled=False)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "channel",
        ),
        (
            lambda: preferences_pb2.SetPreferenceRequest(choice=choice("website_visits.contact_visited", "bell", True)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "email",
        ),
        (
            lambda: preferences_pb2.SetPreferenceRequest(choice=choice("account.billing", "email", False)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "locked",
        ),
        (preferences_pb2.SetPreferenceRequest, grpc.StatusCode.INVALID_ARGUMENT, "choice"),
        (
            lambda: preferences_pb2.SetTopicSoundRequest(topic=T, sound="klaxon"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown sound",
        ),
        (
            lambda: preferences_pb2.UpdateSettingsRequest(
                settings=preferences_pb2.ChannelSettings(default_sound="klaxon")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sound",
        ),
        (
            lambda: preferences_pb2.UpdateSettingsRequest(
                settings=preferences_pb2.ChannelSettings(
                    quiet_hours=preferences_pb2.QuietHours(enabled=True, days=[8], start="22:00", end="07:00")
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "weekdays",
        ),
        (
            lambda: preferences_pb2.UpdateSettingsRequest(
                settings=preferences_pb2.ChannelSettings(
                    quiet_hours=preferences_pb2.QuietHours(enabled=True, days=[1], start="25:00", end="07:00")
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "HH:MM",
        ),
        (preferences_pb2.ClearChannelRequest, grpc.StatusCode.INVALID_ARGUMENT, "channels"),
        (
            lambda: preferences_pb2.DontShowAgainRequest(topic=T, channel=99),  # type: ignore[arg-type]  # an unknown enum value on purpose
            grpc.StatusCode.INVALID_ARGUMENT,
            "channel",
        ),
    ],
)
async def test_bad_input_writes_nothing(
    svc: Prefs, account_id: str, make: object, code: grpc.StatusCode, text: str
) -> None:
    await _setup(svc, account_id)
    ana = svc.auth(account_id, "ana")
    request = make()  # type: ignore[operator]
    method = {
        preferences_pb2.SetPreferenceRequest: svc.prefs.SetPreference,
        preferences_pb2.SetTopicSoundRequest: svc.prefs.SetTopicSound,
        preferences_pb2.UpdateSettingsRequest: svc.prefs.UpdateSettings,
        preferences_pb2.ClearChannelRequest: svc.prefs.ClearChannel,
        preferences_pb2.DontShowAgainRequest: svc.prefs.DontShowAgain,
    }[type(request)]
    got, details = await _code(method(request, metadata=ana))
    assert got == code and text in details
    after = await svc.prefs.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=ana)
    assert after.version == 0 and not after.choices
    assert await _audit_count(svc, account_id) == 0


async def test_bad_admin_input_writes_nothing(svc: Prefs, account_id: str) -> None:
    await _setup(svc, account_id)
    boss = svc.auth(account_id, "boss")
    for choices, code in [
        ([choice("account.support", "email", False)], grpc.StatusCode.FAILED_PRECONDITION),
        ([choice("nope.topic", "email", False)], grpc.StatusCode.INVALID_ARGUMENT),
        ([choice(T, "email", False), choice(T, "email", True)], grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        got, _ = await _code(
            svc.prefs.SetAccountDefaults(preferences_pb2.SetAccountDefaultsRequest(choices=choices), metadata=boss)
        )
        assert got == code
    got, _ = await _code(
        svc.prefs.UpdateRoleProfile(
            preferences_pb2.UpdateRoleProfileRequest(profile=preferences_pb2.RoleProfile(permission_set="ghost")),
            metadata=boss,
        )
    )
    assert got == grpc.StatusCode.NOT_FOUND
    defaults = await svc.prefs.GetAccountDefaults(preferences_pb2.GetAccountDefaultsRequest(), metadata=boss)
    assert not defaults.choices
    assert await _audit_count(svc, account_id) == 0
