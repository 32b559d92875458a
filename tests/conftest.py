"""Shared fixtures: one real PostgreSQL database per test session.

The server is chosen by ``BELFRY_TEST_ADMIN_DSN`` (default: the local
PostgreSQL on 127.0.0.1:5432 as ``postgres``); when that default is not
reachable (or ``BELFRY_TEST_EMBEDDED=1``), an embedded server (the
``pgserver`` wheel) is started for the run instead. Each session creates its own
database, migrates it with the same runner deployments use, and drops it at
the end, so parallel runs never collide. Tests isolate themselves by using a
fresh account id (tenancy keeps them apart), not by truncating tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from belfry import access, db, identity, migrate
from belfry.config import TlsSettings
from belfry.local import database as embedded

_DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

# The test run's mesh key: it mints the service tokens services and test clients present
# (mutual TLS is off in tests, as in `belfry up`). Services hold only its public half.
MESH_KEY = identity.SigningKey.generate("tests")
# The identity test clients call as: configured (common_env) with every role of belfry.access, so
# a test reaches any producer, provisioning, app or operator method. Methods only Belfry services may
# call (EffectiveBatch, Unsubscribe) need that service's identity: client_tls("dispatcher").
TEST_CALLER = "tests"


def _dsn_for(admin_dsn: str, database: str) -> str:
    parts = urlsplit(admin_dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    """The server's maintenance database: configured, local, or embedded for the run."""
    configured = os.environ.get("BELFRY_TEST_ADMIN_DSN")
    if configured:
        yield configured
        return
    try:
        if os.environ.get("BELFRY_TEST_EMBEDDED"):
            raise OSError("embedded server requested")
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError:
        with tempfile.TemporaryDirectory(prefix="belfry-pg-") as tmp:
            server, dsn = embedded.start(Path(tmp) / "data")
            yield dsn
            embedded.stop(server)
        return
    yield _DEFAULT_DSN


@contextlib.asynccontextmanager
async def fresh_database(admin_dsn: str, *, before: tuple[str, str] | None = None) -> AsyncIterator[str]:
    """Create and migrate a database of its own; drop it afterwards.

    ``before`` = (owner, version): migrated up to, not including, that owner's
    migration and its later ones (an upgrade test's yesterday).
    """
    name = f"belfry_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()
    url = _dsn_for(admin_dsn, name)
    if before is None:
        await migrate.migrate_url(url)
    else:
        everything = migrate.discover()
        owner, version = before
        old = [m for m in everything if not (m.owner == owner and m.version >= version)]
        assert len(old) < len(everything), f"no migration {owner}/{version} to stop before"
        conn = await asyncpg.connect(url)
        try:
            await migrate.migrate(conn, old)
        finally:
            await conn.close()
    try:
        yield url
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'drop database if exists "{name}" with (force)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def database_url(admin_dsn: str) -> AsyncIterator[str]:
    """A freshly migrated database for this test session."""
    async with fresh_database(admin_dsn) as url:
        yield url


@contextlib.asynccontextmanager
async def open_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool for a test database."""
    p = await db.create_pool(database_url, application_name="belfry-tests", min_size=1, max_size=8)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """One pool for the session's direct database checks."""
    async with open_pool(database_url) as p:
        yield p


@pytest.fixture
def account_id() -> str:
    """A fresh tenant: tests stay apart by account, not by truncation."""
    return f"acc_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def token_keys() -> dict[str, bytes]:
    """Signing keys for user tokens (two, so rotation can be tested)."""
    return {"k1": b"k1-secret-for-tests-only-0123456789abcdef", "k2": b"k2-secret-for-tests-only-0123456789abcdef"}


@functools.cache
def service_token(name: str) -> str:
    """A service token for ``name``, signed with the run's mesh key."""
    return MESH_KEY.mint(name, ttl_seconds=86_400)


def client_tls(name: str = TEST_CALLER) -> TlsSettings:
    """What a test client connects with (``belfry.rpc.connect``): plaintext, presenting ``name``'s service token."""
    return TlsSettings(None, None, None, service_token(name))


def acting_caller(method: str) -> str:
    """Who a test client calls ``method`` as: the test caller where a role may call it, else a service that may."""
    rule = access.RULES.get(method)
    if rule is None or rule.callers & set(access.ROLES):
        return TEST_CALLER
    return min(rule.callers)


def acting_channel(address: str) -> grpc.aio.Channel:
    """A plaintext channel whose every call presents the token of a caller the allow-list admits for it.

    For tests that exercise a service's internal methods (``EffectiveBatch`` as
    the dispatcher, ``Unsubscribe`` as the gateway) next to its public ones;
    ``tests/kit/test_kit_access.py`` checks who may call what.
    """
    return grpc.aio.insecure_channel(
        address, interceptors=identity.presenting(lambda m: service_token(acting_caller(m)))
    )


def common_env(
    database_url: str, token_keys: dict[str, bytes], *, identity: str | None = None, **extra: str
) -> dict[str, str]:
    """An environment for ``load_settings`` of any service, bound to port 0.

    ``identity``: the service token the service presents to its peers (a
    service that calls others, such as the dispatcher, needs its own name).
    Processes started through ``belfry.local.supervisor`` get theirs minted
    from ``BELFRY_SERVICE_SIGNING_KEY``, as under ``belfry up``.
    """
    env = {
        "BELFRY_DATABASE_URL": database_url,
        "BELFRY_GRPC_ADDRESS": "127.0.0.1:0",
        "BELFRY_METRICS_ADDRESS": "off",
        "BELFRY_TOKEN_KEYS": ",".join(f"{k}={v.decode()}" for k, v in token_keys.items()),
        "BELFRY_TOKEN_ACTIVE_KID": "k1",
        "BELFRY_DRAIN_SECONDS": "0.5",
        "BELFRY_DB_POOL_MIN": "1",
        "BELFRY_DB_POOL_MAX": "4",
        "BELFRY_PROCESSES": "1",  # one process per service, as under `belfry up` (not one per CPU)
        "BELFRY_SERVICE_TOKEN_KEYS": MESH_KEY.public(),
        "BELFRY_SERVICE_SIGNING_KEY": MESH_KEY.dump(),
        "BELFRY_PRODUCERS": f"{TEST_CALLER}=*",
        "BELFRY_PROVISIONING": TEST_CALLER,
        "BELFRY_APPS": TEST_CALLER,
        "BELFRY_OPERATORS": TEST_CALLER,
    }
    if identity is not None:
        env["BELFRY_SERVICE_TOKEN"] = service_token(identity)
    env.update(extra)
    return env


def every_service_env(database_url: str, token_keys: dict[str, bytes], home: Path) -> dict[str, str]:
    """An environment every service's ``load_settings`` accepts; keys are generated in ``home``, SMTP is never reached."""
    return common_env(
        database_url,
        token_keys,
        BELFRY_LOG_LEVEL="warning",
        BELFRY_SMTP_HOST="127.0.0.1",
        BELFRY_SMTP_PORT="9",
        BELFRY_PUBLIC_URL="https://app.belfry.test",
        BELFRY_UNSUBSCRIBE_KEY="u" * 48,
        BELFRY_VAPID_PRIVATE_KEY_FILE=str(home / "vapid.pem"),
        BELFRY_WEBHOOK_SECRET_KEY_FILE=str(home / "webhook_secret.key"),
        BELFRY_GATEWAY_HTTP_HOST="127.0.0.1",
        BELFRY_GATEWAY_HTTP_PORT="0",
    )


async def fanned_out(pool: asyncpg.Pool, account_id: str) -> None:
    """Wait until the dispatcher has fanned out every event it accepted for ``account_id`` (and its ``_x`` siblings).

    Publishing answers once an event is durable; recipients and deliveries
    are written just after, by the fan-out workers. Events whose fan-out is
    waiting out a backoff or failed for good do not hold this up.
    """
    while await pool.fetchval(  # noqa: ASYNC110 - the backlog lives in the database; no event to await
        """select exists (select 1 from dispatcher.fanout
                          where account_id like $1 || '%' and not_before <= now())""",
        account_id,
    ):
        await asyncio.sleep(0.01)
