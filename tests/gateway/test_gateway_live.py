"""Live delivery, resume, two replicas, slow consumers and presence, over real websockets."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
import websockets
from belfry.auth import TokenIssuer
from belfry.queue import presence
from websockets.typing import Origin

from services.gateway.settings import WEBSOCKET_IMPLEMENTATIONS
from tests.gateway.conftest import Publish, Replica, StartReplica, connect, frames_until


async def test_item_reaches_every_tab_on_two_replicas(
    start_replica: StartReplica, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    one, two = await start_replica(), await start_replica()
    token = issuer.issue(account_id, "u1")
    tabs = [await connect(one.ws, token), await connect(two.ws, token), await connect(two.ws, token)]
    other = await connect(one.ws, issuer.issue(account_id, "u2"))
    for ws in [*tabs, other]:
        await frames_until(ws, "ready")
    await publish(account_id, "u1", "Ann mentioned you", popup=True, sound="chime")
    for ws in tabs:
        frame = json.loads(await ws.recv())
        assert frame["type"] == "item"
        assert frame["unread"] == 1
        assert frame["item"]["title"] == "Ann mentioned you"
        assert frame["item"]["popup"] is True
        assert frame["item"]["sound"] == "chime"
    await publish(account_id, "u2", "for u2")
    frame = json.loads(await other.recv())
    assert frame["item"]["title"] == "for u2"  # u2 never saw u1's item first
    for ws in [*tabs, other]:
        await ws.close()


async def test_merged_item_carries_count_and_items(
    replica: object, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    ws = await connect(replica.ws, issuer.issue(account_id, "u1"))  # type: ignore[attr-defined]
    await frames_until(ws, "ready")
    items = [{"type": "quote", "id": str(i), "display_name": f"Q{i}", "url": f"https://a/{i}"} for i in range(3)]
    await publish(account_id, "u1", "3 quotes assigned", items=items)
    frame = json.loads(await ws.recv())
    assert frame["item"]["count"] == 3
    assert [i["display_name"] for i in frame["item"]["items"]] == ["Q0", "Q1", "Q2"]
    await ws.close()


async def test_resume_sends_exactly_the_missed_items_in_order(
    replica: object, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    token = issuer.issue(account_id, "u1")
    ws = await connect(replica.ws, token)  # type: ignore[attr-defined]
    await frames_until(ws, "ready")
    await publish(account_id, "u1", "first")
    first = json.loads(await ws.recv())
    await ws.close()
    for title in ("second", "third", "fourth"):
        await publish(account_id, "u1", title)
    # A second tab, connected throughout, sees the three items live (in feed-id order:
    # the sender stores deliveries concurrently, so that need not be publish order).
    watcher = await connect(replica.ws, token, last_id=first["item"]["id"])  # type: ignore[attr-defined]
    live: list[str] = []
    while len(live) < 3:
        frame = json.loads(await watcher.recv())
        if frame["type"] == "item":
            live.append(frame["item"]["title"])
    resumed = await connect(replica.ws, token, last_id=first["item"]["id"])  # type: ignore[attr-defined]
    frames = await frames_until(resumed, "ready")
    titles = [f["item"]["title"] for f in frames if f["type"] == "item"]
    assert titles == live
    assert sorted(titles) == ["fourth", "second", "third"]
    ids = [f["item"]["id"] for f in frames if f["type"] == "item"]
    assert ids == sorted(ids)
    assert all(f.get("resumed") for f in frames if f["type"] == "item")
    await publish(account_id, "u1", "fifth")
    assert json.loads(await resumed.recv())["item"]["title"] == "fifth"  # nothing sent twice
    await resumed.close()
    await watcher.close()


async def test_resume_from_too_old_an_id_is_an_explicit_reset(
    start_replica: StartReplica, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    replica = await start_replica(BELFRY_GATEWAY_RESUME_LIMIT="2")
    token = issuer.issue(account_id, "u1")
    watcher = await connect(replica.ws, token)
    await frames_until(watcher, "ready")
    for title in ("a", "b", "c", "d"):
        await publish(account_id, "u1", title)
    while json.loads(await watcher.recv())["item"]["title"] != "d":
        pass
    stale = await connect(replica.ws, token, last_id=1)
    frames = await frames_until(stale, "reset")
    assert [f["type"] for f in frames] == ["reset"]
    assert frames[0]["last_id"] == 4
    future = await connect(replica.ws, token, last_id=99)
    assert [f["type"] for f in await frames_until(future, "reset")] == ["reset"]
    for ws in (watcher, stale, future):
        await ws.close()


@pytest.mark.parametrize("implementation", WEBSOCKET_IMPLEMENTATIONS)
async def test_slow_consumer_is_disconnected_and_others_get_everything(
    start_replica: StartReplica, issuer: TokenIssuer, publish: Publish, account_id: str, implementation: str
) -> None:
    # One delivery per claim: items arrive one by one, as in steady traffic, not as one burst.
    replica = await start_replica(
        BELFRY_GATEWAY_WEBSOCKET=implementation,
        BELFRY_GATEWAY_QUEUE_SIZE="32",
        BELFRY_GATEWAY_SEND_TIMEOUT_SECONDS="0.5",
        BELFRY_GATEWAY_BATCH="1",
        BELFRY_GATEWAY_CONCURRENCY="1",
    )
    token = issuer.issue(account_id, "u1")
    # The slow client stops reading: its library buffers one frame, then the socket buffers fill.
    slow = await connect(replica.ws, token, max_queue=1)
    await frames_until(slow, "ready")
    fast = await connect(replica.ws, token)
    await frames_until(fast, "ready")
    big = "x" * 60000
    total = 300

    async def read_fast() -> list[str]:
        return [json.loads(await fast.recv())["item"]["title"] for _ in range(total)]

    reader = asyncio.ensure_future(read_fast())
    for i in range(total):
        await publish(account_id, "u1", f"n{i}", body=big)
    assert await reader == [f"n{i}" for i in range(total)]
    got, closed = 0, None
    # The server drops the connection (its close frame may not fit in the full buffers either).
    try:
        while True:
            await slow.recv()
            got += 1
    except websockets.ConnectionClosed as exc:
        closed = exc
    assert closed is not None
    assert got < total
    assert closed.rcvd is None or closed.rcvd.code == 4408
    await fast.close()


async def test_presence_row_while_a_tab_is_open(
    replica: object, issuer: TokenIssuer, pool: asyncpg.Pool, account_id: str
) -> None:
    assert not await presence.has_live_tab(pool, account_id, "u1")
    ws = await connect(replica.ws, issuer.issue(account_id, "u1"))  # type: ignore[attr-defined]
    await frames_until(ws, "ready")
    assert await presence.has_live_tab(pool, account_id, "u1")
    await ws.close()
    for _ in range(200):  # the server notices the close asynchronously
        if not await presence.has_live_tab(pool, account_id, "u1"):
            break
        await asyncio.sleep(0.01)
    assert not await presence.has_live_tab(pool, account_id, "u1")


# What add_many does for one item, inside the caller's transaction: bump the user's counter, store the row.
_ADD_ONE = """
with bumped as (
    insert into gateway.feed_seq as s (account_id, user_id, last_id) values ($1, $2, 1)
    on conflict (account_id, user_id) do update set last_id = s.last_id + 1
    returning last_id
)
insert into gateway.feed (account_id, user_id, id, notification_id, topic, title, body, url,
                          in_feed, popup, browser, sound)
select $1, $2, last_id, gen_random_uuid(), 'conversation.mentioned', 'raced', 'raced', 'https://app.example/x',
       true, false, false, ''
from bumped
"""


async def test_ready_frame_counts_exactly_the_unread_items_up_to_its_last_id(
    replica: Replica, issuer: TokenIssuer, publish: Publish, pool: asyncpg.Pool, account_id: str
) -> None:
    token = issuer.issue(account_id, "u1")
    watcher = await connect(replica.ws, token)
    await frames_until(watcher, "ready")
    await publish(account_id, "u1", "before")
    await frames_until(watcher, "item")
    await watcher.close()
    # An item committed while a new tab reads its starting point: the writer holds the feed's counters
    # locked, so the gateway's read of them waits, and the item commits while it waits.
    async with pool.acquire() as writer, writer.transaction():
        await writer.execute("lock table gateway.feed_seq in access exclusive mode")
        tab = await connect(replica.ws, token)
        for _ in range(1000):
            if await pool.fetchval(
                "select count(*) from pg_stat_activity where $1 = any(pg_blocking_pids(pid))",
                writer.get_server_pid(),
            ):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the gateway never read the feed's position")
        await writer.execute(_ADD_ONE, account_id, "u1")
    [ready] = await frames_until(tab, "ready")
    await tab.close()
    unread_up_to_last_id = await pool.fetchval(
        """select count(*) from gateway.feed where account_id = $1 and user_id = 'u1' and id <= $2
             and in_feed and read_at is null and archived_at is null""",
        account_id,
        ready["last_id"],
    )
    assert ready["unread"] == unread_up_to_last_id, ready


@pytest.mark.parametrize("implementation", WEBSOCKET_IMPLEMENTATIONS)
async def test_each_websocket_implementation_serves_the_whole_protocol(
    start_replica: StartReplica, issuer: TokenIssuer, publish: Publish, account_id: str, implementation: str
) -> None:
    replica = await start_replica(BELFRY_GATEWAY_WEBSOCKET=implementation, BELFRY_GATEWAY_MAX_SOCKETS_PER_CLIENT="2")
    with pytest.raises(websockets.InvalidStatus) as foreign:
        await websockets.connect(replica.ws, origin=Origin("https://evil.example"))
    assert foreign.value.response.status_code == 403
    assert replica.build.http is not None  # serving: uvicorn loaded its websocket implementation
    loaded = replica.build.http.config.ws_protocol_class
    assert f".{implementation.replace('-', '_')}_impl" in loaded.__module__
    token = issuer.issue(account_id, "u1")
    ws = await connect(replica.ws, token)
    await frames_until(ws, "ready")
    await publish(account_id, "u1", "live")
    frame = json.loads(await ws.recv())
    assert (frame["type"], frame["item"]["title"]) == ("item", "live")
    await ws.send(json.dumps({"type": "refresh", "token": issuer.issue(account_id, "u1")}))
    await frames_until(ws, "refreshed")
    resumed = await connect(replica.ws, token, last_id=frame["item"]["id"] - 1)
    assert [f["type"] for f in await frames_until(resumed, "ready")] == ["item", "ready"]
    # Two sockets from this address: the third handshake is refused with 429 and Retry-After, never upgraded.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(replica.ws)
    assert refused.value.response.status_code == 429
    assert refused.value.response.headers["retry-after"] == "5"
    await resumed.close()
    await ws.send("not json")
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4400


async def test_presence_rows_outlive_their_ttl_while_the_tabs_stay(
    start_replica: StartReplica, issuer: TokenIssuer, pool: asyncpg.Pool, account_id: str
) -> None:
    """The replica refreshes every user's row (in chunked statements) before it expires; a closed tab's goes."""
    replica = await start_replica(BELFRY_GATEWAY_PRESENCE_TTL_SECONDS="0.5")
    users = [f"p{i}" for i in range(5)]
    tabs = []
    for user in users:
        tab = await connect(replica.ws, issuer.issue(account_id, user))
        await frames_until(tab, "ready")
        tabs.append(tab)
    await tabs[0].close()
    await asyncio.sleep(2.0)  # four times the TTL: only refreshed rows are still live
    live = [u for u in users if await presence.has_live_tab(pool, account_id, u)]
    assert live == users[1:]
    for tab in tabs[1:]:
        await tab.close()
