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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool: Belfry keeps no state in a session.

    asyncpg's default reset sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL;`` on every release: one more round trip, and
    PostgreSQL's work, for each statement run through the pool (a claim, a
    settle, a publish). Belfry sets no session parameter (``SET LOCAL`` only),
    takes advisory locks per transaction (``pg_advisory_xact_lock``; the
    migration's session lock is on a connection of its own), opens no cursor
    outside a transaction, and its LISTEN connections unlisten before they
    are released. What still matters is done by the pool before this runs:
    an unfinished transaction is rolled back and listener callbacks dropped.
    """


async def create_pool(dsn: str, *, application_name: str, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    """Open a pool whose connections decode JSON and name the service in ``pg_stat_activity``."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
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
