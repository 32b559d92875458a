"""Helpers for the browser tests: Debian's Chromium through Playwright, and the services behind the page."""

from __future__ import annotations

from collections.abc import AsyncIterator

from belfry import rpc, service
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from services.preferences.server import build_for as preferences_build_for
from services.preferences.settings import load_settings as preferences_settings
from tests.conftest import client_tls, common_env

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Pop-up sounds play without a click first, as they do for a user who has used the page.
    "--autoplay-policy=no-user-gesture-required",
]


async def launch() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless (never a downloaded browser)."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        await browser.close()


async def start_preferences(database_url: str, token_keys: dict[str, bytes]) -> service.Running:
    """The real preferences service, in-process on port 0."""
    settings = preferences_settings(common_env(database_url, token_keys))
    return await service.start("preferences", settings.common, preferences_build_for(settings))


async def seed_user(preferences_port: int, account_id: str, user_id: str, *, super_admin: bool = False) -> None:
    """An enterprise account and one active user in the directory."""
    channel = rpc.connect(f"127.0.0.1:{preferences_port}", client_tls())
    directory = directory_pb2_grpc.DirectoryServiceStub(channel)
    await directory.UpsertAccount(
        directory_pb2.UpsertAccountRequest(
            account=directory_pb2.Account(account_id=account_id, name="Acme", tier=directory_pb2.TIER_ENTERPRISE)
        )
    )
    await directory.UpsertUser(
        directory_pb2.UpsertUserRequest(
            user=directory_pb2.User(
                account_id=account_id,
                user_id=user_id,
                email=f"{user_id}@example.test",
                display_name=user_id.title(),
                locale="en",
                time_zone="UTC",
                permission_set="sales",
                active=True,
                super_admin=super_admin,
            )
        )
    )
    await channel.close()


async def open_app(context: BrowserContext, base: str, token: str, path: str = "/") -> Page:
    """Open a page of the web app signed in with ``token`` and wait until its websocket is ready."""
    page = await context.new_page()
    await page.goto(f"{base}{path}#token={token}")
    if path == "/":
        await page.wait_for_selector("body[data-connected='yes']")
    return page


async def look_away(page: Page) -> Page:
    """Take the user's eyes off ``page``: another tab comes to the front and takes the focus.

    Headless Chromium reports every tab "visible", even in a minimised window
    (``Browser.setWindowBounds`` changes the window state, not the page's
    visibility), so the page also treats a tab without focus as not looked at.
    Playwright emulates focus on every page; turning that off through the
    DevTools protocol lets the real focus move to the other tab.
    """
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("Emulation.setFocusEmulationEnabled", {"enabled": False})
    other = await page.context.new_page()
    await other.goto("about:blank")
    await other.bring_to_front()
    await page.wait_for_function("() => !document.hasFocus()")
    return other


async def shown_notifications(page: Page, *, at_least: int = 1) -> list[dict[str, str]]:
    """What the service worker registration really shows (``getNotifications``), once there are some."""
    script = """async () => {
        const r = await navigator.serviceWorker.ready;
        return (await r.getNotifications()).map(n => ({title: n.title, body: n.body, tag: n.tag}));
    }"""
    for _ in range(1200):  # polled (up to 30 s): the page shows it asynchronously after the websocket frame
        shown: list[dict[str, str]] = await page.evaluate(script)
        if len(shown) >= at_least:
            return shown
        await page.wait_for_timeout(25)
    return await page.evaluate(script)  # type: ignore[no-any-return]
