"""Following and muting from the web app (issue 19): the gateway's proxy of the dispatcher's FollowService,
and the bell's "Mute this thread" / "Unfollow", against the real dispatcher, preferences and gateway.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from belfry import rpc, service
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.auth import TokenIssuer
from playwright.async_api import BrowserContext, Page

from services.dispatcher.server import build_for as dispatcher_build_for
from services.dispatcher.settings import load_settings as dispatcher_settings
from tests.conftest import client_tls, common_env, fanned_out
from tests.gateway import browser as b
from tests.gateway.conftest import Publish, Replica, StartReplica

DEAL = {"type": "deal", "id": "D-1"}


@pytest.fixture(scope="module")
async def dispatcher(
    database_url: str, token_keys: dict[str, bytes], preferences: service.Running
) -> AsyncIterator[service.Running]:
    """The real dispatcher (its FollowService and Publish), asking the session's preferences service."""
    settings = dispatcher_settings(
        common_env(
            database_url,
            token_keys,
            identity="dispatcher",
            BELFRY_PREFERENCES_ADDRESS=f"127.0.0.1:{preferences.port}",
        )
    )
    running = await service.start("dispatcher", settings.common, dispatcher_build_for(settings))
    yield running
    await running.stop(0.2)


@pytest.fixture
async def web(
    start_replica: StartReplica, preferences: service.Running, dispatcher: service.Running, account_id: str
) -> Replica:
    """A gateway wired to the preferences service and the dispatcher, the test user in the directory (the
    browser tests' ``context`` opens on it)."""
    await b.seed_user(preferences.port, account_id, "u1")
    return await start_replica(
        BELFRY_PREFERENCES_ADDRESS=f"127.0.0.1:{preferences.port}",
        BELFRY_DISPATCHER_ADDRESS=f"127.0.0.1:{dispatcher.port}",
    )


@pytest.fixture(autouse=True)
async def _leave_the_queue_as_found(account_id: str, pool: asyncpg.Pool) -> AsyncIterator[None]:
    """The dispatcher also queues this test's emails (no email sender runs here): removed afterwards."""
    yield
    await pool.execute("delete from queue.deliveries where account_id = $1", account_id)


class Mesh:
    """The dispatcher as a producer (Publish, GetNotification) and as the test user (ListFollows)."""

    def __init__(self, dispatcher: service.Running, issuer: TokenIssuer, account_id: str) -> None:
        self.channel = rpc.connect(f"127.0.0.1:{dispatcher.port}", client_tls())
        self.producer = dispatcher_pb2_grpc.DispatcherServiceStub(self.channel)
        self.follows = dispatcher_pb2_grpc.FollowServiceStub(self.channel)
        self.user = (("authorization", f"Bearer {issuer.issue(account_id, 'u1')}"),)
        self.account_id = account_id

    async def publish(self, pool: asyncpg.Pool, topic: str, title: str) -> str:
        """Tell u1 about the deal (named ``title`` this time); the notification id once fan-out has written it."""
        event = pb.Event(
            account_id=self.account_id,
            topic=topic,
            actor=pb.Actor(user_id="someone-else", source=pb.ACTOR_SOURCE_UI),
            object=pb.ObjectRef(
                type=DEAL["type"], id=DEAL["id"], display_name=title, url="https://app.example/deals/1"
            ),
            recipient_user_ids=["u1"],
            idempotency_key=uuid.uuid4().hex,
        )
        answer = await self.producer.Publish(pb.PublishRequest(event=event))
        await fanned_out(pool, self.account_id)
        return str(answer.notification_id)

    async def reason(self, notification_id: str) -> str:
        """Why u1 was not told ('' when told)."""
        found = await self.producer.GetNotification(
            pb.GetNotificationRequest(account_id=self.account_id, notification_id=notification_id)
        )
        (recipient,) = [r for r in found.notification.recipients if r.user_id == "u1"]
        return str(recipient.reason)

    async def listed(self) -> list[tuple[str, str, bool, bool]]:
        """u1's follows and mutes, as the dispatcher's store holds them."""
        answer = await self.follows.ListFollows(pb.ListFollowsRequest(), metadata=self.user)
        return [(f.object.type, f.object.id, f.following, f.muted) for f in answer.follows]


@pytest.fixture
async def mesh(dispatcher: service.Running, issuer: TokenIssuer, account_id: str) -> AsyncIterator[Mesh]:
    """Calls to the dispatcher behind the page."""
    found = Mesh(dispatcher, issuer, account_id)
    yield found
    await found.channel.close()


def _follow(answer: httpx.Response) -> tuple[str, str, bool, bool, str]:
    assert answer.status_code == 200, answer.text
    follow: dict[str, Any] = answer.json()["follow"]
    return follow["object"]["type"], follow["object"]["id"], follow["following"], follow["muted"], follow["source"]


# --- (a) the HTTP API ------------------------------------------------------------------------------
async def test_follow_mute_unmute_unfollow_and_list_through_the_gateway(
    web: Replica, mesh: Mesh, issuer: TokenIssuer, account_id: str
) -> None:
    headers = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
    deal = {"object": DEAL}
    async with httpx.AsyncClient(base_url=web.http, headers=headers) as http:
        assert _follow(await http.post("/api/follows/Follow", json=deal)) == ("deal", "D-1", True, False, "explicit")
        assert _follow(await http.post("/api/follows/Mute", json=deal)) == ("deal", "D-1", True, True, "explicit")
        assert await mesh.listed() == [("deal", "D-1", True, True)]  # the dispatcher's own store says so
        assert _follow(await http.post("/api/follows/Unmute", json=deal))[3] is False
        assert _follow(await http.post("/api/follows/Unfollow", json=deal))[2] is False
        for ticket in ("T-1", "T-2"):
            assert _follow(await http.post("/api/follows/Follow", json={"object": {"type": "ticket", "id": ticket}}))[2]
        first = await http.post("/api/follows/ListFollows", json={"page": {"page_size": 1}})
        assert first.status_code == 200, first.text
        rest = await http.post(
            "/api/follows/ListFollows", json={"page": {"page_size": 1, "page_token": first.json()["next_page_token"]}}
        )
        listed = [(f["object"]["type"], f["object"]["id"], f["following"], f["muted"]) for f in first.json()["follows"]]
        listed += [(f["object"]["type"], f["object"]["id"], f["following"], f["muted"]) for f in rest.json()["follows"]]
        # Neither followed nor muted any more, the deal is not listed.
        assert listed == [("ticket", "T-1", True, False), ("ticket", "T-2", True, False)]
        assert rest.json()["next_page_token"] == ""
    assert await mesh.listed() == [("ticket", "T-1", True, False), ("ticket", "T-2", True, False)]


async def test_the_follow_proxy_needs_a_token_and_passes_the_services_refusals_on(
    web: Replica, mesh: Mesh, issuer: TokenIssuer, account_id: str
) -> None:
    headers = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
    async with httpx.AsyncClient(base_url=web.http) as http:
        anonymous = await http.post("/api/follows/Mute", json={"object": DEAL})
        assert anonymous.status_code == 401
        no_type = await http.post("/api/follows/Mute", json={"object": {"id": "D-1"}}, headers=headers)
        assert no_type.status_code == 400
        assert no_type.json()["code"] == "INVALID_ARGUMENT"
        assert "object.type is required" in no_type.json()["error"]  # the dispatcher's own words
        wrong_shape = await http.post("/api/follows/Mute", json={"object": "deal:D-1"}, headers=headers)
        assert wrong_shape.status_code == 400
        bad_page = await http.post("/api/follows/ListFollows", json={"page": {"page_token": "nope"}}, headers=headers)
        assert bad_page.status_code == 400
        assert "page_token" in bad_page.json()["error"]
        # A record's followers are for producers and operators: not reachable from the web.
        internal = await http.post(
            "/api/follows/ListFollowers", json={"account_id": account_id, "object": DEAL}, headers=headers
        )
        assert internal.status_code == 400
        assert "ListFollowers" in internal.json()["error"]
    assert await mesh.listed() == []  # nothing refused was written


# --- (b) the web app ------------------------------------------------------------------------------
async def _open_menu(page: Page, title: str) -> None:
    row = page.locator("#feed li[data-id]", has_text=title)
    await row.locator(".more").click()
    await page.wait_for_selector("#feed .menu:not([hidden])")


@pytest.mark.browser
async def test_a_bell_item_about_one_record_mutes_and_unmutes_its_thread(
    web: Replica, context: BrowserContext, mesh: Mesh, issuer: TokenIssuer, account_id: str, pool: asyncpg.Pool
) -> None:
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))
    await mesh.publish(pool, "deals.stage_changed", "Acme renewal")
    await page.wait_for_selector("#badge:has-text('1')")
    await page.click("#bell")
    await _open_menu(page, "Acme renewal")
    row = page.locator("#feed li[data-id]", has_text="Acme renewal")
    labels = await row.locator("[role=menuitem]").all_inner_texts()
    assert labels[2:4] == ["Mute this thread", "Unfollow"]
    # By keyboard, as the other actions: the first entry has the focus, arrows move it.
    assert await page.evaluate("document.activeElement.dataset.action") == "read"
    await page.keyboard.press("ArrowDown")
    await page.keyboard.press("ArrowDown")
    assert await page.evaluate("document.activeElement.dataset.action") == "mute"
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#connection:has-text('Muted: you will hear nothing more about “Acme renewal”')")
    assert await page.locator("#connection").get_attribute("role") == "status"  # screen readers hear it
    assert await page.locator("#error").is_hidden()
    assert await mesh.listed() == [("deal", "D-1", False, True)]
    assert await page.evaluate("document.activeElement.classList.contains('more')")  # the keyboard stays on the row
    # The menu now offers the inverse: the answer said muted, and not followed (u1 was only named).
    await _open_menu(page, "Acme renewal")
    assert (await row.locator("[role=menuitem]").all_inner_texts())[2:4] == ["Unmute this thread", "Follow"]
    await page.keyboard.press("Escape")

    # Muted: the next change of the deal is not sent to u1; a locked topic about it still is.
    held = await mesh.publish(pool, "deals.stage_changed", "Held back")
    assert await mesh.reason(held) == "muted_by_recipient"
    assert (
        await pool.fetchval("select count(*) from queue.whole_deliveries where notification_id = $1", uuid.UUID(held))
        == 0
    )
    billed = await mesh.publish(pool, "account.billing", "Invoice 42")
    assert await mesh.reason(billed) == ""
    await page.wait_for_selector("#feed li[data-id]:has-text('Invoice 42')")
    assert await page.locator("#feed li[data-id]:has-text('Held back')").count() == 0

    await _open_menu(page, "Acme renewal")
    await row.locator("[data-action='unmute']").click()
    await page.wait_for_selector("#connection:has-text('Unmuted: you will hear about “Acme renewal” again.')")
    assert await mesh.listed() == []  # neither followed nor muted
    told = await mesh.publish(pool, "deals.stage_changed", "Heard again")
    assert await mesh.reason(told) == ""
    await page.wait_for_selector("#feed li[data-id]:has-text('Heard again')")


@pytest.mark.browser
async def test_unfollow_from_the_menu_and_mute_from_a_pop_up(
    web: Replica,
    context: BrowserContext,
    mesh: Mesh,
    issuer: TokenIssuer,
    account_id: str,
    publish: Publish,
) -> None:
    await mesh.follows.Follow(pb.FollowRequest(object=pb.FollowedObject(type="quote", id="Q-7")), metadata=mesh.user)
    page = await b.open_app(context, web.http, issuer.issue(account_id, "u1"))
    quote = {"type": "quote", "id": "Q-7", "display_name": "Quote Q-7", "url": "https://app.example/q/7"}
    other = {"type": "quote", "id": "Q-8", "display_name": "Quote Q-8", "url": "https://app.example/q/8"}
    await publish(account_id, "u1", "Quote Q-7 was updated", topic="academy.reward_updated", items=[quote])
    await publish(account_id, "u1", "2 quotes were updated", topic="academy.reward_updated", items=[quote, other])
    await page.wait_for_selector("#badge:has-text('2')")
    await page.click("#bell")
    # Several records: no single thread to mute or unfollow.
    await _open_menu(page, "2 quotes were updated")
    merged = page.locator("#feed li[data-id]", has_text="2 quotes were updated")
    assert await merged.locator("[data-action='mute'], [data-action='unfollow']").count() == 0
    await page.keyboard.press("Escape")
    await _open_menu(page, "Quote Q-7 was updated")
    single = page.locator("#feed li[data-id]", has_text="Quote Q-7 was updated")
    await single.locator("[data-action='unfollow']").click()
    await page.wait_for_selector("#connection:has-text('You no longer follow “Quote Q-7”.')")
    assert await mesh.listed() == []  # followed before, neither followed nor muted now

    # A pop-up about one record offers "Mute this thread".
    await publish(account_id, "u1", "Quote Q-8 was signed", topic="academy.reward_updated", items=[other], popup=True)
    toast = page.locator(".toast", has_text="Quote Q-8 was signed")
    await toast.locator(".mute-thread").click()
    await page.wait_for_selector("#connection:has-text('Muted: you will hear nothing more about “Quote Q-8”')")
    await toast.wait_for(state="detached")
    assert await mesh.listed() == [("quote", "Q-8", False, True)]
