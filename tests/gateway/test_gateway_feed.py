"""The feed's HTTP API: paging, unread count, read/seen/archive, read-all, validation, dev login."""

from __future__ import annotations

import json

import httpx
import pytest
from belfry.auth import TokenIssuer, TokenVerifier

from tests.gateway.conftest import Publish, Replica, StartReplica, connect, frames_until


async def _stored(replica: Replica, issuer: TokenIssuer, account_id: str, count: int) -> None:
    ws = await connect(replica.ws, issuer.issue(account_id, "u1"), last_id=0)
    seen = 0
    while seen < count:
        frame = json.loads(await ws.recv())
        seen += frame["type"] == "item"
    await ws.close()


async def test_paging_marks_and_counts(
    replica: Replica, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    for i in range(5):
        await publish(account_id, "u1", f"n{i}")
    await publish(account_id, "u1", "popup only", bell=False, popup=True)
    await _stored(replica, issuer, account_id, 6)
    headers = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
    async with httpx.AsyncClient(base_url=replica.http, headers=headers) as http:
        first = (await http.get("/api/feed", params={"limit": 3})).json()
        assert first["unread"] == 5  # the pop-up-only message is not in the feed
        ids = [i["id"] for i in first["items"]]
        assert ids == sorted(ids, reverse=True)
        second = (await http.get("/api/feed", params={"limit": 3, "before": first["next_before"]})).json()
        assert len(second["items"]) == 2
        assert second["next_before"] is None
        every = [*first["items"], *second["items"]]
        assert sorted(i["title"] for i in every) == [f"n{i}" for i in range(5)]

        marked = (await http.post("/api/feed/mark", json={"ids": ids[:2], "what": "read"})).json()
        assert marked == {"changed": 2, "unread": 3}
        again = (await http.post("/api/feed/mark", json={"ids": ids[:2], "what": "read"})).json()
        assert again["changed"] == 0  # idempotent
        await http.post("/api/feed/mark", json={"ids": [ids[2]], "what": "archive"})
        assert (await http.get("/api/unread")).json() == {"unread": 2}
        archived = (await http.get("/api/feed", params={"archived": 1})).json()["items"]
        assert [i["id"] for i in archived] == [ids[2]]
        assert ids[2] not in [i["id"] for i in (await http.get("/api/feed")).json()["items"]]
        seen = (await http.post("/api/feed/mark", json={"ids": ids, "what": "seen"})).json()
        assert seen["changed"] == 3
        assert (await http.post("/api/feed/read-all", json={})).json()["unread"] == 0
        assert (await http.get("/api/unread")).json() == {"unread": 0}


async def test_unread_count_is_pushed_to_other_tabs(
    replica: Replica, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    token = issuer.issue(account_id, "u1")
    ws = await connect(replica.ws, token)
    await frames_until(ws, "ready")
    await publish(account_id, "u1", "one")
    item = json.loads(await ws.recv())["item"]
    async with httpx.AsyncClient(base_url=replica.http) as http:
        await http.post(
            "/api/feed/mark", json={"ids": [item["id"]], "what": "read"}, headers={"authorization": f"Bearer {token}"}
        )
    assert json.loads(await ws.recv()) == {"type": "unread", "unread": 0}
    await ws.close()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ids": [1], "what": "delete"}, "what"),
        ({"ids": [], "what": "read"}, "ids"),
        ({"ids": ["1"], "what": "read"}, "ids"),
        ({"ids": [0], "what": "read"}, "ids"),
        ({"ids": list(range(1, 502)), "what": "read"}, "ids"),
    ],
)
async def test_bad_mark_requests_are_refused_and_change_nothing(
    replica: Replica, issuer: TokenIssuer, publish: Publish, account_id: str, body: dict[str, object], field: str
) -> None:
    await publish(account_id, "u1", "keep me unread")
    await _stored(replica, issuer, account_id, 1)
    headers = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
    async with httpx.AsyncClient(base_url=replica.http, headers=headers) as http:
        answer = await http.post("/api/feed/mark", json=body)
        assert answer.status_code == 400
        assert answer.json()["field"] == field
        assert (await http.get("/api/unread")).json() == {"unread": 1}
        bad_limit = await http.get("/api/feed", params={"limit": 1000})
        assert bad_limit.status_code == 400
        assert "limit" in bad_limit.json()["error"]
        not_json = await http.post("/api/feed/mark", content=b"{", headers={"content-type": "application/json"})
        assert not_json.status_code == 400


async def test_state_changes_from_a_foreign_origin_are_refused(
    replica: Replica, issuer: TokenIssuer, account_id: str
) -> None:
    headers = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}", "origin": "https://evil.example"}
    async with httpx.AsyncClient(base_url=replica.http) as http:
        answer = await http.post("/api/feed/read-all", json={}, headers=headers)
        assert answer.status_code == 403


async def test_pages_carry_a_strict_content_security_policy(replica: Replica) -> None:
    async with httpx.AsyncClient(base_url=replica.http) as http:
        for path in ("/", "/settings", "/admin", "/static/app.js", "/sw.js"):
            answer = await http.get(path)
            assert answer.status_code == 200, path
            csp = answer.headers["content-security-policy"]
            assert "script-src 'self'" in csp
            assert "unsafe-inline" not in csp
            # Websockets to this origin only: no "ws:"/"wss:" scheme source that lets any host in.
            directives = dict(d.strip().partition(" ")[::2] for d in csp.split(";"))
            assert directives["connect-src"] == "'self'", directives["connect-src"]
        assert "<script>" not in (await http.get("/")).text  # no inline script anywhere


async def test_dev_login_issues_a_token_for_the_demo_user_only_when_enabled(
    start_replica: StartReplica, token_keys: dict[str, bytes], account_id: str
) -> None:
    replica = await start_replica(
        BELFRY_GATEWAY_DEV_LOGIN="true", BELFRY_DEMO_ACCOUNT=account_id, BELFRY_DEMO_USER="alice"
    )
    async with httpx.AsyncClient(base_url=replica.http) as http:
        answer = (await http.post("/api/dev/login")).json()
    caller, _ = TokenVerifier(token_keys).verify(answer["token"])
    assert (caller.account_id, caller.user_id) == (account_id, "alice")
