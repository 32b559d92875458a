"""Helpers for the browser tests: Debian's Chromium through Playwright, and the services behind the page."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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


async def seed_user(
    preferences_port: int,
    account_id: str,
    user_id: str,
    *,
    super_admin: bool = False,
    locale: str = "en",
    permission_set: str = "sales",
    active: bool = True,
) -> None:
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
                locale=locale,
                time_zone="UTC",
                permission_set=permission_set,
                active=active,
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


async def record_shown(page: Page) -> None:
    """From now on, note every notification the page has the browser show (``showNotification`` resolved).

    The real call still runs; this only writes down what the page asked for and
    that the browser accepted it. Headless Chromium was seen to accept a
    notification (the call resolved, the tab without focus) and then list none
    in ``getNotifications`` for 30 s, one run in about ten: what the page did
    is what a test of the page checks.
    """
    await page.evaluate(
        """() => {
            window.__shown = [];
            window.__shownArgs = [];
            const show = ServiceWorkerRegistration.prototype.showNotification;
            ServiceWorkerRegistration.prototype.showNotification = function (title, options) {
                return show.call(this, title, options).then((r) => {
                    window.__shown.push({ title, body: options.body, tag: options.tag });
                    window.__shownArgs.push([title, options]);
                    return r;
                });
            };
        }"""
    )


async def recorded_shown(page: Page) -> list[dict[str, str]]:
    """What ``record_shown`` noted, once there is something (polled up to 30 s)."""
    await page.wait_for_function("() => window.__shown.length > 0", timeout=30_000)
    return await page.evaluate("window.__shown")  # type: ignore[no-any-return]


async def shown_arguments(page: Page) -> list[tuple[str, dict[str, Any]]]:
    """The title and options of each notification ``record_shown`` noted, as the page passed them."""
    await recorded_shown(page)
    return [(title, options) for title, options in await page.evaluate("window.__shownArgs")]


async def shown_notifications(page: Page, *, patience: float = 30.0) -> list[dict[str, str]]:
    """What the service worker registration really shows (``getNotifications``), once there are some.

    Polled for up to ``patience`` seconds: the page shows them asynchronously after the websocket frame.
    """
    script = """async () => {
        const r = await navigator.serviceWorker.ready;
        return (await r.getNotifications()).map(n => ({title: n.title, body: n.body, tag: n.tag}));
    }"""
    for _ in range(int(patience / 0.025)):
        shown: list[dict[str, str]] = await page.evaluate(script)
        if shown:
            return shown
        await page.wait_for_timeout(25)
    return await page.evaluate(script)  # type: ignore[no-any-return]


# axe-core from the npm registry, installed once into a cache directory (never vendored).
AXE_VERSION = "4.10.3"
AXE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "belfry-tests" / f"axe-{AXE_VERSION}"


def axe_source() -> str:
    """axe.min.js, installed with npm into ``AXE_CACHE`` when it is not there yet."""
    script = AXE_CACHE / "node_modules" / "axe-core" / "axe.min.js"
    if not script.exists():
        AXE_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(  # noqa: S603 - fixed arguments
            [  # noqa: S607 - npm from PATH, as a developer runs it
                "npm",
                "install",
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(AXE_CACHE),
                f"axe-core@{AXE_VERSION}",
            ],
            check=True,
            capture_output=True,
        )
    return script.read_text()


async def axe_violations(page: Page, source: str) -> list[dict[str, Any]]:
    """Every axe-core violation on the page as it is now (the script is evaluated, so the CSP stays on)."""
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.evaluate(source)
    found: list[dict[str, Any]] = await page.evaluate(
        """async () => (await axe.run(document, { resultTypes: ["violations"] })).violations.map((v) => ({
            id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.slice(0, 5).map((n) => n.target.join(" ")),
        }))"""
    )
    return found


def describe(violations: list[dict[str, Any]]) -> str:
    """A readable assertion message."""
    return json.dumps(violations, indent=1)
