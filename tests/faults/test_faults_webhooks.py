"""The webhooks sender, a real process, claiming one batch in which some endpoints are hostile.

Several accounts' deliveries are committed in one transaction, so one claim
takes them all. One account's endpoint answers normally; the others answer
``429`` with a ``Retry-After`` no sane server sends, or trickle a body one
byte at a time. The process must stay up, the normal delivery must be sent
without waiting for the others, each 429 must be due again no later than
the documented maximum (one hour by default) or be expired when that would
fall past its time to live, and a trickling send must end within its lease.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from belfry import rpc
from belfry.api.webhooks.v1 import webhooks_pb2 as pb
from belfry.api.webhooks.v1 import webhooks_pb2_grpc as pb_grpc
from belfry.auth import TokenIssuer
from belfry.queue import NewDelivery, enqueue

from tests.conftest import client_tls
from tests.email.email_helpers import message
from tests.faults.hostile import ABSURD_RETRY_AFTER, Answer, Behaviour, HostilePeer, SlowBody, too_many_requests
from tests.faults.ledger import fetch
from tests.faults.processes import SERVING, ServiceProcess
from tests.faults.senders import webhooks_process_env
from tests.push.fakes.tls import Pki, make_pki

MAX_RETRY_AFTER_SECONDS = 3600.0  # the documented default (BELFRY_MAX_RETRY_AFTER_SECONDS)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a certificate for localhost."""
    return make_pki(tmp_path_factory.mktemp("faults-pki"))


@pytest.fixture
async def peer(pki: Pki) -> AsyncIterator[HostilePeer]:
    """The hostile endpoint host over HTTPS: ``/good`` answers 200, ``/hostile/<i>`` a 429 with an absurd value."""
    routes: dict[str, Behaviour] = {"/good": Answer(200)}
    routes |= {f"/hostile/{i}": too_many_requests(value) for i, value in enumerate(ABSURD_RETRY_AFTER)}
    routes["/hostile/short-ttl"] = too_many_requests(ABSURD_RETRY_AFTER[0])
    async with HostilePeer(routes=routes, ssl_context=pki.server_context()) as server:
        yield server


async def connect(channel: grpc.aio.Channel, token_keys: dict[str, bytes], account_id: str, url: str) -> None:
    """Connect ``url`` as user u1 of ``account_id`` through the service's own API."""
    token = TokenIssuer(token_keys, "k1").issue(account_id, "u1")
    await pb_grpc.WebhooksStub(channel).ConnectWebhook(
        pb.ConnectWebhookRequest(url=url, label="fault test"), metadata=[("authorization", f"Bearer {token}")]
    )


async def test_an_absurd_retry_after_neither_stops_the_sender_nor_holds_back_another_account(
    database_url: str, pool: asyncpg.Pool, token_keys: dict[str, bytes], pki: Pki, peer: HostilePeer
) -> None:
    run = uuid.uuid4().hex[:8]
    good = f"acc_good_{run}"
    hostile = {f"/hostile/{i}": f"acc_hostile{i}_{run}" for i in range(len(ABSURD_RETRY_AFTER))}
    short_ttl = f"acc_short_{run}"  # its time to live ends before any clamped retry could come
    sender = await ServiceProcess.start("webhooks", webhooks_process_env(database_url, token_keys, pki, peer.port))
    try:
        async with rpc.connect(f"127.0.0.1:{sender.port}", client_tls()) as channel:
            await connect(channel, token_keys, good, peer.url("/good"))
            for path, account in hostile.items():
                await connect(channel, token_keys, account, peer.url(path))
            await connect(channel, token_keys, short_ttl, peer.url("/hostile/short-ttl"))
        now = datetime.now(UTC)
        accounts = [good, *hostile.values(), short_ttl]
        rows = [
            NewDelivery(
                account_id=account,
                notification_id=uuid.uuid4(),
                user_id="u1",
                channel="other_apps",
                topic="contacts.contact_assigned",
                payload=message(account).to_json(),
                expires_at=now + (timedelta(minutes=10) if account == short_ttl else timedelta(hours=2)),
            )
            for account in accounts
        ]
        async with pool.acquire() as conn, conn.transaction():  # one commit: one claim takes them all
            await enqueue(conn, rows)
        await peer.wait_for("/good")
        for path in [*hostile, "/hostile/short-ttl"]:
            await peer.wait_for(path)
        settled = await settled_rows(pool, accounts, sender)
        sender.assert_alive()
        assert await sender.health() == SERVING
    finally:
        await sender.stop()
    assert settled[good]["state"] == "sent", settled[good]
    for path, account in hostile.items():
        row = settled[account]
        assert "429" in row["errors"][-1]["error"], row
        if row["state"] == "queued":
            # Due again no later than the maximum after the answer was recorded.
            assert row["delay"] <= MAX_RETRY_AFTER_SECONDS, (path, peer.routes[path], row["delay"])
        else:
            assert row["state"] == "expired", row
    short = settled[short_ttl]
    assert short["state"] == "expired" or short["available_at"] <= short["expires_at"], short


async def settled_rows(
    pool: asyncpg.Pool, accounts: list[str], sender: ServiceProcess, rounds: int = 600
) -> dict[str, asyncpg.Record]:
    """Each account's delivery once its first outcome was recorded (a bounded wait, failing if the sender dies)."""
    for _ in range(rounds):
        sender.assert_alive()
        rows = await fetch(
            pool,
            """
            select account_id, state, errors, available_at, expires_at,
                   extract(epoch from available_at - (errors->-1->>'at')::timestamptz)::float8 as delay
            from queue.deliveries where account_id = any($1::text[]) and channel = 'other_apps'
            """,
            accounts,
        )
        done = {r["account_id"]: r for r in rows if r["state"] != "leased" and (r["state"] == "sent" or r["errors"])}
        if len(done) == len(accounts):
            return done
        await asyncio.sleep(0.05)
    raise AssertionError(f"not every delivery was settled: {[dict(r) for r in rows]}\n{sender.tail()}")


async def test_a_body_trickled_forever_holds_back_no_other_delivery(
    database_url: str, pool: asyncpg.Pool, token_keys: dict[str, bytes], pki: Pki, peer: HostilePeer
) -> None:
    """An endpoint that answers one byte every half second never trips a per-read timeout.

    Claimed in the same batch, the other account's delivery is sent and
    recorded while the slow one is still being read, and the slow send ends
    (to be retried) within its lease rather than holding its batch.
    """
    run = uuid.uuid4().hex[:8]
    good, slow = f"acc_good_{run}", f"acc_slow_{run}"
    peer.routes["/slow"] = SlowBody(size=10_000, chunk=1, interval=0.5)
    env = webhooks_process_env(database_url, token_keys, pki, peer.port, BELFRY_WEBHOOKS_LEASE_SECONDS="3")
    sender = await ServiceProcess.start("webhooks", env)
    try:
        async with rpc.connect(f"127.0.0.1:{sender.port}", client_tls()) as channel:
            await connect(channel, token_keys, good, peer.url("/good"))
            await connect(channel, token_keys, slow, peer.url("/slow"))
        expires = datetime.now(UTC) + timedelta(hours=2)
        async with pool.acquire() as conn, conn.transaction():  # one commit: one claim takes both
            await enqueue(
                conn,
                [
                    NewDelivery(
                        a, uuid.uuid4(), "u1", "other_apps", "contacts.contact_assigned", message(a).to_json(), expires
                    )
                    for a in (good, slow)
                ],
            )
        await peer.wait_for("/slow")
        rows = await settled_rows(pool, [good], sender)
        assert rows[good]["state"] == "sent", rows[good]
        still = await fetch(pool, "select state from queue.deliveries where account_id = $1", slow)
        assert still[0]["state"] == "leased"  # the good one did not wait for it
        ended = await settled_rows(pool, [slow], sender)
        assert ended[slow]["state"] == "queued", ended[slow]  # cut within its lease, to be tried again
        sender.assert_alive()
    finally:
        await sender.kill()
