"""Wiring of the webhooks service: the Webhooks and QueueAdmin APIs, the sender loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
from belfry import ssrf
from belfry.api.webhooks.v1 import webhooks_pb2_grpc as pb_grpc
from belfry.auth import TokenVerifier
from belfry.queue import Queue, admin, worker
from belfry.service import Built

from services.webhooks.sender import WebhookSender
from services.webhooks.servicer import SERVICE_NAME, WebhooksServicer
from services.webhooks.settings import Settings
from services.webhooks.signing import SecretBox, load_or_create_key


def build_for(settings: Settings) -> Callable[[asyncpg.Pool], Awaitable[Built]]:
    """The service's ``build(pool)`` for ``belfry.service.start``."""

    async def build(pool: asyncpg.Pool) -> Built:
        box = SecretBox(load_or_create_key(settings.secret_key, settings.secret_key_file))
        guard = ssrf.Guard(settings.policy)
        client = ssrf.client(ca_file=settings.ca_file, timeout=settings.timeout_seconds)
        verifier = TokenVerifier(settings.common.token_keys)
        sender = WebhookSender(pool=pool, client=client, guard=guard, box=box)
        queue = Queue(
            pool,
            "other_apps",
            worker=settings.worker_id,
            lease_seconds=settings.lease_seconds,
            max_retry_after=settings.common.max_retry_after_seconds,
        )

        async def send_loop(stop: asyncio.Event) -> None:
            await worker.run(queue, sender.handle, stop=stop, batch=settings.batch, concurrency=settings.concurrency)

        servicer = WebhooksServicer(pool, verifier, guard, box)
        return Built(
            registrations=[
                lambda server: pb_grpc.add_WebhooksServicer_to_server(servicer, server),
                admin.registration(admin.QueueAdminServicer(pool, verifier)),
            ],
            service_names=[SERVICE_NAME, admin.SERVICE_NAME],
            background=[send_loop],
            cleanup=[client.aclose],
        )

    return build
