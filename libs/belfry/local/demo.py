"""The demo tenant of the local run, and the sample notification ``belfry up`` sends."""

from __future__ import annotations

import uuid

import grpc

from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2
from belfry.client import Publisher

DEMO_ACCOUNT = "demo"
DEMO_USERS = (
    ("alice", "Alice Martin", "alice@example.test", "en", "Europe/London"),
    ("bruno", "Bruno Lefèvre", "bruno@example.test", "fr", "Europe/Paris"),
)
SAMPLE_TOPIC = "comments.mentioned"


async def seed(channel: grpc.aio.Channel) -> None:
    """Create (or refresh) the demo account and its users in the directory."""
    directory = directory_pb2_grpc.DirectoryServiceStub(channel)
    await directory.UpsertAccount(
        directory_pb2.UpsertAccountRequest(
            account=directory_pb2.Account(account_id=DEMO_ACCOUNT, name="Demo", tier=directory_pb2.TIER_ENTERPRISE)
        )
    )
    for user_id, name, email, locale, zone in DEMO_USERS:
        await directory.UpsertUser(
            directory_pb2.UpsertUserRequest(
                user=directory_pb2.User(
                    account_id=DEMO_ACCOUNT,
                    user_id=user_id,
                    email=email,
                    display_name=name,
                    locale=locale,
                    time_zone=zone,
                    permission_set="sales",
                    super_admin=user_id == "alice",
                    active=True,
                )
            )
        )


def event(
    *,
    account_id: str,
    topic: str,
    recipients: list[str],
    actor: str = "",
    object_type: str = "deal",
    object_name: str = "",
    url: str = "",
    idempotency_key: str = "",
) -> dispatcher_pb2.Event:
    """An event for ``Publish`` (the CLI and the sample share it)."""
    result = dispatcher_pb2.Event(
        account_id=account_id,
        topic=topic,
        actor=dispatcher_pb2.Actor(user_id=actor, source=dispatcher_pb2.ACTOR_SOURCE_UI),
        object=dispatcher_pb2.ObjectRef(type=object_type, id=uuid.uuid4().hex[:8], display_name=object_name, url=url),
        recipient_user_ids=recipients,
        mentioned_user_ids=recipients if topic.endswith("mentioned") else [],
        idempotency_key=idempotency_key or uuid.uuid4().hex,
    )
    result.occurred_at.GetCurrentTime()
    return result


async def publish(channel: grpc.aio.Channel, ev: dispatcher_pb2.Event) -> dispatcher_pb2.PublishResponse:
    """Publish one event through the producer client (retries transient failures)."""
    return await Publisher(channel).publish(ev)
