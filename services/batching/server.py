"""Wiring of the batching service: intake worker, window closer, digests, operator RPCs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import asyncpg
from belfry import background, log, rpc
from belfry.api.batching.v1 import batching_pb2, batching_pb2_grpc
from belfry.preferences import Preferences
from belfry.queue.sender import sender_loops
from belfry.service import Built

from services.batching import status, store
from services.batching.clock import Clock, SystemClock
from services.batching.digests import Digests
from services.batching.intake import Intake
from services.batching.servicer import BatchingServicer
from services.batching.settings import Settings
from services.batching.windows import Closer

_LOG = log.get(__name__)
_PURGE_EVERY = 3600.0


def build_for(settings: Settings, *, clock: Clock | None = None) -> Callable[[asyncpg.Pool], Awaitable[Built]]:
    """The service's build step; tests inject a manual clock."""
    the_clock: Clock = clock or SystemClock()

    async def build(pool: asyncpg.Pool) -> Built:
        channel = rpc.connect(settings.preferences_address, settings.common.tls)
        preferences = Preferences(channel)
        lease = timedelta(seconds=settings.sender.lease_seconds)
        worker = settings.sender.worker_id
        intake = Intake(pool, the_clock, window=timedelta(seconds=settings.window_seconds))
        closer = Closer(pool, preferences, the_clock, worker=worker, lease=lease, tick_seconds=settings.tick_seconds)
        digests = Digests(
            pool,
            preferences,
            the_clock,
            worker=worker,
            schedules={"tasks": settings.task_digest, "workflows": settings.workflow_digest},
            topics={"tasks": settings.task_digest_topic, "workflows": settings.workflow_digest_topic},
            ttl=timedelta(seconds=settings.digest_ttl_seconds),
            lease=lease,
            tick_seconds=settings.digest_tick_seconds,
        )

        async def purge() -> None:
            purged = await store.purge(pool, the_clock.now() - timedelta(seconds=settings.retention_seconds))
            if purged:
                _LOG.info("purged old batching records", count=purged)

        async def housekeeping(stop: asyncio.Event) -> None:
            await background.every("batching purge", _PURGE_EVERY, purge, stop)

        servicer = BatchingServicer(status.Reader(pool, the_clock))
        return Built(
            registrations=[lambda server: batching_pb2_grpc.add_BatchingServiceServicer_to_server(servicer, server)],
            service_names=[batching_pb2.DESCRIPTOR.services_by_name["BatchingService"].full_name],
            background=[
                *sender_loops(pool, "batching", intake.handle, settings.sender),
                closer.run,
                digests.run,
                housekeeping,
            ],
            cleanup=[channel.close],
        )

    return build
