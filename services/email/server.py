"""Wiring of the email service: the QueueAdmin and Deliverability APIs, the sender's loops, the cap counters' purge."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
from belfry import background
from belfry.auth import user_tokens
from belfry.queue import admin
from belfry.queue.sender import sender_loops
from belfry.service import Built
from belfry.unsubscribe import Signer

from services.email import store
from services.email.admin import SERVICE_NAME as DELIVERABILITY
from services.email.admin import Deliverability
from services.email.compose import Composer
from services.email.dkim_signing import DkimSigner
from services.email.sender import EmailSender
from services.email.settings import Settings
from services.email.smtp import SmtpPool
from services.email.templates import Templates


def build_for(settings: Settings) -> Callable[[asyncpg.Pool], Awaitable[Built]]:
    """The service's ``build(pool)`` for ``belfry.service.start``."""

    async def build(pool: asyncpg.Pool) -> Built:
        smtp = SmtpPool(settings.smtp)
        composer = Composer(
            templates=Templates(),
            signer=Signer(
                settings.unsubscribe_key,
                ttl_seconds=settings.unsubscribe_ttl_seconds,
                others=settings.unsubscribe_other_keys,
            ),
            sender=settings.from_address,
            public_url=settings.public_url,
            dkim=DkimSigner(settings.dkim) if settings.dkim else None,
        )
        sender = EmailSender(
            pool=pool,
            smtp=smtp,
            composer=composer,
            daily_cap=settings.daily_cap,
            soft_expiry_seconds=settings.soft_expiry_seconds,
            verp=settings.verp,
        )

        async def forget_old_counts(stop: asyncio.Event) -> None:
            # The cap is per UTC day: yesterday's counters are kept a little, then dropped.
            await background.every("email cap counters purge", 3600, lambda: store.purge_counts(pool), stop)

        queue_admin = admin.QueueAdmin(
            pool, user_tokens(settings.common), settings.sender.preferences_address, settings.common.tls
        )
        deliverability = Deliverability(
            pool, user_tokens(settings.common), settings.sender.preferences_address, settings.common.tls
        )
        return Built(
            registrations=[queue_admin.registration, deliverability.register],
            service_names=[admin.SERVICE_NAME, DELIVERABILITY],
            background=[
                *sender_loops(pool, "email", sender.handle, settings.sender, prepare=sender.prepare),
                forget_old_counts,
            ],
            cleanup=[smtp.close, queue_admin.close, deliverability.close],
        )

    return build
