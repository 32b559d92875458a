"""asyncpg pool creation: one pool per process, passed explicitly."""

from __future__ import annotations

import asyncpg
import orjson

Pool = asyncpg.Pool
Connection = asyncpg.Connection


def _encode(value: object) -> str:
    # orjson: the json codec runs for every delivery payload the dispatcher
    # writes, and the standard library's encoder was a third of its CPU.
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come back as Python objects instead of strings.
    await conn.set_type_codec("jsonb", encoder=_encode, decoder=orjson.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=_encode, decoder=orjson.loads, schema="pg_catalog")


async def create_pool(dsn: str, *, application_name: str, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    """Open a pool whose connections decode JSON and name the service in ``pg_stat_activity``."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        server_settings={"application_name": application_name},
    )
    assert pool is not None  # create_pool only returns None when awaited without init
    return pool


# Errors that say the database is away (restarting, unreachable, the
# connection reset or released), not that a statement is wrong: the caller
# waits and tries again instead of giving up on the work.
_DISCONNECTS = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


def is_disconnect(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable or restarting, so retrying later is right."""
    return isinstance(exc, _DISCONNECTS)
