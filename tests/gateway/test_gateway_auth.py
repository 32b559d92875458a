"""Websocket and HTTP authentication: bad tokens are closed before any data, Origins are checked."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import jwt
import pytest
import websockets
from belfry.auth import TokenIssuer
from websockets.typing import Origin

from tests.gateway.conftest import Publish, Replica, connect, frames_until


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(account_id: str) -> dict[str, object]:
    now = int(time.time())
    return {"iss": "belfry", "aud": "belfry", "acc": account_id, "sub": "u1", "iat": now, "exp": now + 600}


def bad_tokens(account_id: str, token_keys: dict[str, bytes]) -> dict[str, str]:
    """Tokens the gateway must refuse, by kind."""
    claims = _claims(account_id)
    return {
        "alg-none": f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': 'k1'})}.{_b64(claims)}.",
        "forged": jwt.encode(
            claims, b"an-attacker-secret-that-is-long-enough!!", algorithm="HS256", headers={"kid": "k1"}
        ),
        "unknown-kid": jwt.encode(claims, token_keys["k1"], algorithm="HS256", headers={"kid": "k9"}),
        "expired": TokenIssuer(token_keys, "k1").issue(account_id, "u1", now=time.time() - 3600),
        "garbage": "not-a-token",
        "empty": "",
    }


@pytest.mark.parametrize("kind", ["alg-none", "forged", "unknown-kid", "expired", "garbage", "empty"])
async def test_bad_tokens_are_closed_before_any_data(
    replica: Replica, token_keys: dict[str, bytes], publish: Publish, account_id: str, kind: str
) -> None:
    await publish(account_id, "u1", "secret title")
    ws = await connect(replica.ws, bad_tokens(account_id, token_keys)[kind], last_id=0)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()  # the first thing received is the close: no item, no count
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4401


async def test_first_message_must_be_auth(replica: Replica) -> None:
    ws = await websockets.connect(replica.ws)
    await ws.send(json.dumps({"type": "hello"}))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4401


async def test_rotated_key_is_accepted(replica: Replica, token_keys: dict[str, bytes], account_id: str) -> None:
    ws = await connect(replica.ws, TokenIssuer(token_keys, "k2").issue(account_id, "u1"))
    assert (await frames_until(ws, "ready"))[-1]["unread"] == 0
    await ws.close()


async def test_foreign_origin_is_refused_at_handshake(replica: Replica, issuer: TokenIssuer, account_id: str) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(replica.ws, origin=Origin("https://evil.example"))
    assert refused.value.response.status_code == 403
    ws = await websockets.connect(replica.ws, origin=Origin(replica.http))  # same origin is fine
    await ws.send(json.dumps({"type": "auth", "token": issuer.issue(account_id, "u1")}))
    await frames_until(ws, "ready")
    await ws.close()


async def test_allow_listed_origin_is_accepted(start_replica: object, issuer: TokenIssuer, account_id: str) -> None:
    replica = await start_replica(BELFRY_GATEWAY_ALLOWED_ORIGINS="https://app.example")  # type: ignore[operator]
    ws = await websockets.connect(replica.ws, origin=Origin("https://app.example"))
    await ws.send(json.dumps({"type": "auth", "token": issuer.issue(account_id, "u1")}))
    await frames_until(ws, "ready")
    await ws.close()


async def test_other_accounts_items_never_reach_a_tab(
    replica: Replica, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    other_account = account_id + "_other"
    ws = await connect(replica.ws, issuer.issue(account_id, "u1"))
    await frames_until(ws, "ready")
    await publish(other_account, "u1", "someone else's")  # same user id, another tenant
    await publish(account_id, "u1", "mine")
    frame = json.loads(await ws.recv())
    assert frame["item"]["title"] == "mine"
    async with httpx.AsyncClient(base_url=replica.http) as http:
        theirs = await http.get("/api/feed", headers={"authorization": f"Bearer {issuer.issue(other_account, 'u1')}"})
        their_id = theirs.json()["items"][0]["id"]
        mine = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
        # Feed ids are per user: the same number in this tenant is this tenant's item, never theirs.
        await http.post("/api/feed/mark", json={"ids": [their_id + 1000], "what": "read"}, headers=mine)
        assert (await http.get("/api/feed", headers={"authorization": theirs.request.headers["authorization"]})).json()[
            "unread"
        ] == 1
    await ws.close()


async def test_connection_closes_when_the_token_expires_unless_refreshed(
    replica: Replica, token_keys: dict[str, bytes], account_id: str
) -> None:
    short = TokenIssuer(token_keys, "k1", ttl_seconds=900)
    # Valid for half a second more (the verifier's leeway accepts it at connect).
    expiring = short.issue(account_id, "u1", now=time.time() - 899.5)
    ws = await connect(replica.ws, expiring)
    await frames_until(ws, "ready")
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4403

    first_expiry = time.time() + 1.5
    refreshed = await connect(replica.ws, short.issue(account_id, "u1", now=first_expiry - 900))
    await frames_until(refreshed, "ready")
    await refreshed.send(json.dumps({"type": "refresh", "token": short.issue(account_id, "u1")}))
    assert (await frames_until(refreshed, "refreshed"))[-1]["expires_at"] > first_expiry
    await asyncio.sleep(max(0.0, first_expiry - time.time()) + 0.2)  # past the first token's expiry
    await refreshed.ping()  # still open
    await refreshed.send(json.dumps({"type": "refresh", "token": short.issue(account_id, "someone-else")}))
    with pytest.raises(websockets.ConnectionClosed) as swapped:
        await refreshed.recv()
    assert swapped.value.rcvd is not None
    assert swapped.value.rcvd.code == 4401


async def test_http_api_needs_a_bearer_token(replica: Replica, token_keys: dict[str, bytes], account_id: str) -> None:
    async with httpx.AsyncClient(base_url=replica.http) as http:
        assert (await http.get("/api/feed")).status_code == 401
        for token in [t for t in bad_tokens(account_id, token_keys).values() if t]:
            answer = await http.get("/api/unread", headers={"authorization": f"Bearer {token}"})
            assert answer.status_code == 401
            assert answer.json()["error"]
        dev = await http.post("/api/dev/login")
        assert dev.status_code == 404  # off unless BELFRY_GATEWAY_DEV_LOGIN=true


@pytest.mark.parametrize("message", ["not json", b'{"type": "refresh"}'])
async def test_a_message_that_is_not_json_text_closes_the_tab_with_4400(
    replica: Replica, issuer: TokenIssuer, account_id: str, message: str | bytes
) -> None:
    ws = await connect(replica.ws, issuer.issue(account_id, "u1"))
    await frames_until(ws, "ready")
    await ws.send(message)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4400


async def test_a_tab_whose_token_expires_first_is_closed_first_whatever_the_order_of_joining(
    replica: Replica, token_keys: dict[str, bytes], account_id: str
) -> None:
    short = TokenIssuer(token_keys, "k1", ttl_seconds=900)
    # Tabs that come and go with long tokens, before and after: the expiry of the short one still fires.
    long_lived = await connect(replica.ws, short.issue(account_id, "u1"))
    await frames_until(long_lived, "ready")
    for i in range(80):
        churn = await connect(replica.ws, short.issue(account_id, f"c{i}"))
        await frames_until(churn, "ready")
        await churn.close()
    expiring = await connect(replica.ws, short.issue(account_id, "u2", now=time.time() - 899.5))
    await frames_until(expiring, "ready")
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await expiring.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4403
    await long_lived.ping()  # still open
    await long_lived.close()
