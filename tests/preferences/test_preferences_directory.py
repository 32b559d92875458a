"""The directory API and EffectiveBatch as the dispatcher uses them, over real gRPC."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest
from belfry.api.common.v1 import common_pb2
from belfry.api.directory.v1 import directory_pb2
from belfry.api.preferences.v1 import preferences_pb2

from tests.preferences.conftest import Prefs


async def test_directory_round_trip(svc: Prefs, account_id: str) -> None:
    await svc.account(account_id)
    got = await svc.directory.GetAccount(directory_pb2.GetAccountRequest(account_id=account_id))
    assert got.account.tier == directory_pb2.TIER_ENTERPRISE
    await svc.user(account_id, "ana", tool_access=["forms", "forms"], super_admin=True)
    await svc.user(account_id, "ben", locale="fr", time_zone="America/New_York")
    users = await svc.directory.GetUsers(
        directory_pb2.GetUsersRequest(account_id=account_id, user_ids=["ben", "zed", "ana"])
    )
    assert [u.user_id for u in users.users] == ["ben", "ana"]
    assert list(users.missing_user_ids) == ["zed"]
    assert users.users[0].locale == "fr" and users.users[0].time_zone == "America/New_York"
    assert list(users.users[1].tool_access) == ["forms"] and users.users[1].super_admin
    team = directory_pb2.Team(
        account_id=account_id,
        team_id="t1",
        name="Support",
        members=[directory_pb2.TeamMember(user_id="ana", primary=True), directory_pb2.TeamMember(user_id="ben")],
    )
    await svc.directory.UpsertTeam(directory_pb2.UpsertTeamRequest(team=team))
    got_team = await svc.directory.GetTeam(directory_pb2.GetTeamRequest(account_id=account_id, team_id="t1"))
    assert [(m.user_id, m.primary) for m in got_team.team.members] == [("ana", True), ("ben", False)]
    # Another account sees none of it.
    other = account_id + "x"
    await svc.account(other)
    none = await svc.directory.GetUsers(directory_pb2.GetUsersRequest(account_id=other, user_ids=["ana"]))
    assert list(none.missing_user_ids) == ["ana"]


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (
            directory_pb2.UpsertUserRequest(user=directory_pb2.User(account_id="nope", user_id="u", email="u@x.test")),
            grpc.StatusCode.NOT_FOUND,
            "UpsertAccount",
        ),
        (
            directory_pb2.UpsertAccountRequest(account=directory_pb2.Account(account_id="a1")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tier",
        ),
        (directory_pb2.GetTeamRequest(account_id="a1", team_id="t"), grpc.StatusCode.NOT_FOUND, "does not exist"),
    ],
)
async def test_directory_refusals(svc: Prefs, request_: object, code: grpc.StatusCode, text: str) -> None:
    method = {
        directory_pb2.UpsertUserRequest: svc.directory.UpsertUser,
        directory_pb2.UpsertAccountRequest: svc.directory.UpsertAccount,
        directory_pb2.GetTeamRequest: svc.directory.GetTeam,
    }[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(request_)
    assert err.value.code() == code and text in (err.value.details() or "")


async def test_bad_user_fields_write_nothing(svc: Prefs, account_id: str) -> None:
    await svc.account(account_id)
    for fields, text in [({"time_zone": "Mars/Olympus"}, "time zone"), ({"email": "not-an-email"}, "email")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await svc.user(account_id, "ana", **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in (err.value.details() or "")
    users = await svc.directory.GetUsers(directory_pb2.GetUsersRequest(account_id=account_id, user_ids=["ana"]))
    assert list(users.missing_user_ids) == ["ana"]


async def test_a_nul_character_is_invalid_argument_naming_the_field(svc: Prefs, account_id: str) -> None:
    # PostgreSQL text cannot hold U+0000: refused before any query, never INTERNAL.
    async def refusal(call: Awaitable[object]) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "NUL character" in (err.value.details() or "")
        return err.value.details() or ""

    d = svc.directory
    account = directory_pb2.Account(account_id=account_id, name="Ac\x00me", tier=directory_pb2.TIER_ENTERPRISE)
    assert "account.name" in await refusal(d.UpsertAccount(directory_pb2.UpsertAccountRequest(account=account)))
    await svc.account(account_id)
    assert "user.display_name" in await refusal(svc.user(account_id, "ana", display_name="An\x00a"))
    assert "user.user_id" in await refusal(svc.user(account_id, "an\x00a"))
    assert "user.tool_access[1]" in await refusal(svc.user(account_id, "ana", tool_access=["forms", "x\x00"]))
    await svc.user(account_id, "ben")
    team = directory_pb2.Team(
        account_id=account_id, team_id="t1", name="Sup\x00port", members=[directory_pb2.TeamMember(user_id="ben")]
    )
    assert "team.name" in await refusal(d.UpsertTeam(directory_pb2.UpsertTeamRequest(team=team)))
    found = d.GetUsers(directory_pb2.GetUsersRequest(account_id=account_id, user_ids=["ben", "a\x00"]))
    assert "user_ids[1]" in await refusal(found)
    topic = "contacts.contact_assigned"
    batch = preferences_pb2.EffectiveBatchRequest(account_id=account_id, topic=topic, user_ids=["ben", "a\x00"])
    assert "user_ids[1]" in await refusal(svc.prefs.EffectiveBatch(batch))
    users = await d.GetUsers(directory_pb2.GetUsersRequest(account_id=account_id, user_ids=["ana", "ben"]))
    assert [u.user_id for u in users.users] == ["ben"]
    assert [u.display_name for u in users.users] == ["Ben"]


async def test_effective_batch_fills_every_field(svc: Prefs, account_id: str) -> None:
    await svc.account(account_id)
    await svc.user(account_id, "ana", display_name="Ana Lima", locale="fr")
    await svc.user(account_id, "gone", active=False)
    answer = await svc.prefs.EffectiveBatch(
        preferences_pb2.EffectiveBatchRequest(
            account_id=account_id, topic="contacts.contact_assigned", user_ids=["ana", "gone", "zed"]
        )
    )
    assert answer.topic.key == "contacts.contact_assigned" and answer.topic.batching == "assignment"
    assert answer.topic.category == "contacts" and not answer.topic.locked and answer.topic.ttl_seconds > 0
    assert dict(answer.topic.labels) == {"en": "Contact assigned to you", "fr": "Contact qui vous est attribué"}
    assert len(answer.topic.allowed_channels) == 6
    ana, gone, zed = answer.recipients
    assert (ana.user_id, ana.known, ana.email, ana.display_name, ana.locale, ana.time_zone) == (
        "ana",
        True,
        "ana@example.test",
        "Ana Lima",
        "fr",
        "Europe/Paris",
    )
    by_channel = {c.channel: c for c in ana.channels}
    assert (
        by_channel[common_pb2.CHANNEL_EMAIL].enabled
        and by_channel[common_pb2.CHANNEL_EMAIL].reason == "product_default"
    )
    assert by_channel[common_pb2.CHANNEL_POPUP].sound == "chime"
    assert not by_channel[common_pb2.CHANNEL_OTHER_APPS].enabled
    assert not ana.in_quiet_hours
    assert (gone.user_id, gone.known, zed.user_id, zed.known) == ("gone", False, "zed", False)
    assert not any(c.enabled for c in zed.channels)


async def test_effective_batch_refusals(svc: Prefs, account_id: str) -> None:
    await svc.account(account_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.prefs.EffectiveBatch(
            preferences_pb2.EffectiveBatchRequest(account_id=account_id, topic="nope.nothing", user_ids=["a"])
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope.nothing" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.prefs.EffectiveBatch(
            preferences_pb2.EffectiveBatchRequest(
                account_id=account_id, topic="deals.deal_assigned", user_ids=[f"u{i}" for i in range(1001)]
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1000" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.directory.GetUsers(
            directory_pb2.GetUsersRequest(account_id=account_id, user_ids=[f"u{i}" for i in range(1001)])
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 1000" in (err.value.details() or "")
