"""The web app as a user meets it (issue 18), in Debian's headless Chromium against the real gateway and preferences.

Settings page (points 1-7), inbox (8-10), admin page (11), language (12), phone-sized screens (13)
and the accessibility check (14).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from belfry import rpc, service
from belfry.api.common.v1 import common_pb2
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.auth import TokenIssuer
from belfry.unsubscribe import Signer
from playwright.async_api import Browser, BrowserContext, Page, ViewportSize

from tests.conftest import client_tls
from tests.gateway import browser as b
from tests.gateway.conftest import Publish, Replica, StartReplica

pytestmark = pytest.mark.browser
EMAIL = common_pb2.CHANNEL_EMAIL
REWARD = "academy.reward_updated"


class Prefs:
    """The preferences service, called as one user (what the test sets up or checks behind the page)."""

    def __init__(self, preferences: service.Running, issuer: TokenIssuer, account_id: str, user_id: str = "u1") -> None:
        self.channel = rpc.connect(f"127.0.0.1:{preferences.port}", client_tls())
        self.stub = preferences_pb2_grpc.PreferencesServiceStub(self.channel)
        self.meta = (("authorization", f"Bearer {issuer.issue(account_id, user_id)}"),)

    async def choices(self) -> dict[tuple[str, int], bool]:
        """The user's own choices."""
        answer = await self.stub.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=self.meta)
        return {(c.topic, c.channel): c.enabled for c in answer.choices}

    async def settings(self) -> preferences_pb2.ChannelSettings:
        """The user's settings block."""
        answer = await self.stub.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=self.meta)
        settings: preferences_pb2.ChannelSettings = answer.settings
        return settings

    async def choose(self, topic: str, channel: common_pb2.Channel.ValueType, enabled: bool) -> None:
        """One own choice."""
        choice = preferences_pb2.Choice(topic=topic, channel=channel, enabled=enabled)
        await self.stub.SetPreference(preferences_pb2.SetPreferenceRequest(choice=choice), metadata=self.meta)

    async def enabled(self, topic: str, channel: common_pb2.Channel.ValueType) -> bool:
        """The effective switch."""
        answer = await self.stub.Effective(preferences_pb2.EffectiveRequest(topic=topic), metadata=self.meta)
        return bool(next(c.enabled for c in answer.decision.channels if c.channel == channel))


@pytest.fixture
async def user(
    preferences: service.Running, issuer: TokenIssuer, account_id: str, web: Replica
) -> AsyncIterator[Prefs]:
    """The test user's preferences, behind the page."""
    found = Prefs(preferences, issuer, account_id)
    yield found
    await found.channel.close()


async def settings_page(context: BrowserContext, web: Replica, token: str, query: str = "") -> Page:
    """/settings, once its rows are on the page."""
    page = await b.open_app(context, web.http, token, f"/settings{query}")
    await page.wait_for_selector("body[data-ready='yes']")
    return page


async def open_category(page: Page, key: str) -> None:
    """Open one category of the list (a click on its summary, as a user does)."""
    details = page.locator(f"details[data-category='{key}']")
    if await details.get_attribute("open") is None:
        await details.locator("summary").click()


# --- 1. a change saves in place ----------------------------------------------------------------
async def test_a_change_saves_in_place_keeping_the_open_category_focus_and_scroll(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str, user: Prefs
) -> None:
    page = await context.new_page()
    await page.set_viewport_size({"width": 1000, "height": 500})
    await page.goto(f"{web.http}/settings#token={issuer.issue(account_id, 'u1')}")
    await page.wait_for_selector("body[data-ready='yes']")
    await open_category(page, "academy")
    box = page.locator(f"[data-topic='{REWARD}'] input[data-channel='CHANNEL_EMAIL']")
    await box.scroll_into_view_if_needed()
    await page.evaluate("window.scrollBy(0, 40)")
    await box.focus()
    await box.evaluate("(node) => { node.dataset.marker = 'same node'; }")
    before = await page.evaluate("window.scrollY")
    assert before > 0
    await page.keyboard.press("Space")
    await page.wait_for_selector("#saved:has-text('Reward updated')")
    assert await user.choices() == {(REWARD, EMAIL): False}
    # The row's source moved to "your choice": the patch from the server's answer has landed.
    await page.wait_for_selector(f"[data-topic='{REWARD}'] .source:has-text('Your choice')")
    assert await page.locator("details[data-category='academy']").get_attribute("open") is not None
    assert await page.evaluate("document.activeElement.dataset.marker") == "same node"
    assert await page.evaluate("document.activeElement.dataset.channel") == "CHANNEL_EMAIL"
    assert await page.evaluate("window.scrollY") == before
    assert not await box.is_checked()


# --- 2. where each value comes from, and back to default ------------------------------------------
async def test_each_row_says_where_its_value_comes_from_and_goes_back_to_default(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str, user: Prefs
) -> None:
    admin = user  # u1 is a super admin of the enterprise account and holds the "sales" permission set
    await admin.stub.SetAccountDefaults(
        preferences_pb2.SetAccountDefaultsRequest(choices=[preferences_pb2.Choice(topic=REWARD, channel=EMAIL)]),
        metadata=admin.meta,
    )
    profile = preferences_pb2.RoleProfile(
        permission_set="sales", choices=[preferences_pb2.Choice(topic="academy.exercise_updated", channel=EMAIL)]
    )
    await admin.stub.CreateRoleProfile(preferences_pb2.CreateRoleProfileRequest(profile=profile), metadata=admin.meta)
    await user.choose("academy.certification_updated", EMAIL, False)
    page = await settings_page(context, web, issuer.issue(account_id, "u1"))
    await open_category(page, "academy")
    await open_category(page, "account")

    def source(topic: str) -> str:
        return f"[data-topic='{topic}'] .source"

    assert await page.locator(source("academy.certification_updated")).inner_text() == "Your choice"
    assert await page.locator(source("academy.exercise_updated")).inner_text() == "Your role's profile"
    assert await page.locator(source(REWARD)).inner_text() == "Your account's default"
    assert await page.locator(source("account.support")).inner_text() == "Locked: always on"
    await page.fill("#search", "deal")
    first_deal = page.locator("[data-category='deals'] .topic[data-topic]").first
    assert await first_deal.locator(".source").inner_text() == "Default"
    assert await first_deal.locator("[data-reset]").is_hidden()
    await page.fill("#search", "")
    # Only the row with the user's own choice offers "back to default".
    assert await page.locator("[data-reset]:visible").count() == 1
    await page.locator("[data-topic='academy.certification_updated'] [data-reset]").click()
    await page.wait_for_selector(f"{source('academy.certification_updated')}:has-text('Default')")
    assert await user.choices() == {}
    box = page.locator("[data-topic='academy.certification_updated'] input[data-channel='CHANNEL_EMAIL']")
    assert await box.is_checked()  # the product default is on
    assert await page.evaluate("document.activeElement.id") == await box.get_attribute("id")


# --- 3. clear all: confirmed, undoable ----------------------------------------------------------
async def test_clear_all_asks_first_and_can_be_undone(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str, user: Prefs
) -> None:
    page = await settings_page(context, web, issuer.issue(account_id, "u1"))
    await open_category(page, "academy")
    box = page.locator(f"[data-topic='{REWARD}'] input[data-channel='CHANNEL_EMAIL']")
    locked = page.locator("[data-topic='account.support'] input[data-channel='CHANNEL_EMAIL']")
    assert await box.is_checked()
    await page.click("#clear-all")
    await page.wait_for_selector("#clear-dialog[open]")
    await page.click("#clear-cancel")
    assert await page.locator("#clear-dialog").count() == 0
    assert await box.is_checked()
    await page.click("#clear-all")
    await page.click("#clear-confirm")
    await page.wait_for_selector("#undo-clear")
    assert not await box.is_checked()  # shown cleared at once
    assert await page.evaluate("document.activeElement.id") == "undo-clear"
    await page.click("#undo-clear")
    assert await box.is_checked()
    assert await page.locator("#undo-clear").count() == 0
    assert await user.choices() == {}  # nothing was sent
    await page.click("#clear-all")
    await page.click("#clear-confirm")
    await page.wait_for_selector("#saved:has-text('every Email notification off')")  # sent once the undo window closed
    choices = await user.choices()
    assert choices[(REWARD, EMAIL)] is False
    assert all(not enabled and channel == EMAIL for (_, channel), enabled in choices.items())
    assert ("account.support", EMAIL) not in choices
    assert not await box.is_checked()
    await open_category(page, "account")
    assert await locked.is_checked()


# --- 4. locked topics --------------------------------------------------------------------------
async def test_locked_topics_are_shown_locked_and_never_offer_dont_show_again(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str, publish: Publish
) -> None:
    token = issuer.issue(account_id, "u1")
    settings = await settings_page(context, web, token)
    await open_category(settings, "account")
    row = settings.locator("[data-topic='account.billing']")
    assert "Always on" in await row.locator(".lock").inner_text()
    assert await row.locator("input[data-channel='CHANNEL_EMAIL']").is_disabled()
    assert await row.locator("input[data-channel='CHANNEL_EMAIL']").is_checked()
    assert await row.locator("[data-reset]").is_hidden()
    page = await b.open_app(context, web.http, token)
    await publish(account_id, "u1", "Invoice ready", topic="account.billing", popup=True)
    await publish(account_id, "u1", "Reward", topic=REWARD, popup=True)
    await page.wait_for_selector(".toast[data-topic='account.billing']")
    await page.wait_for_selector(f".toast[data-topic='{REWARD}']")
    assert await page.locator(".toast[data-topic='account.billing'] .dont-show").count() == 0
    assert await page.locator(f".toast[data-topic='{REWARD}'] .dont-show").count() == 1
    await page.click("#bell")
    for topic, offered in (("account.billing", 0), (REWARD, 1)):
        item = page.locator(f"#feed li[data-topic='{topic}']")
        await item.locator(".more").click()
        assert await item.locator("[data-action='dont-show']").count() == offered
        await page.keyboard.press("Escape")


# --- 5. quiet hours and errors beside their control ----------------------------------------------
async def test_quiet_hours_work_on_the_first_click_and_errors_sit_beside_their_control(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str, user: Prefs
) -> None:
    page = await settings_page(context, web, issuer.issue(account_id, "u1"))
    assert "wait until they end" in await page.locator("#quiet").inner_text()
    await page.click("#quiet-on")
    await page.wait_for_selector("#saved:has-text('quiet hours')")
    quiet = (await user.settings()).quiet_hours
    assert (quiet.enabled, list(quiet.days), quiet.start, quiet.end) == (True, [1, 2, 3, 4, 5, 6, 7], "22:00", "07:00")
    await page.wait_for_selector("#quiet-summary:has-text('every day')")
    summary = "Quiet from 10:00 PM to 7:00 AM, every day (your time zone)."  # times as English writes them
    assert await page.locator("#quiet-summary").inner_text() == summary
    for day in range(1, 7):
        await page.uncheck(f"#quiet-day-{day}")
    await page.wait_for_selector("#quiet-summary:text-is('Quiet from 10:00 PM to 7:00 AM, Sunday (your time zone).')")
    await page.locator("#quiet-day-7").click()  # the last day: refused beside the days
    error = page.locator("#quiet fieldset .field-error")
    assert await error.inner_text() == "Choose at least one day, or turn quiet hours off."
    assert await page.locator("#quiet-day-7").is_checked()
    assert await page.locator("#quiet-day-7").get_attribute("aria-describedby") == await error.get_attribute("id")
    assert list((await user.settings()).quiet_hours.days) == [7]
    await page.fill("#quiet-start", "21:30")
    await page.locator("#quiet-start").dispatch_event("change")
    await page.wait_for_function("() => document.getElementById('quiet-summary').textContent.includes('9:30 PM')")
    assert await page.locator("#quiet .field-error").count() == 0  # it went away
    assert (await user.settings()).quiet_hours.start == "21:30"


async def test_a_refused_change_is_explained_beside_its_switch_and_goes_away(
    web: Replica,
    context: BrowserContext,
    preferences: service.Running,
    issuer: TokenIssuer,
    account_id: str,
    user: Prefs,
) -> None:
    page = await settings_page(context, web, issuer.issue(account_id, "u1"))
    await open_category(page, "academy")
    row = page.locator(f"[data-topic='{REWARD}']")
    box = row.locator("input[data-channel='CHANNEL_EMAIL']")
    await b.seed_user(preferences.port, account_id, "u1", super_admin=True, active=False)  # deactivated meanwhile
    await box.click()
    error = row.locator(".field-error")
    await error.wait_for()
    assert await error.inner_text() == "You are not allowed to make this change."
    assert await box.is_checked()  # back to what is saved
    assert await box.get_attribute("aria-invalid") == "true"
    assert await page.locator("#error").is_hidden()  # said beside the switch, not at the top of the page
    await b.seed_user(preferences.port, account_id, "u1", super_admin=True)
    await box.click()
    await page.wait_for_selector("#saved:has-text('Reward updated')")
    assert await error.count() == 0
    assert await box.get_attribute("aria-invalid") is None
    assert await user.choices() == {(REWARD, EMAIL): False}


# --- 6. browser notification permission ------------------------------------------------------
async def test_browser_notifications_section_shows_the_permission_and_how_to_unblock(
    web: Replica, chromium: Browser, context: BrowserContext, issuer: TokenIssuer, account_id: str
) -> None:
    token = issuer.issue(account_id, "u1")
    allowed = await settings_page(context, web, token)
    await allowed.locator("[data-tab='desktop']").click()
    section = allowed.locator("#browser-permission")
    assert await section.get_attribute("data-state") == "granted"
    assert "Allowed." in await section.inner_text()
    assert await allowed.locator("#allow-notifications").count() == 0
    fresh = await chromium.new_context()
    try:
        page = await settings_page(fresh, web, token)
        await page.locator("[data-tab='desktop']").click()
        assert await page.locator("#browser-permission").get_attribute("data-state") == "default"
        assert "Not asked yet." in await page.locator("#browser-permission").inner_text()
        assert await page.locator("#allow-notifications").is_visible()
        # The user blocks notifications in the browser (what the site-settings menu does).
        target = await (await fresh.new_cdp_session(page)).send("Target.getTargetInfo")
        browser_cdp = await chromium.new_browser_cdp_session()
        await browser_cdp.send(
            "Browser.setPermission",
            {
                "permission": {"name": "notifications"},
                "setting": "denied",
                "origin": web.http,
                "browserContextId": target["targetInfo"]["browserContextId"],
            },
        )
        await page.wait_for_selector("#browser-permission[data-state='denied']")
        help_text = await page.locator("#permission-help").inner_text()
        assert "Site settings" in help_text and "Reload this page" in help_text
        assert await page.locator("#allow-notifications").count() == 0
    finally:
        await fresh.close()


# --- 7. switches, headers, sound pickers, labels ---------------------------------------------------
async def test_rows_have_switches_column_headers_one_line_sound_pickers_and_spoken_labels(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str
) -> None:
    page = await settings_page(context, web, issuer.issue(account_id, "u1"))
    await page.locator("[data-tab='desktop']").click()
    await open_category(page, "academy")
    head = page.locator("details[data-category='academy'] .topic.head")
    assert [t.strip() for t in await head.locator("span").all_text_contents()] == [
        "Notification",
        "Bell",
        "Pop-up",
        "Browser",
        "Sound",
    ]
    switch = page.get_by_role("switch", name="Reward updated — Pop-up", exact=True)
    assert await switch.count() == 1
    assert await page.get_by_role("switch", name="Pop-up notifications", exact=True).count() == 1
    row = page.locator(f"[data-topic='{REWARD}']")
    assert await row.locator(".sound-picker").count() == 1
    select = await row.locator(".sound-picker select").bounding_box()
    play = await row.locator(".sound-picker .play").bounding_box()
    assert select and play
    assert play["y"] < select["y"] + select["height"] and select["y"] < play["y"] + play["height"]  # one line
    assert play["x"] > select["x"]
    await row.locator(".sound-picker select").select_option("harp")
    await page.wait_for_selector("#saved:has-text('sound for Reward updated')")
    await page.get_by_role("button", name="Play preview of the sound for Reward updated").click()
    await page.wait_for_function("() => document.body.dataset.lastSound === 'harp'")


# --- 8. inbox rows ----------------------------------------------------------------------------
async def test_inbox_rows_show_time_icon_unread_mark_merged_members_and_a_menu_of_actions(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str, publish: Publish, user: Prefs
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))
    quote = {"type": "quote", "id": "7", "display_name": "Quote Q-7", "url": "https://app.example/q/7"}
    other = {"type": "quote", "id": "8", "display_name": "Quote Q-8", "url": "https://app.example/q/8"}
    await publish(account_id, "u1", "2 quotes were assigned to you", topic=REWARD, items=[quote, other, quote])
    await page.wait_for_selector("#badge:has-text('1')")
    await page.click("#bell")
    row = page.locator(f"#feed li[data-topic='{REWARD}']")
    assert await row.locator("time").inner_text() == "just now"
    full = await row.locator("time").get_attribute("title") or ""
    assert any(day in full for day in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"))
    assert await row.locator(".icon").get_attribute("data-category") == "academy"
    assert await row.locator(".category").inner_text() == "Academy"
    assert "unread" in (await row.get_attribute("class") or "")
    assert await row.locator(".unread-dot .sr-only").text_content() == "Unread"
    assert await row.locator(".merged li").all_inner_texts() == ["Quote Q-7", "Quote Q-8"]  # each member once
    more = row.locator(".more")
    assert await more.get_attribute("aria-label") == "Actions for “2 quotes were assigned to you”"
    await more.click()
    assert await page.evaluate("document.activeElement.dataset.action") == "read"
    assert await row.locator("[role=menuitem]").all_inner_texts() == [
        "Mark as read",
        "Archive",
        "Turn off pop-ups for this topic",
        "Don't show me these again",
        "Notification preferences for this topic",
    ]
    await page.keyboard.press("Enter")  # Mark as read
    await page.wait_for_selector("#badge", state="hidden")
    # The other tabs' count can arrive over the websocket before this tab's own answer re-renders the row.
    await page.wait_for_selector(f"#feed li.read[data-topic='{REWARD}']")
    row = page.locator(f"#feed li[data-topic='{REWARD}']")
    assert "read" in (await row.get_attribute("class") or "").split()
    assert await row.locator(".unread-dot").count() == 0
    assert await page.evaluate("document.activeElement.classList.contains('more')")  # the keyboard stays on the row
    await row.locator(".more").click()
    await row.locator("[data-action='unread']").click()
    await page.wait_for_selector("#badge:has-text('1')")
    await row.locator(".more").click()
    await row.locator("[data-action='archive']").click()
    await page.wait_for_selector(f"#feed li[data-topic='{REWARD}']", state="detached")
    await page.click("[data-filter='archived']")
    archived = page.locator(f"#feed li[data-topic='{REWARD}']")
    await archived.locator(".more").click()
    await archived.locator("[data-action='unarchive']").click()
    await page.wait_for_selector("#feed li.empty")
    await page.click("[data-filter='all']")
    row = page.locator(f"#feed li[data-topic='{REWARD}']")
    await user.choose(REWARD, common_pb2.CHANNEL_POPUP, True)
    await row.locator(".more").click()
    await row.locator("[data-action='mute-popups']").click()
    await page.wait_for_selector("#connection:has-text('No more pop-ups')")
    assert await user.enabled(REWARD, common_pb2.CHANNEL_POPUP) is False
    assert await user.enabled(REWARD, common_pb2.CHANNEL_BELL) is True
    await row.locator(".more").click()
    await row.locator("[data-action='preferences']").click()
    await page.wait_for_selector(f".topic.highlight[data-topic='{REWARD}']")
    assert await page.locator("[data-tab='desktop']").get_attribute("aria-selected") == "true"
    assert await page.evaluate("document.activeElement.closest('.topic').dataset.topic") == REWARD


# --- 9. filters, older notifications, empty states -------------------------------------------------
async def test_filters_older_notifications_and_empty_states(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str, publish: Publish
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))
    await page.click("#bell")
    assert (await page.locator("#feed li.empty").inner_text()).startswith("No notifications yet.")
    await page.click("[data-filter='archived']")
    await page.wait_for_selector("#feed li.empty:has-text('Nothing archived.')")
    await page.click("[data-filter='all']")
    for i in range(23):
        await publish(account_id, "u1", f"Item {i}")
    await page.wait_for_selector("#badge:has-text('23')")
    await page.reload()
    await page.wait_for_selector("body[data-connected='yes']")
    await page.click("#bell")
    assert await page.locator("#feed li[data-id]").count() == 20
    await page.click("#older")
    await page.wait_for_selector("#feed li[data-id] >> nth=22")
    assert await page.locator("#feed li[data-id]").count() == 23
    assert await page.locator("#older").is_hidden()
    titles = await page.locator("#feed li[data-id] .title").all_inner_texts()
    assert sorted(titles) == sorted(f"Item {i}" for i in range(23))  # each once
    ids = [
        int(i or 0)
        for i in await page.locator("#feed li[data-id]").evaluate_all("(rows) => rows.map((r) => r.dataset.id)")
    ]
    assert ids == sorted(ids, reverse=True)  # newest first, the older page after the first
    await page.click("[data-filter='unread']")
    assert await page.locator("#feed li[data-id]").count() == 23
    await page.click("#read-all")
    await page.wait_for_selector("#feed li.empty")
    assert (await page.locator("#feed li.empty").inner_text()).startswith("You're all caught up.")
    assert await page.locator("[data-filter='unread']").get_attribute("aria-pressed") == "true"


# --- 10. closing the panel, focus, the bell's name -------------------------------------------------
async def test_escape_and_a_click_outside_close_the_panel_and_the_bell_names_the_unread_count(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str, publish: Publish
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))
    assert await page.locator("#bell").get_attribute("aria-label") == "Notifications, none unread"
    await publish(account_id, "u1", "One")
    await publish(account_id, "u1", "Two")
    await page.wait_for_selector("#bell[aria-label='Notifications, 2 unread']")
    await page.locator("#bell").focus()
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#panel:not([hidden])")
    assert await page.locator("#bell").get_attribute("aria-expanded") == "true"
    await page.keyboard.press("Tab")  # into the panel
    await page.keyboard.press("Escape")
    await page.wait_for_selector("#panel", state="hidden")
    assert await page.evaluate("document.activeElement.id") == "bell"
    assert await page.locator("#bell").get_attribute("aria-expanded") == "false"
    await page.click("#bell")
    await page.wait_for_selector("#panel:not([hidden])")
    await page.locator("#feed li[data-id] .more").first.click()  # a row menu: Escape closes it first
    await page.keyboard.press("Escape")
    assert await page.locator("#feed .menu:not([hidden])").count() == 0
    assert await page.locator("#panel").is_visible()
    focused = await page.evaluate("document.activeElement.closest('li[data-id]').dataset.id")
    await publish(account_id, "u1", "Three")  # a live item re-draws the list: the keyboard stays put
    await page.wait_for_selector("#feed li[data-id] .title:text-is('Three')")
    assert await page.evaluate("document.activeElement.closest('li[data-id]')?.dataset.id") == focused
    assert await page.evaluate("document.activeElement.classList.contains('more')")
    await page.mouse.click(20, 400)  # outside
    await page.wait_for_selector("#panel", state="hidden")
    assert await page.evaluate("document.activeElement.id") == "bell"


# --- 12. French ---------------------------------------------------------------------------------
LANG = Path(__file__).resolve().parents[2] / "services" / "gateway" / "static" / "lang"


def english_only_phrases() -> list[str]:
    """The app's own English text that its French file says otherwise (placeholders cut out)."""
    english = json.loads((LANG / "en.json").read_text())
    french = json.loads((LANG / "fr.json").read_text())
    # A fragment that is French too ("notifications", "Notification") proves nothing.
    corpus = "\n".join(french.values()).lower()
    phrases: set[str] = set()
    for key, text in english.items():
        if french[key] == text:
            continue
        for fragment in re.split(r"\{\w+\}", text):
            part = fragment.strip(" .,:;()“”")
            if len(part) >= 4 and part.lower() not in corpus:
                phrases.add(part)
    return sorted(phrases)


async def screen_text(page: Page) -> str:
    """What the page shows and says: visible text, accessible names, titles and placeholders."""
    text: str = await page.evaluate(
        """() => [document.title, document.body.innerText,
            ...[...document.querySelectorAll("[aria-label], [title], [placeholder]")].flatMap((n) =>
                [n.getAttribute("aria-label"), n.getAttribute("title"), n.getAttribute("placeholder")])].filter(Boolean).join("\\n")"""
    )
    return text


def english_in(text: str, phrases: list[str]) -> list[str]:
    """The phrases found as whole words in ``text``."""
    return [p for p in phrases if re.search(rf"(?<!\w){re.escape(p)}(?!\w)", text)]


async def test_a_french_user_gets_every_screen_in_french(
    web: Replica,
    chromium: Browser,
    preferences: service.Running,
    issuer: TokenIssuer,
    account_id: str,
    publish: Publish,
) -> None:
    await b.seed_user(preferences.port, account_id, "u1", super_admin=True, locale="fr")
    phrases = english_only_phrases()
    assert "Mark all read" in phrases and "Quiet hours" in phrases  # the check can see English
    context = await chromium.new_context(locale="fr-FR")
    await context.grant_permissions(["notifications"], origin=web.http)
    token = issuer.issue(account_id, "u1")
    try:
        page = await b.open_app(context, web.http, token)
        assert await page.evaluate("document.documentElement.lang") == "fr"
        await publish(account_id, "u1", "Récompense", topic=REWARD, popup=True)
        await page.wait_for_selector(".toast")
        await page.click("#bell")
        await page.wait_for_selector("#feed li[data-id]")
        await page.locator("#feed li[data-id] .more").click()
        full = await page.locator("#feed time").get_attribute("title") or ""
        assert any(day in full for day in ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"))
        assert await page.locator("#feed time").inner_text() == "à l'instant"
        assert await page.locator("#feed .category").inner_text() == "Academy"
        assert english_in(await screen_text(page), phrases) == []
        await page.click("[data-filter='archived']")
        await page.wait_for_selector("#feed li.empty")
        assert english_in(await screen_text(page), phrases) == []
        settings = await settings_page(context, web, token)
        assert await settings.evaluate("document.documentElement.lang") == "fr"
        for tab in await settings.locator("[role=tab]").evaluate_all("(tabs) => tabs.map((t) => t.dataset.tab)"):
            await settings.locator(f"[data-tab='{tab}']").click()
            await open_category(settings, "academy")
            text = await screen_text(settings)
            assert english_in(text, phrases) == [], tab
        await settings.locator("[data-tab='email']").click()
        await settings.click("#clear-all")
        assert english_in(await screen_text(settings), phrases) == []
        await settings.click("#clear-cancel")
        await settings.locator("#quiet-on").click()
        await settings.wait_for_selector("#quiet-summary:has-text('tous les jours')")
        assert await settings.locator("#quiet-summary").inner_text() == (
            "Calme de 22:00 à 7:00, tous les jours (votre fuseau horaire)."  # 24-hour times, as French writes them
        )
        assert "Enregistré" in await settings.locator("#saved").inner_text()
        assert english_in(await screen_text(settings), phrases) == []
        admin = await b.open_app(context, web.http, token, "/admin")
        await admin.wait_for_selector("body[data-ready='yes']")
        await open_category(admin, "academy")
        assert await admin.evaluate("document.documentElement.lang") == "fr"
        assert english_in(await screen_text(admin), phrases) == []
    finally:
        await context.close()


async def test_the_profile_language_comes_first_then_the_browsers(
    web: Replica, chromium: Browser, preferences: service.Running, issuer: TokenIssuer, account_id: str
) -> None:
    token = issuer.issue(account_id, "u1")
    for profile, browser, expected in (("en", "fr-FR", "en"), ("de-DE", "fr-FR", "fr"), ("de", "en-GB", "en")):
        await b.seed_user(preferences.port, account_id, "u1", super_admin=True, locale=profile)
        context = await chromium.new_context(locale=browser)
        try:
            page = await settings_page(context, web, token)
            assert await page.evaluate("document.documentElement.lang") == expected, (profile, browser)
            name = await page.locator("details[data-category='academy'] .topic-name").first.text_content()
            # The topic names (the server's) and the page's words (the browser's files) agree.
            assert name == {"en": "Certification updated", "fr": "Certification mise à jour"}[expected]
        finally:
            await context.close()


# --- 13. phone-sized screens --------------------------------------------------------------------
PHONE: ViewportSize = {"width": 390, "height": 844}


async def sideways(page: Page) -> int:
    """How far the page scrolls sideways (0: it does not)."""
    width: int = await page.evaluate(
        "() => Math.max(document.documentElement.scrollWidth, document.body.scrollWidth) - window.innerWidth"
    )
    return width


async def test_at_390_by_844_nothing_scrolls_sideways_and_topics_are_cards(
    web: Replica, chromium: Browser, issuer: TokenIssuer, account_id: str, publish: Publish
) -> None:
    context = await chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    await context.grant_permissions(["notifications"], origin=web.http)
    token = issuer.issue(account_id, "u1")
    long_title = "A very long notification title without many breaks: " + "x" * 80
    try:
        page = await b.open_app(context, web.http, token)
        await publish(account_id, "u1", long_title, topic=REWARD, popup=True)
        await page.wait_for_selector(".toast")
        await page.click("#bell")
        await page.wait_for_selector("#feed li[data-id]")
        await page.locator("#feed li[data-id] .more").click()
        assert await sideways(page) <= 0
        panel = await page.locator("#panel").bounding_box()
        assert panel and panel["x"] >= 0 and panel["x"] + panel["width"] <= PHONE["width"]
        assert panel["y"] + panel["height"] <= PHONE["height"]
        settings = await settings_page(context, web, token)
        for tab in await settings.locator("[role=tab]").evaluate_all("(tabs) => tabs.map((t) => t.dataset.tab)"):
            await settings.locator(f"[data-tab='{tab}']").click()
            await open_category(settings, "academy")
            assert await sideways(settings) <= 0, tab
            row = settings.locator(f"[data-topic='{REWARD}']")
            assert await row.evaluate("(r) => getComputedStyle(r).display") == "flex"  # a card, not a grid row
            assert await settings.locator("details[data-category='academy'] .topic.head").is_hidden()
            assert await row.locator(".cell-label").first.is_visible()  # each switch names its channel
        admin = await b.open_app(context, web.http, token, "/admin")
        await admin.wait_for_selector("body[data-ready='yes']")
        await open_category(admin, "academy")
        assert await sideways(admin) <= 0
    finally:
        await context.close()


# --- 14. accessibility (axe-core) -------------------------------------------------------------
@pytest.fixture(scope="session")
def axe() -> str:
    """axe-core's script (from the npm registry, cached)."""
    return b.axe_source()


async def test_axe_finds_no_violation_on_the_bell_settings_and_admin_pages(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str, publish: Publish, axe: str
) -> None:
    token = issuer.issue(account_id, "u1")
    errors: list[str] = []  # console errors (a CSP violation among them) on any page of the test
    context.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page = await b.open_app(context, web.http, token)
    items = [
        {"type": "quote", "id": str(i), "display_name": f"Quote Q-{i}", "url": "https://app.example/q"}
        for i in range(2)
    ]
    await publish(account_id, "u1", "2 quotes were assigned to you", topic=REWARD, items=items)
    await publish(account_id, "u1", "Invoice ready", topic="account.billing")
    await page.wait_for_selector("#badge:has-text('2')")
    await page.click("#bell")
    await page.wait_for_selector("#feed li[data-id] >> nth=1")
    await page.locator("#feed li[data-id] .more").first.click()
    found = await b.axe_violations(page, axe)
    assert found == [], b.describe(found)
    settings = await settings_page(context, web, token)
    for tab in await settings.locator("[role=tab]").evaluate_all("(tabs) => tabs.map((t) => t.dataset.tab)"):
        await settings.locator(f"[data-tab='{tab}']").click()
        await open_category(settings, "academy")
        if await settings.locator("details[data-category='account']").count():  # locked topics: not on every tab
            await open_category(settings, "account")
        found = await b.axe_violations(settings, axe)
        assert found == [], f"{tab}: {b.describe(found)}"
    admin = await b.open_app(context, web.http, token, "/admin")
    await admin.wait_for_selector("body[data-ready='yes']")
    await open_category(admin, "academy")
    found = await b.axe_violations(admin, axe)
    assert found == [], b.describe(found)
    assert errors == []
    # The check sees what it should: a bell without a name is a violation.
    await page.evaluate("document.getElementById('bell').removeAttribute('aria-label')")
    assert "button-name" in [v["id"] for v in await b.axe_violations(page, axe)]


# --- 11. the admin page ------------------------------------------------------------------------
async def test_admin_page_is_for_enterprise_super_admins_and_manages_profiles_of_real_permission_sets(
    web: Replica,
    context: BrowserContext,
    preferences: service.Running,
    issuer: TokenIssuer,
    account_id: str,
    user: Prefs,
) -> None:
    await b.seed_user(preferences.port, account_id, "u2", permission_set="support")
    await b.seed_user(preferences.port, account_id, "u3", permission_set="marketing")
    plain = issuer.issue(account_id, "u2")
    page = await b.open_app(context, web.http, plain)
    assert await page.locator("[data-admin-link]").is_hidden()
    settings = await settings_page(context, web, plain)
    assert await settings.locator("[data-admin-link]").is_hidden()
    refused = await b.open_app(context, web.http, plain, "/admin")
    await refused.wait_for_selector("#not-admin:visible")
    assert await refused.locator("#admin-tools").is_hidden()
    token = issuer.issue(account_id, "u1")
    home = await b.open_app(context, web.http, token)
    assert await home.locator("[data-admin-link]").is_visible()
    admin = await b.open_app(context, web.http, token, "/admin")
    await admin.wait_for_selector("body[data-ready='yes']")
    assert "then the profile of their role, then the account default, then the product default" in (
        await admin.locator("#precedence").inner_text()
    )
    # Profiles are made for the directory's permission sets, not typed names.
    assert await admin.locator("#new-profile option").all_inner_texts() == ["marketing", "sales", "support"]
    await admin.select_option("#new-profile", "support")
    await admin.click("#create-profile")
    await admin.wait_for_selector("#target option[value='support']:checked", state="attached")
    assert await admin.locator("#new-profile option").all_inner_texts() == ["marketing", "sales"]
    assert await admin.locator("#differ-count").inner_text() == "Every setting is the product default."
    await open_category(admin, "academy")
    box = admin.locator(f"[data-topic='{REWARD}'] input[data-channel='CHANNEL_EMAIL']")
    await box.uncheck()
    await admin.wait_for_selector("#saved:has-text('Reward updated')")
    note = admin.locator(f"[data-topic='{REWARD}'] .differs")
    assert await note.inner_text() == "Differs from the product default: Email off"
    assert await admin.locator("#differ-count").inner_text() == "1 setting differs from the product default."
    assert await admin.locator("details[data-category='academy']").get_attribute("open") is not None
    profiles = await user.stub.ListRoleProfiles(preferences_pb2.ListRoleProfilesRequest(), metadata=user.meta)
    assert [(p.permission_set, [(c.topic, c.enabled) for c in p.choices]) for p in profiles.profiles] == [
        ("support", [(REWARD, False)])
    ]
    assert list(profiles.permission_sets) == ["marketing", "sales", "support"]
    await admin.click("#delete-profile")
    await admin.click("#delete-cancel")
    assert await admin.locator("#target").input_value() == "support"
    await admin.click("#delete-profile")
    await admin.click("#delete-confirm")
    await admin.wait_for_selector("#saved:has-text('Profile for support deleted.')")
    assert await admin.locator("#target").input_value() == ""
    profiles = await user.stub.ListRoleProfiles(preferences_pb2.ListRoleProfilesRequest(), metadata=user.meta)
    assert list(profiles.profiles) == []


# --- 12 and 14: the unsubscribe page ---------------------------------------------------------------
async def test_the_unsubscribe_page_looks_like_the_app_names_the_topic_and_speaks_the_users_language(
    start_replica: StartReplica,
    preferences: service.Running,
    chromium: Browser,
    account_id: str,
    user: Prefs,
    axe: str,
) -> None:
    key = "unsubscribe-key-for-browser-tests-0123456789"
    replica = await start_replica(
        BELFRY_PREFERENCES_ADDRESS=f"127.0.0.1:{preferences.port}", BELFRY_UNSUBSCRIBE_KEY=key
    )
    signer = Signer(key.encode(), ttl_seconds=3600)
    context = await chromium.new_context(locale="en-US")
    try:
        page = await context.new_page()
        await page.goto(f"{replica.http}/email/unsubscribe?t={signer.token(account_id, 'u1', REWARD)}")
        assert await page.locator("#message").inner_text() == "Stop emails about “Reward updated”?"
        assert await page.evaluate("document.documentElement.lang") == "en"
        assert await page.evaluate("getComputedStyle(document.querySelector('.card')).borderRadius") == "8px"
        found = await b.axe_violations(page, axe)
        assert found == [], b.describe(found)
        await page.get_by_role("button", name="Unsubscribe").click()
        await page.wait_for_selector("#message:has-text('no longer receive emails about “Reward updated”')")
        assert await user.enabled(REWARD, EMAIL) is False
        found = await b.axe_violations(page, axe)
        assert found == [], b.describe(found)
        await page.goto(f"{replica.http}/email/unsubscribe?t={signer.token(account_id, 'u1', 'account.billing')}")
        assert "“Billing messages” is locked" in await page.locator("#message").inner_text()
        assert await page.locator("form").count() == 0  # nothing to press
        await page.goto(f"{replica.http}/email/unsubscribe?t=forged")
        assert await page.locator("h1").inner_text() == "Link not valid"
        found = await b.axe_violations(page, axe)
        assert found == [], b.describe(found)
        # A French profile: the page and the topic's label in French, whatever the browser says.
        await b.seed_user(preferences.port, account_id, "u1", super_admin=True, locale="fr")
        await page.goto(
            f"{replica.http}/email/unsubscribe?t={signer.token(account_id, 'u1', 'academy.exercise_updated')}"
        )
        assert await page.evaluate("document.documentElement.lang") == "fr"
        assert await page.locator("#message").inner_text() == "Ne plus recevoir d'e-mails sur « Exercice mis à jour » ?"
        assert english_in(await screen_text(page), english_only_phrases()) == []
        found = await b.axe_violations(page, axe)
        assert found == [], b.describe(found)
    finally:
        await context.close()
    # Without a known user, the browser's language decides.
    french = await chromium.new_context(locale="fr-FR")
    try:
        page = await french.new_page()
        await page.goto(f"{replica.http}/email/unsubscribe?t=forged")
        assert await page.locator("h1").inner_text() == "Lien non valide"
    finally:
        await french.close()


# --- 15. screenshots for the docs ------------------------------------------------------------------
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("language", ["en", "fr"])
async def test_screenshots_of_the_bell_settings_and_admin_pages(
    web: Replica,
    chromium: Browser,
    preferences: service.Running,
    issuer: TokenIssuer,
    account_id: str,
    publish: Publish,
    language: str,
) -> None:
    await b.seed_user(preferences.port, account_id, "u1", super_admin=True, locale=language)
    token = issuer.issue(account_id, "u1")
    french = language == "fr"
    items = [
        {"type": "quote", "id": str(i), "display_name": f"Quote Q-{i}", "url": f"https://app.example/q/{i}"}
        for i in range(3)
    ]
    await publish(
        account_id,
        "u1",
        "Ann a accepté le devis Q-12" if french else "Ann accepted quote Q-12",
        topic="quotes.signed_by_buyer",
    )
    await publish(
        account_id,
        "u1",
        "3 devis vous ont été attribués" if french else "3 quotes were assigned to you",
        items=items,
        topic="contacts.contact_assigned",
    )
    await publish(
        account_id, "u1", "Bruno vous a mentionné" if french else "Bruno mentioned you", topic="comments.mentioned"
    )
    desktop: ViewportSize = {"width": 1200, "height": 800}
    for name, viewport in (("desktop", desktop), ("phone", PHONE)):
        context = await chromium.new_context(locale="fr-FR" if french else "en-US", viewport=viewport)
        try:
            page = await b.open_app(context, web.http, token)
            await page.wait_for_selector("#badge:has-text('3')")
            await page.click("#bell")
            await page.wait_for_selector("#feed li[data-id] >> nth=2")
            await page.locator("#feed li[data-id] .more").first.click()
            assert await page.locator("#error").is_hidden() and await sideways(page) <= 0
            await page.screenshot(path=str(DOCS / f"web-app-bell-{name}-{language}.png"))
            settings = await settings_page(context, web, token)
            await settings.locator("[data-tab='desktop']").click()
            await open_category(settings, "academy")
            assert await settings.locator("#error").is_hidden() and await sideways(settings) <= 0
            await settings.screenshot(
                path=str(DOCS / f"web-app-settings-{name}-{language}.png"), full_page=name == "desktop"
            )
            if name == "desktop":
                admin = await b.open_app(context, web.http, token, "/admin")
                await admin.wait_for_selector("body[data-ready='yes']")
                await open_category(admin, "academy")
                assert await admin.locator("#error").is_hidden()
                await admin.screenshot(path=str(DOCS / f"web-app-admin-{language}.png"))
        finally:
            await context.close()
