"""The allow-list over the whole running mesh: every caller identity against every method.

Every declared service runs as its own OS process under the supervisor of
``belfry up`` (ports bound to 0, gRPC reflection on), on a database of this
module's own, and is held to the matrix of ``tests/e2e/allow_matrix.py``. Each
caller (every service's own name, one identity per configured role, a stranger
with a valid token and no role, and no identity at all) proves its identity
with a service token on plaintext channels.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from belfry import identity, rpc, service
from belfry.local import supervisor

from tests.conftest import every_service_env
from tests.e2e.allow_matrix import ROLE_ENV, ROLES, STRANGER, Caller, Dial, Mesh, check_every_caller


@pytest.fixture(scope="module")
async def mesh(
    database_url: str, token_keys: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    """Every declared service as its own process, with the roles of ``allow_matrix.ROLES`` and reflection on."""
    home: Path = tmp_path_factory.mktemp("allow-list")
    env = dict(os.environ)
    env.update(every_service_env(database_url, token_keys, home))  # nothing is queued: SMTP is never reached
    env.update(ROLE_ENV, BELFRY_GRPC_REFLECTION="true")
    for declared in service.declared():
        env[f"BELFRY_{declared.name.upper()}_GRPC_ADDRESS"] = "127.0.0.1:0"
    children = await supervisor.start_mesh(env)
    try:
        addresses = {d.name: env[f"BELFRY_{d.name.upper()}_ADDRESS"] for d in service.declared()}
        yield Mesh(env, children, addresses)
    finally:
        await supervisor.stop_all(children, 15)


def _dial(env: dict[str, str], caller: str | None) -> Dial:
    """Plaintext channels presenting ``caller``'s service token (None: no identity at all)."""
    if caller is None:
        return Dial(grpc.aio.insecure_channel, grpc.insecure_channel)
    tls = supervisor.client_tls(env, caller)
    assert tls.service_token is not None
    return Dial(
        lambda address: rpc.connect(address, tls), grpc.insecure_channel, ((identity.METADATA_KEY, tls.service_token),)
    )


async def test_every_caller_against_every_method_of_the_running_mesh(mesh: Mesh, pool: asyncpg.Pool) -> None:
    declared = [d.name for d in service.declared()]
    assert {c.name for c in mesh.children} == set(declared)
    assert all(c.process.returncode is None for c in mesh.children), "a service exited"

    names: list[str | None] = [*declared, *ROLES, STRANGER, None]
    callers = [Caller(name if name is not None else "(no identity)", name, _dial(mesh.env, name)) for name in names]
    await check_every_caller(
        mesh, pool, callers, reflecting=_dial(mesh.env, None), provisioning=_dial(mesh.env, "sync")
    )
