"""The webhook-secret sealing key rotates without downtime while deliveries flow (issue 17, section 5)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import uuid

import asyncpg
from belfry import service
from belfry.api.webhooks.v1 import webhooks_pb2 as pb
from belfry.api.webhooks.v1 import webhooks_pb2_grpc as pb_grpc
from cryptography.exceptions import InvalidTag

from services.webhooks.server import build_for
from services.webhooks.settings import load_settings
from services.webhooks.signing import SecretBox
from tests.conftest import acting_channel, common_env
from tests.push.conftest import enqueue_message, message, token_for
from tests.push.fakes.http import serve_tls
from tests.push.fakes.receiver import Receiver
from tests.push.fakes.tls import Pki

OLD, NEW = os.urandom(32), os.urandom(32)


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


async def _sealed(pool: asyncpg.Pool, account_id: str, webhook_id: str) -> bytes:
    sealed: bytes = await pool.fetchval(
        "select secret_ciphertext from webhooks.endpoints where account_id = $1 and webhook_id = $2",
        account_id,
        uuid.UUID(webhook_id),
    )
    return sealed


async def test_the_sealing_key_rotates_while_deliveries_flow(
    database_url: str, token_keys: dict[str, bytes], pki: Pki, pool: asyncpg.Pool, account_id: str
) -> None:
    receiver = Receiver()
    async with serve_tls(receiver.app, pki) as port:

        async def start(key: bytes, *others: bytes) -> service.Running:
            env = common_env(
                database_url,
                token_keys,
                BELFRY_WEBHOOKS_ALLOWED_PORTS=str(port),
                BELFRY_WEBHOOKS_ALLOW_NETWORKS="127.0.0.0/8",
                BELFRY_WEBHOOKS_CA_FILE=str(pki.ca_file),
                BELFRY_WEBHOOK_SECRET_KEY=_b64(key),
                BELFRY_WEBHOOK_SECRET_OTHER_KEYS=",".join(_b64(k) for k in others),
            )
            settings = load_settings(env)
            return await service.start("webhooks", settings.common, build_for(settings))

        first = await start(OLD)
        path = f"/hooks/{uuid.uuid4().hex}"
        async with acting_channel(f"127.0.0.1:{first.port}") as channel:
            reply = await pb_grpc.WebhooksStub(channel).ConnectWebhook(
                pb.ConnectWebhookRequest(url=f"https://localhost:{port}{path}", label="ops"),
                metadata=token_for(token_keys, account_id, "u1"),
            )
        receiver.secrets[path] = reply.signing_secret  # the receiver checks every signature with it
        webhook_id = reply.webhook.webhook_id
        enqueued: list[str] = []
        flowing = True

        async def produce() -> None:
            while flowing:
                msg = message(account_id, "u1")
                await enqueue_message(pool, "other_apps", msg)
                enqueued.append(msg.notification_id)
                await asyncio.sleep(0.02)

        producer = asyncio.ensure_future(produce())
        running = [first]
        try:
            # Step 1: the new key is held everywhere, nothing seals with it yet (new replica first).
            running.append(await start(OLD, NEW))
            await running.pop(0).stop(0.5)
            # Step 2: the new key seals, the old one still opens; the replica re-seals what it finds.
            running.append(await start(NEW, OLD))
            await running.pop(0).stop(0.5)
            async with asyncio.timeout(60):  # a hang guard: the re-seal pass runs at start
                while True:
                    try:
                        SecretBox(NEW).open(await _sealed(pool, account_id, webhook_id), account_id, webhook_id)
                        break
                    except InvalidTag:  # until the re-seal pass reached the row
                        await asyncio.sleep(0.02)
            # Step 3: the old key is dropped; secrets open under the new one alone.
            running.append(await start(NEW))
            await running.pop(0).stop(0.5)
            received = len(receiver.received)
            while len(receiver.received) < received + 3:  # noqa: ASYNC110 - the receiver has no event to wait on
                await asyncio.sleep(0.02)
        finally:
            flowing = False
            await producer
        try:
            while await pool.fetchval(  # noqa: ASYNC110 - deliveries settle in the database
                "select count(*) from queue.deliveries where account_id = $1 and state in ('queued', 'leased')",
                account_id,
            ):
                await asyncio.sleep(0.02)
        finally:
            for replica in running:
                with contextlib.suppress(Exception):
                    await replica.stop(0.5)
    states = await pool.fetch(
        "select state, count(*) from queue.deliveries where account_id = $1 group by state", account_id
    )
    assert {r["state"]: r["count"] for r in states} == {"sent": len(enqueued)}
    assert receiver.bad_signatures == []  # every POST carried the one secret, whichever key sealed it
    delivered = {d.document["notification_id"] for d in receiver.received if d.path == path}
    assert delivered == set(enqueued)
