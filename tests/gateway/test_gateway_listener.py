"""The feed's LISTEN connection dropped by the database: tabs resume, and live items flow again."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
import websockets
from belfry.auth import TokenIssuer

from tests.gateway.conftest import Publish, Replica, connect, frames_until

_LISTENERS = """select coalesce(array_agg(pid), '{}') from pg_stat_activity
                where datname = current_database() and query = 'LISTEN "belfry_gateway_feed"'"""


async def _listeners(pool: asyncpg.Pool, *, besides: frozenset[int] = frozenset()) -> list[int]:
    """The backends listening for the feed, other than ``besides``, once there is one."""
    while not (pids := [p for p in await pool.fetchval(_LISTENERS) if p not in besides]):  # noqa: ASYNC110 - only the database knows
        await asyncio.sleep(0.02)
    return pids


async def test_a_lost_feed_listener_sends_tabs_to_resume_and_live_items_flow_again(
    replica: Replica, issuer: TokenIssuer, publish: Publish, pool: asyncpg.Pool, account_id: str
) -> None:
    token = issuer.issue(account_id, "u1")
    ws = await connect(replica.ws, token)
    await frames_until(ws, "ready")
    await publish(account_id, "u1", "before")
    first = json.loads(await asyncio.wait_for(ws.recv(), 30))
    # The database drops the listening connection (as a restart or a reset would).
    old = await asyncio.wait_for(_listeners(pool), 30)
    await pool.execute("select pg_terminate_backend(pid) from unnest($1::int[]) as pid", old)
    # An item lands while nobody listens: its NOTIFY is gone.
    await publish(account_id, "u1", "during")
    # Once the replica listens again, its tabs are sent to resume.
    await asyncio.wait_for(_listeners(pool, besides=frozenset(old)), 30)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    # The resume (or, if the sender stores it later, the live feed) brings the missed item.
    again = await connect(replica.ws, token, last_id=first["item"]["id"])
    frames = await asyncio.wait_for(frames_until(again, "ready"), 30)
    titles = [f["item"]["title"] for f in frames if f["type"] == "item"]
    if not titles:
        titles.append(json.loads(await asyncio.wait_for(again.recv(), 30))["item"]["title"])
    assert titles == ["during"]
    await publish(account_id, "u1", "after")
    frame = json.loads(await asyncio.wait_for(again.recv(), 30))
    assert frame["type"] == "item" and frame["item"]["title"] == "after"
    await again.close()


async def test_a_tab_learns_its_starting_point_only_while_the_replica_listens(
    replica: Replica, issuer: TokenIssuer, publish: Publish, account_id: str
) -> None:
    """Before its first LISTEN (a replica starting) a replica tells no tab where the feed stands: an item
    announced before the LISTEN would reach that tab neither live nor in its resume."""
    hub = replica.build.hub
    assert hub is not None
    # A replica serves HTTP before its LISTEN is in place (the window this closes; the fixture returns in it).
    await asyncio.wait_for(hub.listening.wait(), 30)
    hub.listening.clear()  # back to the moments before the replica's LISTEN
    try:
        ws = await connect(replica.ws, issuer.issue(account_id, "u1"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)  # no ready yet
        await publish(account_id, "u1", "meanwhile")
    finally:
        hub.listening.set()
    [ready] = await asyncio.wait_for(frames_until(ws, "ready"), 30)
    if ready["unread"] == 0:  # stored after the starting point: it comes live
        live = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert live["type"] == "item" and live["item"]["title"] == "meanwhile"
    else:  # stored before: counted in the starting point (the page loads it with the feed)
        assert ready["unread"] == 1 and ready["last_id"] == 1
    await ws.close()
