"""Wiring of the webhooks service: the Webhooks and QueueAdmin APIs, the sender's loops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
from belfry import background, log, ssrf
from belfry.api.webhooks.v1 import webhooks_pb2_grpc as pb_grpc
from belfry.auth import user_tokens
from belfry.queue import admin
from belfry.queue.sender import sender_loops
from belfry.service import Built

from services.webhooks import store
from services.webhooks.sender import WebhookSender
from services.webhooks.servicer import SERVICE_NAME, WebhooksServicer
from services.webhooks.settings import Settings
from services.webhooks.signing import SecretBox, load_or_create_key

_LOG = log.get(__name__)


def build_for(settings: Settings) -> Callable[[asyncpg.Pool], Awaitable[Built]]:
    """The service's ``build(pool)`` for ``belfry.service.start``."""

    async def build(pool: asyncpg.Pool) -> Built:
        box = SecretBox(load_or_create_key(settings.secret_key, settings.secret_key_file), settings.secret_other_keys)
        guard = ssrf.Guard(settings.policy)
        client = ssrf.client(ca_file=settings.ca_file, timeout=settings.timeout_seconds)
        verifier = user_tokens(settings.common)
        sender = WebhookSender(pool=pool, client=client, guard=guard, box=box, fanout=settings.sender.fanout)
        servicer = WebhooksServicer(pool, verifier, guard, box, max_per_user=settings.max_per_user)
        queue_admin = admin.QueueAdmin(pool, verifier, settings.sender.preferences_address, settings.common.tls)
        return Built(
            registrations=[
                lambda server: pb_grpc.add_WebhooksServicer_to_server(servicer, server),
                queue_admin.registration,
            ],
            service_names=[SERVICE_NAME, admin.SERVICE_NAME],
            background=[
                *sender_loops(pool, "other_apps", sender.handle, settings.sender),
                *([_resealer(pool, box)] if box.rotating else []),
            ],
            cleanup=[client.aclose, queue_admin.close],
        )

    return build


def _resealer(pool: asyncpg.Pool, box: SecretBox) -> background.Loop:
    """While a rotation is under way: re-seal under the current key what opens only under another one."""

    async def once() -> None:
        resealed, unopenable = await store.reseal(pool, box)
        _LOG.info("webhook secrets re-sealed", resealed=resealed, unopenable=unopenable)

    async def loop(stop: asyncio.Event) -> None:
        await background.every("webhook secret re-seal", 3600, once, stop)

    return loop
