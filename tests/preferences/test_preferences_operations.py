"""User and admin operations end to end: tabs, sounds, quiet hours, notices, audit, ListTopics."""

from __future__ import annotations

import datetime as dt
import json

import asyncpg
from belfry.api.common.v1 import common_pb2
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.preferences.v1 import preferences_pb2
from google.protobuf import json_format

from tests.preferences.conftest import Prefs
from tests.preferences.preferences_helpers import ch, choice, decisions

T = "tickets.ticket_assigned"


async def _setup(svc: Prefs, account_id: str) -> None:
    await svc.account(account_id)
    await svc.user(account_id, "boss", super_admin=True, permission_set="admin")
    await svc.user(account_id, "ana", locale="fr")
    await svc.user(account_id, "ben")


async def test_clear_channel_and_dont_show_again(svc: Prefs, account_id: str) -> None:
    await _setup(svc, account_id)
    ana = svc.auth(account_id, "ana")
    await svc.prefs.ClearChannel(
        preferences_pb2.ClearChannelRequest(channels=[ch("bell"), ch("popup"), ch("browser")]), metadata=ana
    )
    got = await decisions(svc, account_id, T, "ana")
    assert (
        got["bell"] == (False, "user") and got["popup"] == (False, "user") and got["email"] == (True, "product_default")
    )
    assert (await decisions(svc, account_id, "account.support", "ana"))["bell"] == (True, "locked")
    await svc.prefs.DontShowAgain(preferences_pb2.DontShowAgainRequest(topic=T, channel=ch("email")), metadata=ana)
    assert (await decisions(svc, account_id, T, "ana"))["email"] == (False, "user")
    assert (await decisions(svc, account_id, T, "ben"))["email"] == (True, "product_default")
    await svc.prefs.ResetToDefaults(preferences_pb2.ResetToDefaultsRequest(), metadata=ana)
    assert (await decisions(svc, account_id, T, "ana"))["bell"] == (True, "product_default")


async def _popup(svc: Prefs, account_id: str, user: str, topic: str = T) -> preferences_pb2.RecipientDecision:
    answer = await svc.prefs.EffectiveBatch(
        preferences_pb2.EffectiveBatchRequest(account_id=account_id, topic=topic, user_ids=[user])
    )
    recipient: preferences_pb2.RecipientDecision = answer.recipients[0]
    return recipient


def _sound(r: preferences_pb2.RecipientDecision) -> str:
    return next(c.sound for c in r.channels if c.channel == ch("popup"))


async def test_sounds_and_mute(svc: Prefs, account_id: str) -> None:
    await _setup(svc, account_id)
    ana = svc.auth(account_id, "ana")
    assert _sound(await _popup(svc, account_id, "ana")) == "chime"
    current = await svc.prefs.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=ana)
    settings = preferences_pb2.ChannelSettings()
    settings.CopyFrom(current.settings)
    settings.default_sound = "harp"
    await svc.prefs.UpdateSettings(preferences_pb2.UpdateSettingsRequest(settings=settings), metadata=ana)
    assert _sound(await _popup(svc, account_id, "ana")) == "harp"
    await svc.prefs.SetTopicSound(preferences_pb2.SetTopicSoundRequest(topic=T, sound="marimba"), metadata=ana)
    assert _sound(await _popup(svc, account_id, "ana")) == "marimba"
    assert _sound(await _popup(svc, account_id, "ana", "deals.deal_assigned")) == "harp"
    await svc.prefs.SetMuted(preferences_pb2.SetMutedRequest(muted=True), metadata=ana)
    muted = await _popup(svc, account_id, "ana")
    assert _sound(muted) == "" and next(c.enabled for c in muted.channels if c.channel == ch("popup"))
    after = await svc.prefs.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=ana)
    assert after.settings.muted and after.settings.default_sound == "harp"
    assert [(s.topic, s.sound) for s in after.topic_sounds] == [(T, "marimba")]


async def test_quiet_hours_in_the_users_time_zone(svc: Prefs, account_id: str) -> None:
    await _setup(svc, account_id)  # everyone in Europe/Paris (UTC+1 in March)
    ana = svc.auth(account_id, "ana")
    quiet = preferences_pb2.QuietHours(enabled=True, days=[2], start="22:00", end="07:00")  # Tuesday night
    current = await svc.prefs.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=ana)
    settings = preferences_pb2.ChannelSettings()
    settings.CopyFrom(current.settings)
    settings.quiet_hours.CopyFrom(quiet)
    await svc.prefs.UpdateSettings(preferences_pb2.UpdateSettingsRequest(settings=settings), metadata=ana)
    svc.clock.now = dt.datetime(2026, 3, 4, 5, 0, tzinfo=dt.UTC)  # Wednesday 06:00 in Paris
    held = await _popup(svc, account_id, "ana")
    assert held.in_quiet_hours and held.quiet_until.ToDatetime(dt.UTC) == dt.datetime(2026, 3, 4, 6, 0, tzinfo=dt.UTC)
    assert _sound(held) == ""
    locked = await _popup(svc, account_id, "ana", "account.billing")
    assert not locked.in_quiet_hours
    assert not (await _popup(svc, account_id, "ben")).in_quiet_hours
    svc.clock.now = dt.datetime(2026, 3, 4, 6, 0, tzinfo=dt.UTC)  # 07:00 in Paris: over
    assert not (await _popup(svc, account_id, "ana")).in_quiet_hours
    svc.clock.now = dt.datetime(2026, 3, 3, 20, 59, tzinfo=dt.UTC)  # Tuesday 21:59 in Paris: not yet
    assert not (await _popup(svc, account_id, "ana")).in_quiet_hours


async def test_default_change_notifies_each_affected_user_once(svc: Prefs, account_id: str, pool: asyncpg.Pool) -> None:
    await _setup(svc, account_id)
    # Ben chose email on himself: the new default does not change his answer.
    await svc.prefs.SetPreference(
        preferences_pb2.SetPreferenceRequest(choice=choice(T, "email", True)), metadata=svc.auth(account_id, "ben")
    )
    boss = svc.auth(account_id, "boss")
    done = await svc.prefs.SetAccountDefaults(
        preferences_pb2.SetAccountDefaultsRequest(choices=[choice(T, "email", False), choice(T, "mobile", False)]),
        metadata=boss,
    )
    # One handoff per affected user, written with the change: an event for the dispatcher to publish.
    rows = await pool.fetch(
        "select user_id, channel, topic, payload from queue.whole_deliveries where account_id = $1 order by user_id",
        account_id,
    )
    assert [(r["user_id"], r["channel"], r["topic"]) for r in rows] == [
        ("ana", "dispatcher", "account.preferences_changed"),
        ("ben", "dispatcher", "account.preferences_changed"),
        ("boss", "dispatcher", "account.preferences_changed"),
    ]
    events = [
        json_format.ParseDict(r["payload"] if isinstance(r["payload"], dict) else json.loads(r["payload"]), pb.Event())
        for r in rows
    ]
    ana, ben, _ = events
    assert (ana.account_id, ana.topic, list(ana.recipient_user_ids)) == (
        account_id,
        "account.preferences_changed",
        ["ana"],
    )
    assert "ticket" in ana.object.display_name.lower() and ana.object.url.endswith("/settings")
    assert ana.idempotency_key and not ana.actor.user_id  # the system tells the admin too
    assert json_format.MessageToDict(ben.variables)["changes"] == {f"{T}/mobile": False}
    # Setting the same defaults again changes nobody's answer: no new email.
    await svc.prefs.SetAccountDefaults(
        preferences_pb2.SetAccountDefaultsRequest(
            choices=[choice(T, "email", False), choice(T, "mobile", False)], expected_version=done.version
        ),
        metadata=boss,
    )
    assert await pool.fetchval("select count(*) from queue.deliveries where account_id = $1", account_id) == 3
    # A profile for "sales" (ana and ben) switching email back on tells ana only (ben's own choice rules).
    await svc.prefs.CreateRoleProfile(
        preferences_pb2.CreateRoleProfileRequest(
            profile=preferences_pb2.RoleProfile(permission_set="sales", choices=[choice(T, "email", True)])
        ),
        metadata=boss,
    )
    users = await pool.fetch(
        "select user_id from queue.deliveries where account_id = $1 order by delivery_id", account_id
    )
    assert [r["user_id"] for r in users][3:] == ["ana"]


async def test_audit_log_per_user_and_account(svc: Prefs, account_id: str) -> None:
    await _setup(svc, account_id)
    ana = svc.auth(account_id, "ana")
    await svc.prefs.SetPreference(preferences_pb2.SetPreferenceRequest(choice=choice(T, "email", False)), metadata=ana)
    await svc.prefs.SetPreference(preferences_pb2.SetPreferenceRequest(choice=choice(T, "email", True)), metadata=ana)
    await svc.prefs.SetAccountDefaults(
        preferences_pb2.SetAccountDefaultsRequest(choices=[choice(T, "bell", False)]),
        metadata=svc.auth(account_id, "boss"),
    )
    own = await svc.prefs.ListAuditLog(preferences_pb2.ListAuditLogRequest(), metadata=ana)
    assert [(e.via, e.what) for e in own.entries] == [
        ("admin_default", "effective"),
        ("user", "choice"),
        ("user", "choice"),
    ]
    latest_own = own.entries[1]
    assert json.loads(latest_own.old_value) == {f"{T}/email": False} and json.loads(latest_own.new_value) == {
        f"{T}/email": True
    }
    assert own.entries[0].actor_user_id == "boss"
    page = await svc.prefs.ListAuditLog(
        preferences_pb2.ListAuditLogRequest(account=True, page=common_pb2.PageRequest(page_size=2)),
        metadata=svc.auth(account_id, "boss"),
    )
    rest = await svc.prefs.ListAuditLog(
        preferences_pb2.ListAuditLogRequest(
            account=True, page=common_pb2.PageRequest(page_size=50, page_token=page.next_page_token)
        ),
        metadata=svc.auth(account_id, "boss"),
    )
    every = [*page.entries, *rest.entries]
    assert len({e.id for e in every}) == len(every) and ("admin_default", "account_defaults", "") in {
        (e.via, e.what, e.user_id) for e in every
    }


async def test_unsubscribe_is_audited_as_email_link(svc: Prefs, account_id: str) -> None:
    await _setup(svc, account_id)
    await svc.prefs.Unsubscribe(preferences_pb2.UnsubscribeRequest(account_id=account_id, user_id="ben", topic=T))
    assert (await decisions(svc, account_id, T, "ben"))["email"] == (False, "user")
    own = await svc.prefs.ListAuditLog(preferences_pb2.ListAuditLogRequest(), metadata=svc.auth(account_id, "ben"))
    assert [(e.via, e.what) for e in own.entries] == [("email-link", "unsubscribe")]


async def test_list_topics_shows_what_the_caller_may_see(svc: Prefs, account_id: str) -> None:
    await _setup(svc, account_id)
    await svc.user(account_id, "fay", tool_access=["forms"])
    ana = await svc.prefs.ListTopics(preferences_pb2.ListTopicsRequest(), metadata=svc.auth(account_id, "ana"))
    keys = {t.key for c in ana.categories for t in c.topics}
    assert "payments.payment_failed" not in keys and "forms.submission" not in keys and T in keys
    assert any(c.name == "Transactions" for c in ana.categories)  # ana reads French
    assert ana.sounds[0] == "chime" and len(ana.sounds) == 6
    # The settings page draws its tabs and switches from these, not from a copy of its own.
    assert [(c.channel, c.name, c.tab, c.tab_name) for c in ana.channels] == [
        (common_pb2.CHANNEL_EMAIL, "Email", "email", "Email"),
        (common_pb2.CHANNEL_BELL, "Bell", "desktop", "Desktop"),
        (common_pb2.CHANNEL_POPUP, "Pop-up", "desktop", "Desktop"),
        (common_pb2.CHANNEL_BROWSER, "Browser", "desktop", "Desktop"),
        (common_pb2.CHANNEL_OTHER_APPS, "Other apps", "other", "Other apps"),
        (common_pb2.CHANNEL_MOBILE, "Mobile", "mobile", "Mobile app"),
    ]
    website = next(t for c in ana.categories for t in c.topics if t.key == "website_visits.contact_visited")
    assert [s.channel for s in website.channels] == [ch("email")]
    billing = next(t for c in ana.categories for t in c.topics if t.key == "account.billing")
    assert billing.locked and all(s.enabled and s.source == "locked" for s in billing.channels)
    boss = await svc.prefs.ListTopics(
        preferences_pb2.ListTopicsRequest(locale="en"), metadata=svc.auth(account_id, "boss")
    )
    assert "payments.payment_failed" in {t.key for c in boss.categories for t in c.topics}
    fay = await svc.prefs.ListTopics(preferences_pb2.ListTopicsRequest(), metadata=svc.auth(account_id, "fay"))
    assert "forms.submission" in {t.key for c in fay.categories for t in c.topics}
