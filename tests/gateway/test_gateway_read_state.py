"""One read state across channels: unread/unarchive in the feed API, and the email's "open it" link.

The link is followed end to end: a real email sender sends the notification
to an SMTP capture server, the test takes the link out of the email and
follows it against a real gateway replica, whose bell feed holds the same
notification (delivered through the bell queue).
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest
from aiosmtpd.controller import Controller
from belfry import service
from belfry.auth import TokenIssuer
from belfry.openlink import OpenSigner
from belfry.unsubscribe import Links, Signer

from services.email.server import build_for as email_build_for
from services.email.settings import load_settings as email_settings
from services.gateway.openlink import destination
from tests.email.email_helpers import (
    UNSUBSCRIBE_KEY,
    Capture,
    email_env,
    enqueue_messages,
    message,
    wait_until_finished,
)
from tests.gateway.conftest import Publish, Replica, StartReplica, connect, frames_until

APP_ORIGIN = "https://app.belfry.test"  # the email sender's BELFRY_PUBLIC_URL, a configured link origin here


async def _feed(http: httpx.AsyncClient, **params: Any) -> dict[int, dict[str, Any]]:
    answer = await http.get("/api/feed", params=params)
    assert answer.status_code == 200
    return {i["id"]: i for i in answer.json()["items"]}


async def _wait_items(replica: Replica, issuer: TokenIssuer, account_id: str, user_id: str, count: int) -> list[int]:
    """The ids of the user's first ``count`` bell items, once the bell sender stored them."""
    ws = await connect(replica.ws, issuer.issue(account_id, user_id), last_id=0)
    ids: list[int] = []
    while len(ids) < count:
        frame = json.loads(await ws.recv())
        if frame["type"] == "item":
            ids.append(frame["item"]["id"])
    await ws.close()
    return ids


async def test_unread_and_unarchive_reverse_the_marks_on_own_items_only(
    replica: Replica, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    for i in range(3):
        await publish(account_id, "u1", f"n{i}")
    await publish(account_id, "u2", "someone else's")
    ids = await _wait_items(replica, issuer, account_id, "u1", 3)
    [other] = await _wait_items(replica, issuer, account_id, "u2", 1)
    mine = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
    theirs = {"authorization": f"Bearer {issuer.issue(account_id, 'u2')}"}
    async with httpx.AsyncClient(base_url=replica.http, headers=mine) as http:
        read = (await http.post("/api/feed/mark", json={"ids": ids[:2], "what": "read"})).json()
        assert read == {"changed": 2, "unread": 1}
        unread = (await http.post("/api/feed/mark", json={"ids": [ids[0]], "what": "unread"})).json()
        assert unread == {"changed": 1, "unread": 2}
        again = (await http.post("/api/feed/mark", json={"ids": [ids[0]], "what": "unread"})).json()
        assert again == {"changed": 0, "unread": 2}  # idempotent, like the marks
        items = await _feed(http)
        assert [items[i]["read"] for i in ids] == [False, True, False]

        archived = (await http.post("/api/feed/mark", json={"ids": [ids[2]], "what": "archive"})).json()
        assert archived == {"changed": 1, "unread": 1}
        assert ids[2] not in await _feed(http)
        back = (await http.post("/api/feed/mark", json={"ids": [ids[2]], "what": "unarchive"})).json()
        assert back == {"changed": 1, "unread": 2}
        items = await _feed(http)
        assert ids[2] in items and not items[ids[2]]["archived"]
        assert await _feed(http, archived=1) == {}

        # Another user's item: read it as that user, then try to reverse it as u1.
        async with httpx.AsyncClient(base_url=replica.http, headers=theirs) as as_u2:
            marked = await as_u2.post("/api/feed/mark", json={"ids": [other], "what": "read"})
            assert marked.json() == {"changed": 1, "unread": 0}
            await as_u2.post("/api/feed/mark", json={"ids": [other], "what": "archive"})
            for what in ("unread", "unarchive"):
                foreign = (await http.post("/api/feed/mark", json={"ids": [other], "what": what})).json()
                assert foreign["changed"] == 0
            assert (await as_u2.get("/api/unread")).json() == {"unread": 0}
            assert list(await _feed(as_u2, archived=1)) == [other]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ids": [1], "what": "unseen"}, "what"),
        ({"ids": [], "what": "unread"}, "ids"),
        ({"ids": ["1"], "what": "unarchive"}, "ids"),
        ({"ids": [-1], "what": "unread"}, "ids"),
        ({"ids": list(range(1, 502)), "what": "unread"}, "ids"),
    ],
)
async def test_bad_unmark_requests_are_refused_and_change_nothing(
    replica: Replica, issuer: TokenIssuer, publish: Publish, account_id: str, body: dict[str, object], field: str
) -> None:
    await publish(account_id, "u1", "stays read")
    [feed_id] = await _wait_items(replica, issuer, account_id, "u1", 1)
    headers = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
    async with httpx.AsyncClient(base_url=replica.http, headers=headers) as http:
        await http.post("/api/feed/mark", json={"ids": [feed_id], "what": "read"})
        answer = await http.post("/api/feed/mark", json=body)
        assert answer.status_code == 400
        assert answer.json()["field"] == field
        assert (await http.get("/api/unread")).json() == {"unread": 0}
        foreign = await http.post(
            "/api/feed/mark", json={"ids": [feed_id], "what": "unread"}, headers={"origin": "https://evil.example"}
        )
        assert foreign.status_code == 403
        assert (await http.get("/api/unread")).json() == {"unread": 0}


async def test_an_app_that_opened_a_push_marks_its_notification_read_by_id(
    replica: Replica, issuer: TokenIssuer, publish: Publish, account_id: str, pool: asyncpg.Pool
) -> None:
    await publish(account_id, "u1", "opened on the phone")
    await publish(account_id, "u2", "someone else's")
    [mine] = await _wait_items(replica, issuer, account_id, "u1", 1)
    [theirs] = await _wait_items(replica, issuer, account_id, "u2", 1)
    ids = {
        r["user_id"]: str(r["notification_id"])
        for r in await pool.fetch("select user_id, notification_id from gateway.feed where account_id = $1", account_id)
    }
    assert mine and theirs
    headers = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
    async with httpx.AsyncClient(base_url=replica.http, headers=headers) as http:
        assert (await http.post("/api/feed/open", json={"notification_id": ids["u2"]})).json() == {
            "changed": 0,
            "unread": 1,
        }  # another user's notification: nothing changes
        opened = await http.post("/api/feed/open", json={"notification_id": ids["u1"]})
        assert opened.json() == {"changed": 1, "unread": 0}
        bad = await http.post("/api/feed/open", json={"notification_id": "42"})
        assert bad.status_code == 400 and bad.json()["field"] == "notification_id"
    # The user's phones will hear of it: one badge update queued (services.mobile sets their badge).
    badges = await pool.fetchval(
        "select count(*) from queue.deliveries where account_id = $1 and user_id = 'u1' and topic = 'belfry.badge'",
        account_id,
    )
    assert badges == 1


async def test_the_new_unread_count_is_pushed_to_tabs_on_unread_and_unarchive(
    replica: Replica, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    token = issuer.issue(account_id, "u1")
    ws = await connect(replica.ws, token)
    await frames_until(ws, "ready")
    await publish(account_id, "u1", "one")
    feed_id = json.loads(await ws.recv())["item"]["id"]
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=replica.http, headers=headers) as http:
        for what, count in (("read", 0), ("unread", 1), ("archive", 0), ("unarchive", 1)):
            await http.post("/api/feed/mark", json={"ids": [feed_id], "what": what})
            assert json.loads(await ws.recv()) == {"type": "unread", "unread": count}
    await ws.close()


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("https://app.belfry.test/contacts/42", "https://app.belfry.test/contacts/42"),  # a configured link origin
        ("http://127.0.0.1:8080/x?y=1", "http://127.0.0.1:8080/x?y=1"),  # the app's own origin
        ("/contacts/42", "/contacts/42"),  # a path of the app
        ("https://evil.example/phish", "/"),
        ("https://app.belfry.test.evil.example/", "/"),
        ("https://app.belfry.test@evil.example/", "/"),
        ("http://app.belfry.test/contacts/42", "/"),  # another scheme is another origin
        ("//evil.example/x", "/"),
        ("/\\evil.example/x", "/"),
        ("/\t/evil.example/x", "/"),
        ("javascript:alert(1)", "/"),
        ("", "/"),
    ],
)
def test_the_redirect_target_follows_the_service_worker_rule(target: str, expected: str) -> None:
    assert destination(target, "http://127.0.0.1:8080", frozenset({APP_ORIGIN})) == expected


@pytest.fixture
def smtp() -> Iterator[tuple[Capture, int]]:
    """A real SMTP server (aiosmtpd) keeping every message."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    capture = Capture()
    controller = Controller(capture, hostname="127.0.0.1", port=port)
    controller.start()
    yield capture, port
    controller.stop()


@pytest.fixture
async def email_sender(
    database_url: str, token_keys: dict[str, bytes], smtp: tuple[Capture, int]
) -> AsyncIterator[service.Running]:
    """The real email service on this area's database, sending to the capture server."""
    settings = email_settings(email_env(database_url, token_keys, smtp[1]))
    started = await service.start("email", settings.common, email_build_for(settings))
    yield started
    await started.stop(0.1)


def _open_link(mail: EmailMessage) -> str:
    """The "open it" link of the text part, which the HTML part must carry as well."""
    text = mail.get_body(preferencelist=("plain",))
    page = mail.get_body(preferencelist=("html",))
    assert text is not None and page is not None
    [line] = [line for line in str(text.get_content()).splitlines() if line.startswith("Open it: ")]
    link = line.removeprefix("Open it: ")
    assert f'href="{link.replace("&", "&amp;")}"' in str(page.get_content())
    return link


def _token(link: str) -> str:
    parts = urlsplit(link)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{APP_ORIGIN}/open"
    return parse_qs(parts.query)["t"][0]


def _tampered(token: str, claims: dict[str, str]) -> str:
    """The token with some claims changed and its signature kept."""
    body, _, mac = token.partition(".")
    decoded = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) | claims
    forged = base64.urlsafe_b64encode(json.dumps(decoded, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{forged}.{mac}"


async def _email_links(pool: asyncpg.Pool, capture: Capture, account_id: str, urls: dict[str, str]) -> dict[str, str]:
    """Email each notification (id → object URL) through the real sender; each one's "open it" link."""
    messages = [
        message(account_id, "u1", notification_id=n, url=url, recipient_email=f"u1-{n}@example.test")
        for n, url in urls.items()
    ]
    await enqueue_messages(pool, messages)
    rows = await wait_until_finished(pool, account_id, len(messages))
    assert sorted(r["state"] for r in rows) == ["sent"] * len(messages)
    links = {}
    for n in urls:
        [caught] = [c for c in capture.snapshot() if c.rcpt_tos == [f"u1-{n}@example.test"]]
        links[n] = _open_link(caught.parsed)
    return links


async def test_the_email_open_link_marks_the_bell_item_read_then_redirects(
    start_replica: StartReplica,
    email_sender: service.Running,
    smtp: tuple[Capture, int],
    pool: asyncpg.Pool,
    issuer: TokenIssuer,
    publish: Publish,
    account_id: str,
) -> None:
    capture, _ = smtp
    replica = await start_replica(BELFRY_UNSUBSCRIBE_KEY=UNSUBSCRIBE_KEY, BELFRY_GATEWAY_LINK_ORIGINS=APP_ORIGIN)
    target = f"{APP_ORIGIN}/contacts/42"
    foreign = "https://evil.example/phish"
    token = issuer.issue(account_id, "u1")
    ws = await connect(replica.ws, token)
    await frames_until(ws, "ready")
    wanted = await publish(account_id, "u1", "assigned", url=target)
    elsewhere = await publish(account_id, "u1", "elsewhere", url=foreign)
    other = await publish(account_id, "u1", "stays unread")
    for _ in range(3):
        assert json.loads(await ws.recv())["type"] == "item"
    links = await _email_links(pool, capture, account_id, {wanted: target, elsewhere: foreign})
    link, foreign_link = links[wanted], links[elsewhere]
    signed = _token(link)
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=replica.http) as web:

        async def read_state() -> dict[str, bool]:
            items = (await web.get("/api/feed", headers=headers)).json()["items"]
            return {i["notification_id"]: i["read"] for i in items}

        unchanged = {wanted: False, elsewhere: False, other: False}
        assert await read_state() == unchanged

        # Tampered: another notification or another target under the original signature.
        for bad in (
            _tampered(signed, {"n": other}),
            _tampered(signed, {"l": foreign}),
            signed[:-4] + ("AAAA" if not signed.endswith("AAAA") else "BBBB"),
            "",
        ):
            refused = await web.get("/open", params={"t": bad})
            assert refused.status_code == 400 and "not valid" in refused.text
            assert "location" not in refused.headers
        # Expired: signed with the sender's key an hour before it was due.
        stale = OpenSigner(Links(UNSUBSCRIBE_KEY.encode(), ttl_seconds=3600, clock=lambda: time.time() - 7200))
        expired = await web.get("/open", params={"t": stale.token(account_id, "u1", wanted, target)})
        assert expired.status_code == 400 and "expired" in expired.text
        # An unsubscribe token is not an open token, nor the reverse.
        unsubscribe = Signer(UNSUBSCRIBE_KEY.encode(), ttl_seconds=3600).token(account_id, "u1", "x")
        assert (await web.get("/open", params={"t": unsubscribe})).status_code == 400
        assert (await web.get("/email/unsubscribe", params={"t": signed})).status_code == 400
        assert await read_state() == unchanged
        assert (await web.get("/api/unread", headers=headers)).json() == {"unread": 3}

        # The real link: read in the bell feed, the tab told the new count, then off to the object.
        opened = await web.get(f"/open?{urlsplit(link).query}")
        assert opened.status_code == 303
        assert opened.headers["location"] == target
        assert json.loads(await ws.recv()) == {"type": "unread", "unread": 2}
        assert await read_state() == {wanted: True, elsewhere: False, other: False}
        assert (await web.get("/api/unread", headers=headers)).json() == {"unread": 2}
        # Following it again changes nothing and still redirects.
        again = await web.get(f"/open?{urlsplit(link).query}")
        assert (again.status_code, again.headers["location"]) == (303, target)

        # A foreign target: the notification is read (the link is genuine) but the redirect is to the app.
        away = await web.get(f"/open?{urlsplit(foreign_link).query}")
        assert (away.status_code, away.headers["location"]) == (303, "/")
        assert json.loads(await ws.recv()) == {"type": "unread", "unread": 1}
        assert await read_state() == {wanted: True, elsewhere: True, other: False}
    await ws.close()
