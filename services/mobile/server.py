"""Wiring of the mobile service: the Mobile and QueueAdmin APIs, the sender's loops."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable

import asyncpg
import httpx
from belfry import log
from belfry.api.mobile.v1 import mobile_pb2_grpc as pb_grpc
from belfry.auth import user_tokens
from belfry.queue import admin
from belfry.queue.sender import sender_loops
from belfry.service import Built

from services.mobile.apns import Apns
from services.mobile.fcm import Fcm
from services.mobile.sender import MobileSender
from services.mobile.servicer import SERVICE_NAME, MobileServicer
from services.mobile.settings import Settings

_LOG = log.get(__name__)


def _client(settings: Settings, *, http2: bool) -> httpx.AsyncClient:
    context = ssl.create_default_context()
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=str(settings.ca_file))
    # Fixed, operator-configured endpoints (not user input): no SSRF guard, but no environment proxies either.
    return httpx.AsyncClient(http2=http2, verify=context, trust_env=False, timeout=settings.timeout_seconds)


def build_for(settings: Settings) -> Callable[[asyncpg.Pool], Awaitable[Built]]:
    """The service's ``build(pool)`` for ``belfry.service.start``."""

    async def build(pool: asyncpg.Pool) -> Built:
        clients = [_client(settings, http2=False), _client(settings, http2=True)]
        fcm = Fcm(settings.fcm, clients[0]) if settings.fcm else None
        apns = Apns(settings.apns, clients[1]) if settings.apns else None
        for name, provider in (("FCM", fcm), ("APNs", apns)):
            if provider is None:
                _LOG.warning("push provider not configured; its deliveries fail with 'not configured'", provider=name)
        sender = MobileSender(pool=pool, android=fcm, ios=apns, fanout=settings.sender.fanout)
        verifier = user_tokens(settings.common)
        servicer = MobileServicer(pool, verifier, max_per_user=settings.max_devices_per_user)
        queue_admin = admin.QueueAdmin(pool, verifier, settings.sender.preferences_address, settings.common.tls)
        return Built(
            registrations=[
                lambda server: pb_grpc.add_MobileServicer_to_server(servicer, server),
                queue_admin.registration,
            ],
            service_names=[SERVICE_NAME, admin.SERVICE_NAME],
            background=sender_loops(pool, "mobile", sender.handle, settings.sender),
            cleanup=[*(c.aclose for c in clients), queue_admin.close],
        )

    return build
