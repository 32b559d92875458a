"""The web app in Debian's headless Chromium against the real gateway and preferences service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from belfry import service
from belfry.auth import TokenIssuer
from playwright.async_api import Browser, BrowserContext

from tests.gateway import browser as b
from tests.gateway.conftest import Publish, Replica, StartReplica

pytestmark = pytest.mark.browser


@pytest.fixture(scope="session")
async def chromium() -> AsyncIterator[Browser]:
    """One browser for the session (a fresh context per test)."""
    async for browser in b.launch():
        yield browser


@pytest.fixture(scope="session")
async def preferences(database_url: str, token_keys: dict[str, bytes]) -> AsyncIterator[service.Running]:
    """The preferences service behind the settings pages."""
    running = await b.start_preferences(database_url, token_keys)
    yield running
    await running.stop(0.2)


@pytest.fixture
async def web(start_replica: StartReplica, preferences: service.Running, account_id: str) -> Replica:
    """A gateway replica wired to the preferences service, with the test user in the directory."""
    await b.seed_user(preferences.port, account_id, "u1", super_admin=True)
    return await start_replica(BELFRY_PREFERENCES_TARGET=f"127.0.0.1:{preferences.port}")


@pytest.fixture
async def context(chromium: Browser, web: Replica) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile allowed to show notifications on the app's origin."""
    ctx = await chromium.new_context()
    await ctx.grant_permissions(["notifications"], origin=web.http)
    yield ctx
    await ctx.close()


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
    await page.wait_for_function("document.body.dataset.lastSound === 'marimba'")
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
    notification_id = await publish(account_id, "u1", "Quote accepted", body="ACME signed", popup=True, browser=True)
    shown = await b.shown_notifications(page)
    assert shown == [{"title": "Quote accepted", "body": "ACME signed", "tag": notification_id}]
    assert await page.locator(".toast").count() == 0  # hidden: no toast
