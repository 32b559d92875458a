"""The web app in Debian's headless Chromium against the real gateway and preferences service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import websockets
from belfry import rpc, service
from belfry.api.common.v1 import common_pb2
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.auth import TokenIssuer
from playwright.async_api import Browser, BrowserContext

from tests.conftest import client_tls
from tests.gateway import browser as b
from tests.gateway.conftest import Publish, Replica, StartReplica

pytestmark = pytest.mark.browser
DOCS = Path(__file__).resolve().parents[2] / "docs"


async def test_badge_updates_live_and_popup_plays_the_sound(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))
    assert await page.locator("#badge").is_hidden()
    await publish(account_id, "u1", "<img src=x onerror=alert(1)> mentioned you", popup=True, sound="marimba")
    await page.wait_for_selector("#badge:has-text('1')")
    toast = page.locator(".toast")
    await toast.wait_for()
    # Producer text is shown as text, never parsed.
    assert await toast.locator(".title").inner_text() == "<img src=x onerror=alert(1)> mentioned you"
    assert await page.locator(".toast img").count() == 0
    await page.wait_for_function("() => document.body.dataset.lastSound === 'marimba'")
    assert await page.evaluate("document.body.dataset.audioState") == "running"
    await page.click("#bell")
    await page.wait_for_selector("#feed li[data-id]")
    assert "mentioned you" in await page.locator("#feed li[data-id] .title").inner_text()


async def test_hidden_tab_shows_a_browser_notification_instead(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))
    await page.evaluate("navigator.serviceWorker.ready.then(() => true)")
    await b.look_away(page)
    await b.record_shown(page)
    notification_id = await publish(account_id, "u1", "Quote accepted", body="ACME signed", popup=True, browser=True)
    shown = await b.recorded_shown(page)
    state = await page.evaluate("[document.visibilityState, document.hasFocus(), Notification.permission]")
    assert shown == [{"title": "Quote accepted", "body": "ACME signed", "tag": notification_id}], state
    assert await page.locator(".toast").count() == 0  # hidden: no toast


async def test_clicking_the_browser_notification_marks_the_item_read(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    token = issuer.issue(account_id, "u1")
    page = await b.open_app(context, web.http, token)
    await page.evaluate("navigator.serviceWorker.ready.then(() => true)")
    await b.look_away(page)
    await b.record_shown(page)
    notification_id = await publish(account_id, "u1", "Quote accepted", body="ACME signed", browser=True)
    [(title, options)] = await b.shown_arguments(page)
    assert (title, options["tag"]) == ("Quote accepted", notification_id)
    worker = context.service_workers[0] if context.service_workers else await context.wait_for_event("serviceworker")
    # The user clicks it: the real notificationclick handler runs (openWindow recorded, not opened).
    # Headless Chromium sometimes accepts a notification and then lists none (see b.record_shown); the
    # click needs the listed Notification object, so the worker shows again exactly what the page showed
    # (same title, tag and data) when the first one is not listed.
    opened = await worker.evaluate(
        """async ([tag, title, options]) => {
            const opened = [];
            Object.defineProperty(self.clients, "openWindow", { value: async (url) => { opened.push(url); } });
            let [shown] = await self.registration.getNotifications({ tag });
            for (let i = 0; !shown && i < 100; i++) {
                if (i % 20 === 19) await self.registration.showNotification(title, options);
                await new Promise((resolve) => setTimeout(resolve, 50));
                [shown] = await self.registration.getNotifications({ tag });
            }
            self.dispatchEvent(new NotificationEvent("notificationclick", { notification: shown }));
            return opened;
        }""",
        [notification_id, title, options],
    )
    assert len(opened) == 1
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=web.http, headers=headers) as http:
        for _ in range(500):  # the tab marks it read through the feed API (bounded wait)
            if (await http.get("/api/unread")).json()["unread"] == 0:
                break
            await asyncio.sleep(0.02)
        assert (await http.get("/api/unread")).json() == {"unread": 0}


async def _popup(
    preferences: service.Running, issuer: TokenIssuer, account_id: str, topic: str, enable: bool | None = None
) -> bool:
    """The user's effective pop-up switch for ``topic`` (set first when ``enable`` is given)."""
    channel = rpc.connect(f"127.0.0.1:{preferences.port}", client_tls())
    stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
    meta = (("authorization", f"Bearer {issuer.issue(account_id, 'u1')}"),)
    if enable is not None:
        choice = preferences_pb2.Choice(topic=topic, channel=common_pb2.CHANNEL_POPUP, enabled=enable)
        await stub.SetPreference(preferences_pb2.SetPreferenceRequest(choice=choice), metadata=meta)
    answer = await stub.Effective(preferences_pb2.EffectiveRequest(topic=topic), metadata=meta)
    await channel.close()
    return bool(next(c.enabled for c in answer.decision.channels if c.channel == common_pb2.CHANNEL_POPUP))


async def test_dont_show_again_switches_the_topic_off(
    web: Replica,
    context: BrowserContext,
    preferences: service.Running,
    issuer: TokenIssuer,
    publish: Publish,
    account_id: str,
) -> None:
    topic = "academy.reward_updated"
    other = "academy.exercise_updated"
    assert await _popup(preferences, issuer, account_id, topic, enable=True) is True
    assert await _popup(preferences, issuer, account_id, other, enable=True) is True
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))
    await publish(account_id, "u1", "Reward updated", topic=topic, popup=True, sound="ping")
    await page.locator(".toast .dont-show").click()
    await page.wait_for_selector(".toast", state="detached")
    assert await page.locator("#error").is_hidden()
    assert await _popup(preferences, issuer, account_id, topic) is False
    assert await _popup(preferences, issuer, account_id, other) is True  # only that topic


async def test_red_dot_option_set_in_settings_shows_and_clears(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    token = issuer.issue(account_id, "u1")
    settings = await b.open_app(context, web.http, token, "/settings")
    await settings.locator("[data-tab='desktop']").click()
    red_dot = settings.locator("#red-dot")
    if await red_dot.is_checked():  # start from "off", whatever the product default is
        await red_dot.uncheck()
        await settings.wait_for_selector("#saved:has-text('red dot')")
    page = await b.open_app(context, web.http, token)
    await publish(account_id, "u1", "One")
    await page.wait_for_selector("#badge:has-text('1')")
    assert await page.locator("#favicon").get_attribute("data-dot") == "off"  # option off: no dot
    await settings.evaluate("document.getElementById('saved').textContent = ''")
    await red_dot.check()
    await settings.wait_for_selector("#saved:has-text('red dot')")
    assert await settings.locator("#error").is_hidden()
    await page.reload()
    await page.wait_for_selector("#favicon[data-dot='on']", state="attached")
    assert (await page.locator("#favicon").get_attribute("href") or "").startswith("data:image/png")
    await page.click("#bell")
    await page.click("#read-all")
    await page.wait_for_selector("#favicon[data-dot='off']", state="attached")
    assert await page.locator("#badge").is_hidden()


async def test_settings_persist_across_a_reload(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"), "/settings")
    await page.fill("#search", "reward")
    box = page.locator("[data-topic='academy.reward_updated'] input[data-channel='CHANNEL_EMAIL']")
    assert await box.is_checked()
    await box.uncheck()
    await page.wait_for_selector("#saved:has-text('Reward updated')")
    await page.locator("[data-tab='desktop']").click()
    await page.select_option("#default-sound", "harp")
    await page.wait_for_selector("#saved:has-text('default sound')")
    await page.reload()
    await page.fill("#search", "reward")
    assert not await page.locator(
        "[data-topic='academy.reward_updated'] input[data-channel='CHANNEL_EMAIL']"
    ).is_checked()
    assert (
        await page.locator("[data-topic='academy.certification_updated'] input[data-channel='CHANNEL_EMAIL']").count()
        == 0
    )
    await page.locator("[data-tab='desktop']").click()
    assert await page.locator("#default-sound").input_value() == "harp"
    assert await page.locator("#error").is_hidden()
    await page.screenshot(path=str(DOCS / "gateway-settings.png"))


async def test_errors_are_shown_not_swallowed(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"), "/settings")
    await page.locator("[data-tab='desktop']").click()
    # A locked topic's checkbox is disabled; ask the service directly through the page's own helper.
    message = await page.evaluate(
        """async () => {
            const m = await import('/static/common.js');
            try { await m.prefs('SetTopicSound', {topic: 'academy.reward_updated', sound: 'kazoo'}); return ''; }
            catch (e) { m.showError(e); return e.message; }
        }"""
    )
    assert "kazoo" in message or "sound" in message
    # Said in the user's language; the service's own words stay on the box for whoever inspects it.
    assert await page.locator("#error").inner_text() == "This change could not be saved. Try again."
    assert await page.locator("#error").get_attribute("title") == message


async def test_missed_items_appear_exactly_once_after_a_dropped_connection(
    start_replica: StartReplica,
    preferences: service.Running,
    context: BrowserContext,
    issuer: TokenIssuer,
    publish: Publish,
    account_id: str,
) -> None:
    await b.seed_user(preferences.port, account_id, "u1")
    target = f"127.0.0.1:{preferences.port}"
    first = await start_replica(BELFRY_PREFERENCES_ADDRESS=target)
    port = str(first.build.http_port)
    store_only = await start_replica(BELFRY_PREFERENCES_ADDRESS=target)  # keeps storing while the tab's replica is down
    await context.grant_permissions(["notifications"], origin=first.http)
    page = await b.open_app(context, first.http, issuer.issue(account_id, "u1"))
    await publish(account_id, "u1", "before")
    await page.wait_for_selector("#badge:has-text('1')")
    await first.running.stop(0.2)
    await page.wait_for_selector("body[data-connected='no']")
    for title in ("missed 1", "missed 2", "missed 3"):
        await publish(account_id, "u1", title)
    watcher = await b.open_app(context, store_only.http, issuer.issue(account_id, "u1"))
    await watcher.wait_for_selector("#badge:has-text('4')")  # all stored before the tab comes back
    await start_replica(BELFRY_PREFERENCES_ADDRESS=target, BELFRY_GATEWAY_HTTP_PORT=port)
    await page.wait_for_selector("#badge:has-text('4')")
    await page.click("#bell")
    # The badge can read 4 from the first resumed frame (each carries the count of the moment): the rows
    # follow frame by frame.
    await page.wait_for_selector("#feed li[data-id] .title:has-text('missed 3')")
    titles = await page.locator("#feed li[data-id] .title").all_inner_texts()
    assert sorted(titles) == ["before", "missed 1", "missed 2", "missed 3"]


async def test_service_worker_shows_a_web_push_once_per_tag(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))
    cdp = await context.new_cdp_session(page)
    registrations: list[dict[str, object]] = []
    cdp.on("ServiceWorker.workerRegistrationUpdated", lambda event: registrations.extend(event["registrations"]))
    await cdp.send("ServiceWorker.enable")
    await page.evaluate("navigator.serviceWorker.ready.then(() => true)")
    for _ in range(100):
        if registrations:
            break
        await page.wait_for_timeout(20)
    registration_id = str(registrations[0]["registrationId"])
    worker = context.service_workers[0] if context.service_workers else await context.wait_for_event("serviceworker")
    # What the worker has the browser show, noted as each call resolves (the real call still runs): headless
    # Chromium sometimes lists none of the notifications it accepted (see b.record_shown).
    await worker.evaluate(
        """() => {
            self.__shown = [];
            const show = self.registration.showNotification.bind(self.registration);
            self.registration.showNotification = (title, options) => show(title, options).then((r) => {
                self.__shown.push({ title, body: options.body, tag: options.tag });
                return r;
            });
        }"""
    )
    payload = json.dumps({"title": "Pushed <b>hi</b>", "body": "while away", "notification_id": "n-123", "url": "/x"})
    for _ in range(2):  # the same notification twice (a race between tab and push): shown once
        await cdp.send(
            "ServiceWorker.deliverPushMessage",
            {"origin": web.http + "/", "registrationId": registration_id, "data": payload},
        )
    expected = {"title": "Pushed <b>hi</b>", "body": "while away", "tag": "n-123"}
    for _ in range(600):  # both pushes handled (bounded wait)
        calls = await worker.evaluate("self.__shown")
        if len(calls) >= 2:
            break
        await page.wait_for_timeout(25)
    # Both carry the notification id as their tag, so the second replaces the first ...
    assert calls == [expected, expected]
    # ... and the browser lists one (when it lists what it accepted at all).
    listed = await b.shown_notifications(page, patience=2.0)
    assert listed in ([expected], []), listed


async def test_merged_notification_in_the_bell_and_screenshot(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))
    items = [
        {"type": "quote", "id": str(i), "display_name": f"Quote Q-{i}", "url": f"https://app.example/q/{i}"}
        for i in range(3)
    ]
    await publish(account_id, "u1", "3 quotes were assigned to you", items=items, body="Open the quotes")
    await publish(account_id, "u1", "Ann mentioned you in Support", body="“Can you look at this?”")
    await page.wait_for_selector("#badge:has-text('2')")
    await page.click("#bell")
    merged = page.locator("#feed li[data-id]", has_text="3 quotes")
    assert await merged.locator(".count").inner_text() == "3"
    assert await merged.locator(".merged li").all_inner_texts() == ["Quote Q-0", "Quote Q-1", "Quote Q-2"]
    await page.screenshot(path=str(DOCS / "gateway-bell.png"))


async def test_admin_page_sets_account_defaults_and_role_profiles(
    web: Replica, context: BrowserContext, preferences: service.Running, issuer: TokenIssuer, account_id: str
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"), "/admin")
    await page.fill("#search", "reward")
    box = page.locator("[data-topic='academy.reward_updated'] input[data-channel='CHANNEL_EMAIL']")
    assert await box.is_checked()  # the product default
    await box.uncheck()
    await page.wait_for_selector("#saved:has-text('Reward updated')")
    await page.select_option("#new-profile", "sales")  # the directory's permission sets
    await page.click("#create-profile")
    await page.wait_for_selector("#target option[value='sales']:checked", state="attached")
    channel = rpc.connect(f"127.0.0.1:{preferences.port}", client_tls())
    stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
    meta = (("authorization", f"Bearer {issuer.issue(account_id, 'u1')}"),)
    defaults = await stub.GetAccountDefaults(preferences_pb2.GetAccountDefaultsRequest(), metadata=meta)
    profiles = await stub.ListRoleProfiles(preferences_pb2.ListRoleProfilesRequest(), metadata=meta)
    await channel.close()
    assert [(c.topic, c.channel, c.enabled) for c in defaults.choices] == [
        ("academy.reward_updated", common_pb2.CHANNEL_EMAIL, False)
    ]
    assert [p.permission_set for p in profiles.profiles] == ["sales"]
    assert await page.locator("#error").is_hidden()


async def test_mute_from_the_toast_silences_later_popups(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))
    await publish(account_id, "u1", "First", popup=True, sound="bell")
    await page.wait_for_function("() => document.body.dataset.lastSound === 'bell'")
    await page.locator(".toast .mute").click()
    await page.wait_for_selector(".toast", state="detached")
    muted = await page.evaluate(
        "async () => (await (await import('/static/common.js')).prefs('GetPreferences')).settings.muted"
    )
    assert muted is True  # saved in the preferences service
    await publish(account_id, "u1", "Second", popup=True, sound="pop")
    await page.wait_for_selector(".toast:has-text('Second')")
    assert await page.evaluate("document.body.dataset.lastSound") == "bell"  # the toast shows, silently


async def test_the_page_may_open_websockets_to_its_own_origin_only(
    web: Replica, context: BrowserContext, issuer: TokenIssuer, account_id: str
) -> None:
    # A script that slipped into the page could otherwise carry the token to any host over a websocket.
    async def accept(ws: websockets.ServerConnection) -> None:
        await ws.wait_closed()

    async with websockets.serve(accept, "127.0.0.1", 0) as elsewhere:
        port = next(iter(elsewhere.sockets)).getsockname()[1]
        page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))  # its own websocket is up
        outcome = await page.evaluate(
            """(url) => new Promise((resolve) => {
                document.addEventListener("securitypolicyviolation", (e) => resolve("blocked " + e.effectiveDirective));
                try {
                    new WebSocket(url).addEventListener("open", () => resolve("open"));
                } catch (error) {
                    resolve("blocked " + error.name);
                }
            })""",
            f"ws://localhost:{port}/steal",
        )
    assert outcome.startswith("blocked"), outcome


async def test_a_notification_click_opens_only_the_app_or_a_configured_origin(
    start_replica: StartReplica,
    preferences: service.Running,
    chromium: Browser,
    issuer: TokenIssuer,
    account_id: str,
) -> None:
    await b.seed_user(preferences.port, account_id, "u1")
    replica = await start_replica(
        BELFRY_PREFERENCES_ADDRESS=f"127.0.0.1:{preferences.port}", BELFRY_GATEWAY_LINK_ORIGINS="https://app.example"
    )
    context = await chromium.new_context()
    await context.grant_permissions(["notifications"], origin=replica.http)
    try:
        page = await b.open_app(context, replica.http, issuer.issue(account_id, "u1"))
        await page.evaluate("navigator.serviceWorker.ready.then(() => true)")
        worker = (
            context.service_workers[0] if context.service_workers else await context.wait_for_event("serviceworker")
        )
        # The real notificationclick handler runs; openWindow is recorded instead of opening a window.
        opened = await worker.evaluate(
            """async (urls) => {
                const opened = [];
                Object.defineProperty(self.clients, "openWindow", { value: async (url) => { opened.push(url); } });
                for (const [i, url] of urls.entries()) {
                    await self.registration.showNotification("n" + i, { tag: "link-" + i, data: { url } });
                    const [shown] = await self.registration.getNotifications({ tag: "link-" + i });
                    self.dispatchEvent(new NotificationEvent("notificationclick", { notification: shown }));
                }
                return opened;
            }""",
            [
                "https://evil.example/login",
                "//evil.example/x",
                "javascript:alert(1)",
                "https://app.example.evil.example/x",
                "/deals/1",
                "https://app.example/deals/2",
            ],
        )
    finally:
        await context.close()
    # Anything else opens the app's own start page instead.
    assert opened == ["/", "/", "/", "/", f"{replica.http}/deals/1", "https://app.example/deals/2"]
