"""Wiring: the dispatcher's servicer, its background loops and its peer channel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
from belfry import log, rpc, service
from belfry.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from google.protobuf.message import DecodeError

from services.dispatcher import render, store
from services.dispatcher.backpressure import Backpressure
from services.dispatcher.planning import Planner
from services.dispatcher.preferences import Preferences
from services.dispatcher.publish import Dispatcher
from services.dispatcher.servicer import DispatcherServicer, Undecodable
from services.dispatcher.settings import Settings

_LOG = log.get(__name__)


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A deserializer that hands undecodable requests (e.g. invalid UTF-8) to the servicer.

    grpc would otherwise answer INTERNAL with no hint; the servicer turns
    this marker into INVALID_ARGUMENT with a message a producer can act on.
    """

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(str(exc))

    return deserialize


class _Tolerant:
    """Stands in for the server while the generated code registers its handlers."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: ``add_registered_method_handlers`` carries the same handlers."""

    def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
        """Register the handlers with tolerant deserializers."""
        patched = {m: h._replace(request_deserializer=_tolerant(h.request_deserializer)) for m, h in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, patched),))
        self._server.add_registered_method_handlers(name, patched)


def build_for(settings: Settings) -> Callable[[asyncpg.Pool], Awaitable[service.Built]]:
    """The dispatcher's build step for ``belfry.service.start``."""

    async def build(pool: asyncpg.Pool) -> service.Built:
        channel = rpc.connect(settings.preferences_address, settings.common.tls)
        preferences = Preferences(channel, deadline=settings.preferences_deadline)
        pressure = Backpressure(pool, settings.backpressure)
        await pressure.refresh()
        dispatcher = Dispatcher(pool, Planner(pool, preferences, render.load_labels(settings.catalogue)), pressure)
        servicer = DispatcherServicer(dispatcher, pool, settings.limits, max_batch=settings.max_batch)

        def register(server: grpc.aio.Server) -> None:
            dispatcher_pb2_grpc.add_DispatcherServiceServicer_to_server(servicer, _Tolerant(server))

        async def purge(stop: asyncio.Event) -> None:
            while not stop.is_set():
                try:
                    keys, old = await store.purge(
                        pool, key_hours=settings.key_hours, retention_days=settings.retention_days
                    )
                    if keys or old:
                        _LOG.info("purged", idempotency_keys=keys, recipient_rows=old)
                except (OSError, asyncpg.PostgresError) as exc:
                    _LOG.warning("purge failed", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), settings.purge_seconds)

        async def close() -> None:
            await channel.close()

        return service.Built(
            registrations=[register],
            service_names=[dispatcher_pb2.DESCRIPTOR.services_by_name["DispatcherService"].full_name],
            background=[pressure.loop, purge],
            cleanup=[close],
        )

    return build
