"""The whole mesh as separate processes: one event becomes an email and a bell item.

Every service runs as its own OS process under the same supervisor as
``belfry up`` (ports bound to 0 and reported back), on this session's
database, sending mail to a real SMTP server (the mail catcher).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
import websockets
from belfry import rpc, service
from belfry.api.common.v1 import common_pb2
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.api.webhooks.v1 import webhooks_pb2, webhooks_pb2_grpc
from belfry.auth import TokenIssuer
from belfry.local import demo, mailcatcher, supervisor

from tests.conftest import TEST_CALLER, client_tls, common_env, fanned_out, service_token
from tests.push.fakes.http import serve_tls
from tests.push.fakes.receiver import Receiver
from tests.push.fakes.tls import make_pki

TOPIC = "comments.mentioned"


@dataclass
class Mesh:
    env: dict[str, str]
    children: list[supervisor.Child]
    mail: Path
    http_port: int
    issuer: TokenIssuer
    hooks: Receiver  # a user's "other apps" webhook endpoint (HTTPS on loopback)
    hooks_port: int

    def channel(self, service: str) -> grpc.aio.Channel:
        return rpc.connect(self.env[f"BELFRY_{service.upper()}_ADDRESS"], client_tls())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
async def mesh(
    database_url: str, token_keys: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    home = tmp_path_factory.mktemp("mesh")
    catcher, smtp_port = mailcatcher.start(home / "mail")
    http_port = _free_port()
    (home / "pki").mkdir()
    pki = make_pki(home / "pki")
    hooks = Receiver()
    receiving = serve_tls(hooks.app, pki)
    hooks_port = await receiving.__aenter__()
    env = dict(os.environ)
    env.update(common_env(database_url, token_keys))
    env.update(
        BELFRY_SMTP_HOST="127.0.0.1",
        BELFRY_SMTP_PORT=str(smtp_port),
        BELFRY_SMTP_STARTTLS="false",
        BELFRY_GATEWAY_HTTP_HOST="127.0.0.1",
        BELFRY_GATEWAY_HTTP_PORT=str(http_port),
        BELFRY_PUBLIC_URL=f"http://127.0.0.1:{http_port}",
        BELFRY_VAPID_PRIVATE_KEY_FILE=str(home / "vapid.pem"),
        BELFRY_LOG_LEVEL="warning",
        BELFRY_UNSUBSCRIBE_KEY="u" * 48,
        BELFRY_WEBHOOK_SECRET_KEY_FILE=str(home / "webhook_secret.key"),
        BELFRY_WEBHOOKS_ALLOWED_PORTS=f"443,{hooks_port}",
        BELFRY_WEBHOOKS_ALLOW_NETWORKS="127.0.0.0/8",
        BELFRY_WEBHOOKS_CA_FILE=str(pki.ca_file),
    )
    for declared in service.declared():
        env[f"BELFRY_{declared.name.upper()}_GRPC_ADDRESS"] = "127.0.0.1:0"
    children = await supervisor.start_mesh(env)
    try:
        yield Mesh(env, children, home / "mail", http_port, TokenIssuer(token_keys, "k1"), hooks, hooks_port)
    finally:
        await supervisor.stop_all(children, 15)
        catcher.stop()
        await receiving.__aexit__(None, None, None)


async def _seed(mesh: Mesh, account_id: str, users: list[str]) -> None:
    async with mesh.channel("preferences") as chan:
        directory = directory_pb2_grpc.DirectoryServiceStub(chan)
        await directory.UpsertAccount(
            directory_pb2.UpsertAccountRequest(
                account=directory_pb2.Account(account_id=account_id, name="E2E", tier=directory_pb2.TIER_PROFESSIONAL)
            )
        )
        for user in users:
            await directory.UpsertUser(
                directory_pb2.UpsertUserRequest(
                    user=directory_pb2.User(
                        account_id=account_id,
                        user_id=user,
                        email=f"{user}.{account_id}@example.test",
                        display_name=user.title(),
                        locale="en",
                        time_zone="UTC",
                        permission_set="sales",
                        active=True,
                    )
                )
            )


async def _mail_to(folder: Path, address: str) -> mailcatcher.CaughtMail:
    async with asyncio.timeout(30):
        while True:
            for mail in mailcatcher.caught(folder):
                if address in mail.to:
                    return mail
            await asyncio.sleep(0.05)  # another process writes the files: poll briefly


async def test_event_reaches_email_and_bell_and_honours_preferences(
    mesh: Mesh, account_id: str, pool: asyncpg.Pool
) -> None:
    await _seed(mesh, account_id, ["alice", "bob", "carol"])
    # Bob switched this topic off for email.
    async with mesh.channel("preferences") as chan:
        prefs = preferences_pb2_grpc.PreferencesServiceStub(chan)
        token = mesh.issuer.issue(account_id, "bob")
        await prefs.SetPreference(
            preferences_pb2.SetPreferenceRequest(
                choice=preferences_pb2.Choice(topic=TOPIC, channel=common_pb2.CHANNEL_EMAIL, enabled=False)
            ),
            metadata=[("authorization", f"Bearer {token}")],
        )

    url = f"ws://127.0.0.1:{mesh.http_port}/ws"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "auth", "token": mesh.issuer.issue(account_id, "alice")}))
        ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert ready["type"] == "ready"

        async with mesh.channel("dispatcher") as chan:
            dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(chan)
            event = demo.event(
                account_id=account_id, topic=TOPIC, recipients=["alice", "bob"], actor="carol", object_name="Quote Q-42"
            )
            published = await dispatcher.Publish(dispatcher_pb2.PublishRequest(event=event))
            assert published.notification_id and not published.replayed

        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        while frame["type"] != "item":
            frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert frame["item"]["notification_id"] == published.notification_id
        assert "Quote Q-42" in frame["item"]["title"] + frame["item"]["body"]
        assert frame["unread"] >= 1

    mail = await _mail_to(mesh.mail, f"alice.{account_id}@example.test")
    assert mail.subject == frame["item"]["title"] == "@mention in a comment: Quote Q-42"
    parsed = email.message_from_bytes(mail.path.read_bytes(), policy=email.policy.default)
    text = parsed.get_body(preferencelist=("plain",))
    assert text is not None and "Quote Q-42" in text.get_content()
    # Both deliveries were written in the same transaction; bob has no email one.
    channels = await pool.fetch(
        "select user_id, channel from queue.deliveries where account_id = $1 and notification_id = $2",
        account_id,
        published.notification_id,
    )
    assert ("alice", "email") in {(r["user_id"], r["channel"]) for r in channels}
    assert "email" not in {r["channel"] for r in channels if r["user_id"] == "bob"}
    assert not [m for m in mailcatcher.caught(mesh.mail) if f"bob.{account_id}" in m.to]


async def test_the_status_timeline_follows_a_notification_to_the_relay_the_feed_and_its_reading(
    mesh: Mesh, account_id: str
) -> None:
    await _seed(mesh, account_id, ["alice", "carol"])
    # Alice also connected an "other apps" webhook and turned the topic on for it.
    alice_token = (("authorization", f"Bearer {mesh.issuer.issue(account_id, 'alice')}"),)
    hook = f"/hooks/{uuid.uuid4().hex}"
    async with mesh.channel("webhooks") as chan:
        await webhooks_pb2_grpc.WebhooksStub(chan).ConnectWebhook(
            webhooks_pb2.ConnectWebhookRequest(url=f"https://localhost:{mesh.hooks_port}{hook}", label="ops"),
            metadata=alice_token,
        )
    async with mesh.channel("preferences") as chan:
        choice = preferences_pb2.Choice(topic=TOPIC, channel=common_pb2.CHANNEL_OTHER_APPS, enabled=True)
        await preferences_pb2_grpc.PreferencesServiceStub(chan).SetPreference(
            preferences_pb2.SetPreferenceRequest(choice=choice), metadata=alice_token
        )
    async with mesh.channel("dispatcher") as chan:
        dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(chan)
        event = demo.event(account_id=account_id, topic=TOPIC, recipients=["alice"], actor="carol", object_name="Q-7")
        published = await dispatcher.Publish(dispatcher_pb2.PublishRequest(event=event))
        await _mail_to(mesh.mail, f"alice.{account_id}@example.test")

        async def alice() -> dispatcher_pb2.RecipientStatus:
            answer: dispatcher_pb2.GetNotificationResponse = await dispatcher.GetNotification(
                dispatcher_pb2.GetNotificationRequest(account_id=account_id, notification_id=published.notification_id)
            )
            [found] = answer.notification.recipients
            return found

        async def settled() -> dispatcher_pb2.RecipientStatus:
            # The email sender settles its outcome just after the sink took the mail.
            while True:
                found = await alice()
                last = {d.queue_channel: d.timeline[-1].state for d in found.deliveries}
                if (
                    dispatcher_pb2.STATE_QUEUED not in last.values()
                    and dispatcher_pb2.STATE_SENDING not in last.values()
                ):
                    return found
                await asyncio.sleep(0.05)

        found = await asyncio.wait_for(settled(), 30)
        last = {d.queue_channel: d.timeline[-1] for d in found.deliveries}
        assert (last["email"].state, last["email"].reason) == (
            dispatcher_pb2.STATE_RELAYED,
            "accepted by the SMTP relay",
        )
        assert last["bell"].state == dispatcher_pb2.STATE_SENT  # in alice's feed
        assert (last["other_apps"].state, last["other_apps"].reason) == (
            dispatcher_pb2.STATE_DELIVERED,
            "acknowledged by the webhook",
        )
        assert [d.document.get("notification_id") for d in mesh.hooks.received if d.path == hook] == [
            published.notification_id
        ]
        assert not found.HasField("read_at")

        # Alice reads it in the bell: the one read state shows on the notification, whatever the channel.
        mine = {"authorization": f"Bearer {mesh.issuer.issue(account_id, 'alice')}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{mesh.http_port}", headers=mine) as http:
            items = (await http.get("/api/feed")).json()["items"]
            [item] = [i for i in items if i["notification_id"] == published.notification_id]
            marked = await http.post("/api/feed/mark", json={"ids": [item["id"]], "what": "read"})
            assert marked.json()["changed"] == 1
        found = await alice()
        assert found.HasField("read_at") and found.read_at.ToDatetime() >= last["email"].at.ToDatetime()


async def test_bad_input_is_refused_and_writes_nothing(mesh: Mesh, account_id: str, pool: asyncpg.Pool) -> None:
    await _seed(mesh, account_id, ["alice", "carol"])
    async with mesh.channel("dispatcher") as chan:
        dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(chan)

        async def publish(event: dispatcher_pb2.Event) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await dispatcher.Publish(dispatcher_pb2.PublishRequest(event=event))
            assert caught.value.details()  # a message a person can act on
            return caught.value.code()

        unknown = demo.event(account_id=account_id, topic="nope.nothing", recipients=["alice"])
        assert await publish(unknown) in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
        nobody = demo.event(account_id=account_id, topic=TOPIC, recipients=[])
        assert await publish(nobody) == grpc.StatusCode.INVALID_ARGUMENT
        huge = demo.event(account_id=account_id, topic=TOPIC, recipients=["alice"], object_name="x" * 2_000_000)
        assert await publish(huge) in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
        first = demo.event(
            account_id=account_id, topic=TOPIC, recipients=["alice"], idempotency_key="k-1", object_name="A"
        )
        await dispatcher.Publish(dispatcher_pb2.PublishRequest(event=first))
        changed = demo.event(
            account_id=account_id, topic=TOPIC, recipients=["alice"], idempotency_key="k-1", object_name="B"
        )
        assert await publish(changed) == grpc.StatusCode.ALREADY_EXISTS
    await fanned_out(pool, account_id)
    rows = await pool.fetchval("select count(*) from queue.deliveries where account_id = $1", account_id)
    notifications = {
        r["notification_id"]
        for r in await pool.fetch("select notification_id from queue.deliveries where account_id = $1", account_id)
    }
    assert rows >= 1 and len(notifications) == 1  # only the first, valid event wrote anything


async def test_forged_and_expired_tokens_are_refused(mesh: Mesh, account_id: str, token_keys: dict[str, bytes]) -> None:
    forged = TokenIssuer({"k1": b"f" * 48}, "k1").issue(account_id, "alice")
    expired = TokenIssuer(token_keys, "k1", ttl_seconds=60).issue(account_id, "alice", now=0)
    for token in (forged, expired):
        async with websockets.connect(f"ws://127.0.0.1:{mesh.http_port}/ws") as ws:
            await ws.send(json.dumps({"type": "auth", "token": token}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    async with rpc.connect(mesh.env["BELFRY_PREFERENCES_ADDRESS"], client_tls()) as chan:
        prefs = preferences_pb2_grpc.PreferencesServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await prefs.GetPreferences(
                preferences_pb2.GetPreferencesRequest(), metadata=[("authorization", f"Bearer {forged}")]
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_one_click_unsubscribe_from_the_email(mesh: Mesh, account_id: str) -> None:
    await _seed(mesh, account_id, ["dave", "carol"])
    async with mesh.channel("dispatcher") as chan:
        event = demo.event(account_id=account_id, topic=TOPIC, recipients=["dave"], actor="carol", object_name="Q-9")
        await dispatcher_pb2_grpc.DispatcherServiceStub(chan).Publish(dispatcher_pb2.PublishRequest(event=event))
    mail = await _mail_to(mesh.mail, f"dave.{account_id}@example.test")
    parsed = email.message_from_bytes(mail.path.read_bytes(), policy=email.policy.default)
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = str(parsed["List-Unsubscribe"]).strip("<>")
    assert link.startswith(f"http://127.0.0.1:{mesh.http_port}/")
    token = mesh.issuer.issue(account_id, "dave")

    async def email_enabled() -> bool:
        async with mesh.channel("preferences") as chan:
            answer = await preferences_pb2_grpc.PreferencesServiceStub(chan).Effective(
                preferences_pb2.EffectiveRequest(topic=TOPIC), metadata=[("authorization", f"Bearer {token}")]
            )
        return bool(next(c.enabled for c in answer.decision.channels if c.channel == common_pb2.CHANNEL_EMAIL))

    async with httpx.AsyncClient() as http:
        page = await http.get(link)  # a mail scanner following the link changes nothing
        assert page.status_code == 200 and "<form" in page.text
        assert await email_enabled()
        done = await http.post(link, content=b"List-Unsubscribe=One-Click")
        assert done.status_code == 200
    assert not await email_enabled()


async def test_publish_command(mesh: Mesh, account_id: str) -> None:
    await _seed(mesh, account_id, ["alice"])

    async def belfry(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "belfry.cli",
            "publish",
            "--dispatcher",
            mesh.env["BELFRY_DISPATCHER_ADDRESS"],
            "--account",
            account_id,
            "--to",
            "alice",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "BELFRY_SERVICE_TOKEN": service_token(TEST_CALLER)},  # a producer's own token
        )
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await belfry("--topic", TOPIC, "--name", "Deal D-7", "--idempotency-key", "cli-1")
    assert code == 0, err
    assert uuid.UUID(out.strip())
    code, _, err = await belfry("--topic", TOPIC, "--name", "Deal D-8", "--idempotency-key", "cli-1")
    assert code == 1 and "ALREADY_EXISTS" in err
    code, _, err = await belfry("--topic", "nope.nothing")
    assert code == 1 and "nope.nothing" in err


async def test_every_service_drains_and_exits_cleanly_on_sigterm(mesh: Mesh) -> None:
    await supervisor.stop_all(mesh.children, 15)
    assert {c.name: c.process.returncode for c in mesh.children} == {d.name: 0 for d in service.declared()}
