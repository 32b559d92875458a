"""Wiring of the web push service: the WebPush and QueueAdmin APIs, the sender's loops."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
from belfry import ssrf
from belfry.api.webpush.v1 import webpush_pb2_grpc as pb_grpc
from belfry.auth import user_tokens
from belfry.queue import admin
from belfry.queue.sender import sender_loops
from belfry.service import Built

from services.webpush import client, store, vapid
from services.webpush.sender import WebPushSender
from services.webpush.servicer import SERVICE_NAME, WebPushServicer
from services.webpush.settings import Settings


def build_for(settings: Settings) -> Callable[[asyncpg.Pool], Awaitable[Built]]:
    """The service's ``build(pool)`` for ``belfry.service.start``."""

    async def build(pool: asyncpg.Pool) -> Built:
        key = vapid.load_or_create(settings.vapid_private_key, settings.vapid_key_file)
        signer = vapid.Vapid(key, settings.vapid_subject)
        others = [
            vapid.Vapid(vapid.load_or_create(pem, None), settings.vapid_subject) for pem in settings.vapid_other_keys
        ]
        if not others:
            # Subscriptions from before keys were recorded were all made with this key (no rotation yet).
            await store.stamp_vapid_key(pool, signer.public_key)
        guard = ssrf.Guard(settings.policy)
        resolver = client.PinnedResolver()
        session = client.session(
            resolver,
            ca_file=settings.ca_file,
            timeout=settings.timeout_seconds,
            max_connections=settings.max_connections,
        )
        verifier = user_tokens(settings.common)
        sender = WebPushSender(
            pool=pool,
            session=session,
            resolver=resolver,
            guard=guard,
            vapid=signer,
            default_ttl=settings.default_ttl_seconds,
            fanout=settings.sender.fanout,
            other_vapids=others,
            opener=settings.opener,
        )
        servicer = WebPushServicer(
            pool,
            verifier,
            guard,
            signer.public_key,
            max_per_user=settings.max_subscriptions_per_user,
            held=frozenset(o.public_key for o in others),
        )
        queue_admin = admin.QueueAdmin(pool, verifier, settings.sender.preferences_address, settings.common.tls)
        return Built(
            registrations=[
                lambda server: pb_grpc.add_WebPushServicer_to_server(servicer, server),
                queue_admin.registration,
            ],
            service_names=[SERVICE_NAME, admin.SERVICE_NAME],
            background=sender_loops(pool, "browser", sender.handle, settings.sender),
            cleanup=[session.close, queue_admin.close],
        )

    return build
