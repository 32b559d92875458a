"""Wiring of the email service: the QueueAdmin and Deliverability APIs, the sender's loops, the purges of cap
counters and lapsed suppressions, the bounce receiver."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
from belfry import background, processes
from belfry.auth import user_tokens
from belfry.queue import admin
from belfry.queue.sender import sender_loops
from belfry.service import Built
from belfry.unsubscribe import Signer

from services.email import store
from services.email.admin import SERVICE_NAME as DELIVERABILITY
from services.email.admin import Deliverability
from services.email.branding import BrandingCache
from services.email.compose import Composer
from services.email.dkim_signing import DkimSigner
from services.email.sender import EmailSender
from services.email.settings import BOUNCE_PORT_VARIABLE, Settings
from services.email.smtp import SmtpPool
from services.email.templates import Templates


class EmailBuild:
    """``build(pool)`` for ``belfry.service.start``; after it ran, ``bounce_port`` is the receiver's bound port (0: off)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bounce_port = 0

    async def __call__(self, pool: asyncpg.Pool) -> Built:
        """The servicers, the sender's loops, and the bounce receiver when it is on."""
        settings = self.settings
        smtp = SmtpPool(settings.smtp)
        branding = BrandingCache(pool)
        composer = Composer(
            templates=Templates(),
            signer=Signer(
                settings.unsubscribe_key,
                ttl_seconds=settings.unsubscribe_ttl_seconds,
                others=settings.unsubscribe_other_keys,
            ),
            sender=settings.from_address,
            public_url=settings.public_url,
            dkim=DkimSigner(settings.dkim, envelope_domain=settings.verp.domain if settings.verp else None)
            if settings.dkim
            else None,
        )
        sender = EmailSender(
            pool=pool,
            smtp=smtp,
            composer=composer,
            daily_cap=settings.daily_cap,
            soft_expiry_seconds=settings.soft_expiry_seconds,
            verp=settings.verp,
            branding=branding,
        )

        async def forget_old_counts(stop: asyncio.Event) -> None:
            # The cap is per UTC day: yesterday's counters are kept a little, then dropped.
            await background.every("email cap counters purge", 3600, lambda: store.purge_counts(pool), stop)

        async def forget_lapsed_suppressions(stop: asyncio.Event) -> None:
            # The sender already ignores lapsed soft-bounce entries; this keeps the table to what is in force.
            expiry = settings.soft_expiry_seconds
            await background.every(
                "email lapsed suppressions purge",
                3600,
                lambda: store.purge_lapsed(pool, soft_expiry_seconds=expiry),
                stop,
            )

        queue_admin = admin.QueueAdmin(
            pool, user_tokens(settings.common), settings.sender.preferences_address, settings.common.tls
        )
        deliverability = Deliverability(
            pool,
            user_tokens(settings.common),
            settings.sender.preferences_address,
            settings.common.tls,
            branding=branding,
            from_domains=settings.from_domains,
            soft_expiry_seconds=settings.soft_expiry_seconds,
        )
        cleanup: list[Callable[[], Awaitable[None]]] = []
        if settings.bounces is not None and settings.verp is not None:
            # Imported only when on: aiosmtpd is not a main dependency (settings refuse the address without it).
            from services.email.bounces import BounceReceiver  # noqa: PLC0415

            shared = settings.common.process_slot is not None
            receiver = BounceReceiver(pool, settings.verp, settings.bounces, shared=shared)
            self.bounce_port = await receiver.start()
            cleanup.append(receiver.close)  # first: no report is accepted once the pool is closing
        return Built(
            registrations=[queue_admin.registration, deliverability.register],
            service_names=[admin.SERVICE_NAME, DELIVERABILITY],
            background=[
                *sender_loops(pool, "email", sender.handle, settings.sender, prepare=sender.prepare),
                forget_old_counts,
                forget_lapsed_suppressions,
            ],
            cleanup=[*cleanup, smtp.close, queue_admin.close, deliverability.close],
        )


def build_for(settings: Settings) -> EmailBuild:
    """The service's ``build(pool)`` for ``belfry.service.start``."""
    return EmailBuild(settings)


def listeners(settings: Settings) -> list[processes.Listener]:
    """The bounce receiver's port: a pod's worker processes share it as they share the gRPC port."""
    if settings.bounces is None:
        return []
    return [processes.Listener(settings.bounces.host, settings.bounces.port, BOUNCE_PORT_VARIABLE)]
