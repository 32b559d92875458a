"""Wiring of the preferences service: catalogue, directory, engine and servicers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
from belfry import rpc
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.auth import user_tokens
from belfry.client import Publisher, Retries
from belfry.queue.sender import sender_loops
from belfry.service import Built

from services.preferences import catalogue as catalogue_module
from services.preferences import notices, store
from services.preferences.batch import BatchAnswers
from services.preferences.directory import Directory
from services.preferences.directory_servicer import DirectoryServicer
from services.preferences.engine import Clock, Engine
from services.preferences.operations import Operations
from services.preferences.servicer import PreferencesServicer
from services.preferences.settings import Settings


def build_for(settings: Settings, *, clock: Clock = store.utcnow) -> Callable[[asyncpg.Pool], Awaitable[Built]]:
    """The service's build step; tests may inject a clock."""
    catalogue = catalogue_module.load()

    async def build(pool: asyncpg.Pool) -> Built:
        directory = Directory(pool, settings.max_batch)
        engine = Engine(pool, catalogue, clock, settings.max_batch)
        operations = Operations(pool, engine, app_url=settings.app_url)
        batch = BatchAnswers(pool, engine, settings.max_batch)
        prefs = PreferencesServicer(engine, batch, operations, user_tokens(settings.common))
        # The notices' sender publishes one event per attempt: the queue's backoff does the retrying.
        dispatcher = rpc.connect(settings.dispatcher_address, settings.common.tls)
        publish = notices.publisher_handler(Publisher(dispatcher, retries=Retries(attempts=1)))
        return Built(
            registrations=[
                lambda server: preferences_pb2_grpc.add_PreferencesServiceServicer_to_server(prefs, server),
                lambda server: directory_pb2_grpc.add_DirectoryServiceServicer_to_server(
                    DirectoryServicer(directory), server
                ),
            ],
            service_names=[
                preferences_pb2.DESCRIPTOR.services_by_name["PreferencesService"].full_name,
                directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"].full_name,
            ],
            background=sender_loops(pool, "dispatcher", publish, settings.notices),
            cleanup=[dispatcher.close],
        )

    return build
