"""Wiring: the dispatcher's servicer, its background loops and its peer channel."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import grpc
from belfry import background, log, rpc, service
from belfry.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from belfry.auth import user_tokens
from belfry.preferences import Preferences

from services.dispatcher import store
from services.dispatcher.backpressure import Backpressure
from services.dispatcher.fanout import Fanout
from services.dispatcher.follow_servicer import FollowServicer
from services.dispatcher.planning import Planner
from services.dispatcher.publish import Dispatcher
from services.dispatcher.servicer import DispatcherServicer
from services.dispatcher.settings import Settings

_LOG = log.get(__name__)
_SERVICES = ("DispatcherService", "FollowService")


def build_for(settings: Settings) -> Callable[[asyncpg.Pool], Awaitable[service.Built]]:
    """The dispatcher's build step for ``belfry.service.start``."""

    async def build(pool: asyncpg.Pool) -> service.Built:
        channel = rpc.connect(settings.preferences_address, settings.common.tls)
        preferences = Preferences(channel, deadline=settings.preferences_deadline, field_prefix="event.")
        pressure = Backpressure(pool, settings.backpressure)
        await pressure.refresh()
        planner = Planner(pool, preferences, settings.auto_follow)
        # No workers: this replica only accepts (and never assists); replicas with workers fan out behind it,
        # so a deployment can keep the producers' calls off the processes that plan and render.
        fanout = (
            Fanout(pool, planner, settings.fanout, workers=settings.fanout_workers, accounts=settings.common.accounts)
            if settings.fanout_workers
            else None
        )
        dispatcher = Dispatcher(pool, planner, pressure, fanout=fanout, key_seconds=settings.key_hours * 3600)
        servicer = DispatcherServicer(
            dispatcher,
            pool,
            settings.limits,
            max_batch=settings.max_batch,
            writers=settings.publish_writers,
            watching=settings.watch,
        )

        follow_servicer = FollowServicer(pool, user_tokens(settings.common))

        def register(server: grpc.aio.Server) -> None:
            dispatcher_pb2_grpc.add_DispatcherServiceServicer_to_server(servicer, server)
            dispatcher_pb2_grpc.add_FollowServiceServicer_to_server(follow_servicer, server)

        async def purge_once() -> None:
            keys, old = await store.purge(pool, key_hours=settings.key_hours, retention_days=settings.retention_days)
            if keys or old:
                _LOG.info("purged", idempotency_keys=keys, notifications=old)

        async def purge(stop: asyncio.Event) -> None:
            await background.every("dispatcher purge", settings.purge_seconds, purge_once, stop)

        async def close() -> None:
            await channel.close()

        return service.Built(
            registrations=[register],
            service_names=[dispatcher_pb2.DESCRIPTOR.services_by_name[name].full_name for name in _SERVICES],
            background=[pressure.loop, purge, *([fanout.run] if fanout is not None else [])],
            cleanup=[close],
        )

    return build
