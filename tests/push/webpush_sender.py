"""Build a ``WebPushSender`` outside the service, on the same pinned aiohttp session the service uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from belfry import ssrf
from cryptography.hazmat.primitives.asymmetric import ec

from services.webpush import client
from services.webpush.sender import WebPushSender
from services.webpush.vapid import Vapid
from tests.push.fakes.tls import Pki


@asynccontextmanager
async def open_sender(
    pool: asyncpg.Pool, pki: Pki, guard: ssrf.Guard, *, default_ttl: int = 60, trust_test_ca: bool = True
) -> AsyncIterator[tuple[WebPushSender, client.PinnedResolver]]:
    """A sender trusting the test CA (or only the system store); its session is closed on exit."""
    resolver = client.PinnedResolver()
    session = client.session(resolver, ca_file=pki.ca_file if trust_test_ca else None, timeout=5.0)
    sender = WebPushSender(
        pool=pool,
        session=session,
        resolver=resolver,
        guard=guard,
        vapid=Vapid(ec.generate_private_key(ec.SECP256R1()), "mailto:ops@example.com"),
        default_ttl=default_ttl,
    )
    try:
        yield sender, resolver
    finally:
        await session.close()
