"""Webhooks: signed deliveries, secrets sealed at rest, the response matrix, Slack bodies, the guard."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from belfry import rpc, service, ssrf
from belfry.api.webhooks.v1 import webhooks_pb2 as pb
from belfry.api.webhooks.v1 import webhooks_pb2_grpc as pb_grpc
from belfry.message import Item
from belfry.queue import Drop, Fail, Retry, Sent
from cryptography.exceptions import InvalidTag

from services.webhooks import body
from services.webhooks.sender import WebhookSender
from services.webhooks.server import build_for
from services.webhooks.settings import load_settings
from services.webhooks.signing import SecretBox
from tests.conftest import client_tls, common_env
from tests.push.conftest import enqueue_message, message, token_for
from tests.push.fakes.http import serve_tls
from tests.push.fakes.receiver import Receiver
from tests.push.fakes.tls import Pki
from tests.push.push_helpers import lease_for, settled

KEY = base64.b64encode(os.urandom(32)).decode()


@pytest.fixture(scope="session")
async def receiver(pki: Pki) -> AsyncIterator[tuple[Receiver, int]]:
    """The loopback HTTPS receiver and its port."""
    fake = Receiver()
    async with serve_tls(fake.app, pki) as port:
        yield fake, port


@pytest.fixture(scope="session")
async def webhooks(
    database_url: str, token_keys: dict[str, bytes], pki: Pki, receiver: tuple[Receiver, int]
) -> AsyncIterator[service.Running]:
    """The webhooks service, allowed to reach the loopback receiver."""
    env = common_env(
        database_url,
        token_keys,
        identity="webhooks",
        BELFRY_WEBHOOKS_ALLOWED_PORTS=f"443,{receiver[1]}",
        BELFRY_WEBHOOKS_ALLOW_NETWORKS="127.0.0.0/8",
        BELFRY_WEBHOOKS_CA_FILE=str(pki.ca_file),
        BELFRY_WEBHOOK_SECRET_KEY=KEY,
    )
    settings = load_settings(env)
    running = await service.start("webhooks", settings.common, build_for(settings))
    yield running
    await running.stop(0.1)


@pytest.fixture
async def stub(webhooks: service.Running) -> AsyncIterator[pb_grpc.WebhooksStub]:
    """A client of the Webhooks API."""
    async with rpc.connect(f"127.0.0.1:{webhooks.port}", client_tls()) as ch:
        yield pb_grpc.WebhooksStub(ch)


async def connect(
    stub: pb_grpc.WebhooksStub, receiver: tuple[Receiver, int], token_keys: dict[str, bytes], account_id: str
) -> tuple[str, pb.ConnectWebhookResponse]:
    """Connect a fresh receiver path for user u1; → (path, reply)."""
    path = f"/hooks/{uuid.uuid4().hex}"
    reply = await stub.ConnectWebhook(
        pb.ConnectWebhookRequest(url=f"https://localhost:{receiver[1]}{path}", label="ops"),
        metadata=token_for(token_keys, account_id, "u1"),
    )
    return path, reply


async def test_a_delivery_is_posted_signed_and_the_secret_is_sealed_at_rest(
    stub: pb_grpc.WebhooksStub,
    receiver: tuple[Receiver, int],
    pool: asyncpg.Pool,
    token_keys: dict[str, bytes],
    account_id: str,
) -> None:
    path, reply = await connect(stub, receiver, token_keys, account_id)
    receiver[0].secrets[path] = reply.signing_secret
    msg = message(account_id, "u1")
    await enqueue_message(pool, "other_apps", msg)
    row = await settled(pool, msg, "other_apps")
    assert row["state"] == "sent", row["errors"]
    got = [d for d in receiver[0].received if d.path == path]
    assert len(got) == 1
    assert path not in receiver[0].bad_signatures
    assert got[0].document["notification_id"] == msg.notification_id
    assert got[0].document["body"] == msg.body
    assert got[0].headers["content-type"].startswith("application/json")
    sealed = await pool.fetchval(
        "select secret_ciphertext from webhooks.endpoints where account_id = $1 and webhook_id = $2",
        account_id,
        uuid.UUID(reply.webhook.webhook_id),
    )
    assert reply.signing_secret.encode() not in sealed
    box = SecretBox(base64.b64decode(KEY))
    assert box.open(sealed, account_id, reply.webhook.webhook_id) == reply.signing_secret
    with pytest.raises(InvalidTag):  # a sealed secret copied onto another row does not open
        box.open(sealed, account_id, str(uuid.uuid4()))


async def test_a_wrong_secret_fails_the_receivers_check(
    stub: pb_grpc.WebhooksStub,
    receiver: tuple[Receiver, int],
    pool: asyncpg.Pool,
    token_keys: dict[str, bytes],
    account_id: str,
) -> None:
    """The receiver's check is real: with another secret it refuses (and we record a permanent failure)."""
    path, _ = await connect(stub, receiver, token_keys, account_id)
    receiver[0].secrets[path] = "whsec_not-the-right-one"
    msg = message(account_id, "u1")
    await enqueue_message(pool, "other_apps", msg)
    row = await settled(pool, msg, "other_apps")
    assert row["state"] == "dead"
    assert path in receiver[0].bad_signatures


@pytest.fixture
async def sender(pool: asyncpg.Pool, pki: Pki, receiver: tuple[Receiver, int]) -> AsyncIterator[WebhookSender]:
    """The service's sender code outside the loop, for the matrix."""
    policy = ssrf.Policy(allowed_ports=(receiver[1],), allowed_networks=ssrf.parse_networks("127.0.0.0/8"))
    client = ssrf.client(ca_file=pki.ca_file)
    yield WebhookSender(pool=pool, client=client, guard=ssrf.Guard(policy), box=SecretBox(base64.b64decode(KEY)))
    await client.aclose()


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retry_after", "disabled"),
    [
        (200, {}, Sent, None, False),
        (204, {}, Sent, None, False),
        (410, {}, Fail, None, True),
        (429, {"retry-after": "90"}, Retry, 90.0, False),
        (500, {}, Retry, None, False),
        (503, {"retry-after": "7"}, Retry, 7.0, False),
        (400, {}, Fail, None, False),
        (301, {"location": "https://169.254.169.254/"}, Fail, None, False),
    ],
)
async def test_endpoint_answers(
    sender: WebhookSender,
    stub: pb_grpc.WebhooksStub,
    receiver: tuple[Receiver, int],
    token_keys: dict[str, bytes],
    account_id: str,
    status: int,
    headers: dict[str, str],
    kind: type,
    retry_after: float | None,
    disabled: bool,
) -> None:
    path, _ = await connect(stub, receiver, token_keys, account_id)
    receiver[0].scripted[path] = [(status, headers)]
    outcome = await sender.handle(lease_for(message(account_id, "u1"), "other_apps"))
    assert isinstance(outcome, kind)
    if isinstance(outcome, Retry):
        assert outcome.retry_after == retry_after
    assert len([d for d in receiver[0].received if d.path == path]) == 1  # no redirect followed
    listed = await stub.ListWebhooks(pb.ListWebhooksRequest(), metadata=token_for(token_keys, account_id, "u1"))
    assert listed.webhooks[0].disabled is disabled
    if disabled:
        assert "410" in listed.webhooks[0].disabled_reason
        assert await sender.handle(lease_for(message(account_id, "u1"), "other_apps")) == Drop("no webhook connected")


async def test_slack_urls_get_slack_bodies_with_mrkdwn_escaped(
    pool: asyncpg.Pool, pki: Pki, receiver: tuple[Receiver, int], account_id: str
) -> None:
    async def slack_dns(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    policy = ssrf.Policy(allowed_ports=(receiver[1],), allowed_networks=ssrf.parse_networks("127.0.0.0/8"))
    guard = ssrf.Guard(policy, slack_dns)
    box = SecretBox(base64.b64decode(KEY))
    path = f"/hooks/{uuid.uuid4().hex}"
    url = f"https://hooks.slack.com:{receiver[1]}{path}"
    target = await guard.check(url)
    assert body.is_slack(target.host)
    from services.webhooks import store

    hook_id = uuid.uuid4()
    await store.insert(pool, account_id, "u1", hook_id, url, "slack", True, box.seal("s", account_id, str(hook_id)))
    client = ssrf.client(ca_file=pki.ca_file)
    sender = WebhookSender(pool=pool, client=client, guard=guard, box=box)
    items = (Item("contact", "1", "Ana <@U123>", "/c/1"), Item("contact", "2", "Bo & Co", "/c/2"))
    msg = message(account_id, "u1", title="<!channel> 2 contacts", body="assigned to you", items=items)
    assert isinstance(await sender.handle(lease_for(msg, "other_apps")), Sent)
    await client.aclose()
    doc = next(d for d in receiver[0].received if d.path == path).document
    assert doc["text"].startswith("&lt;!channel&gt; 2 contacts")
    assert "<!channel>" not in str(doc)
    assert doc["blocks"][0]["type"] == "section"
    assert "<https://crm.example.com/contacts/42|Open>" in doc["blocks"][0]["text"]["text"]
    assert doc["blocks"][1]["elements"][0]["text"] == "Ana &lt;@U123&gt;, Bo &amp; Co"


async def test_connect_is_validated_and_scoped(
    stub: pb_grpc.WebhooksStub, receiver: tuple[Receiver, int], token_keys: dict[str, bytes], account_id: str
) -> None:
    meta = token_for(token_keys, account_id, "u1")
    for url, fragment in [
        ("", "required"),
        ("http://example.com/hook", "https"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://[::1]/x", "loopback"),
        ("https://user@example.com/x", "user name"),
        ("https://example.com:8443/x", "port"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ConnectWebhook(pb.ConnectWebhookRequest(url=url), metadata=meta)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in (err.value.details() or "")
    assert not (await stub.ListWebhooks(pb.ListWebhooksRequest(), metadata=meta)).webhooks
    _, reply = await connect(stub, receiver, token_keys, account_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ConnectWebhook(pb.ConnectWebhookRequest(url=reply.webhook.url), metadata=meta)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    other = token_for(token_keys, account_id, "u2")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteWebhook(pb.DeleteWebhookRequest(webhook_id=reply.webhook.webhook_id), metadata=other)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.DeleteWebhook(pb.DeleteWebhookRequest(webhook_id=reply.webhook.webhook_id), metadata=meta)
    assert not (await stub.ListWebhooks(pb.ListWebhooksRequest(), metadata=meta)).webhooks
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListWebhooks(pb.ListWebhooksRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_secret_sealed_under_another_key_fails_clearly(
    pool: asyncpg.Pool, pki: Pki, receiver: tuple[Receiver, int], account_id: str
) -> None:
    from services.webhooks import store

    hook_id = uuid.uuid4()
    other_key = SecretBox(os.urandom(32))
    url = f"https://localhost:{receiver[1]}/hooks/{uuid.uuid4().hex}"
    await store.insert(pool, account_id, "u1", hook_id, url, "", False, other_key.seal("s", account_id, str(hook_id)))
    policy = ssrf.Policy(allowed_ports=(receiver[1],), allowed_networks=ssrf.parse_networks("127.0.0.0/8"))
    client = ssrf.client(ca_file=pki.ca_file)
    sender = WebhookSender(pool=pool, client=client, guard=ssrf.Guard(policy), box=SecretBox(base64.b64decode(KEY)))
    outcome = await sender.handle(lease_for(message(account_id, "u1"), "other_apps"))
    await client.aclose()
    assert isinstance(outcome, Fail)
    assert "cannot be decrypted" in outcome.error
