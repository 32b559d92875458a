"""The allow-list over the whole running mesh, with real certificates: every caller against every method.

The same matrix as ``test_e2e_allow_list.py``, with mutual TLS in place of
service tokens. Every declared service runs as its own OS process (through
``belfry.local.supervisor.start_mesh``, one service at a time so each gets its
own environment) serving mutual TLS with a certificate of the mesh CA naming
it (``spiffe://belfry/<name>``); the services call one another with those
certificates, and no service-token key is configured anywhere, so a
certificate is the only way to prove an identity. Each caller (every
service's name, every configured identity, a stranger the CA certified but no
role names) calls each method once with an empty request, presenting a client
certificate naming it, and the answer is held to ``belfry.access.RULES``
exactly as the token matrix holds it. A certificate of another CA (naming the
gateway) is refused at the TLS handshake; a mesh-CA certificate of another
trust domain (``spiffe://elsewhere/gateway``) proves no identity. The
directory must hold afterwards exactly what it held before.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from belfry import rpc, service
from belfry.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from belfry.config import TlsSettings
from belfry.local import demo, supervisor
from cryptography import x509

from tests.conftest import every_service_env
from tests.deploy.pki import Authority
from tests.e2e import allow_matrix
from tests.e2e.allow_matrix import BOUND_ACCOUNT, CALL_TIMEOUT, ROLE_ENV, ROLES, STRANGER, Caller, Dial

# No token can prove an identity here: the mesh's services hold no key to verify one, nor to mint one.
TOKEN_VARIABLES = ("BELFRY_SERVICE_TOKEN_KEYS", supervisor.SIGNING_KEY, "BELFRY_SERVICE_TOKEN")
NO_IDENTITY = "the client certificate names no identity (a spiffe:// URI or a DNS name)"
# Each channel keeps its own connections: no two callers' calls ever share a TLS session.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.ssl_target_name_override", "localhost")]


@dataclass
class Mesh(allow_matrix.Mesh):
    ca: Authority
    own: dict[str, TlsSettings]  # service name -> the certificate it serves and calls with


@pytest.fixture(scope="module")
async def mesh(
    database_url: str, token_keys: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    """Every declared service as its own process serving mutual TLS with its own certificate; roles and reflection on."""
    home: Path = tmp_path_factory.mktemp("allow-list-mtls")
    ca = Authority.create(home / "pki", "mesh")
    env = dict(os.environ)
    # SMTP points at a closed port: the one email the last step queues is never sent (its retries are not awaited).
    env.update(every_service_env(database_url, token_keys, home))
    env.update(ROLE_ENV, BELFRY_GRPC_REFLECTION="true")
    for variable in TOKEN_VARIABLES:
        env.pop(variable, None)
    own: dict[str, TlsSettings] = {}
    children: list[supervisor.Child] = []
    try:
        # In dependency order, as start_mesh would; each service's environment names its own certificate
        # and the addresses of those already up.
        for declared in service.declared():
            name = declared.name
            own[name] = ca.issue(name)
            child_env = dict(
                env,
                BELFRY_TLS_CERT=str(own[name].cert),
                BELFRY_TLS_KEY=str(own[name].key),
                BELFRY_TLS_CA=str(own[name].ca),
                **{f"BELFRY_{name.upper()}_GRPC_ADDRESS": "127.0.0.1:0"},
            )
            children += await supervisor.start_mesh(child_env, [name])
            env[f"BELFRY_{name.upper()}_ADDRESS"] = child_env[f"BELFRY_{name.upper()}_ADDRESS"]
        addresses = {d.name: env[f"BELFRY_{d.name.upper()}_ADDRESS"] for d in service.declared()}
        yield Mesh(env, children, addresses, ca, own)
    finally:
        await supervisor.stop_all(children, 15)


def _dial(tls: TlsSettings) -> Dial:
    """Channels of their own presenting ``tls``'s certificate (and trusting its CA)."""
    credentials = rpc.channel_credentials(tls)
    assert credentials is not None, tls
    return Dial(
        lambda address: grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS),
        lambda address: grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS),
    )


async def test_every_certified_caller_against_every_method_of_the_running_mesh(
    mesh: Mesh, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    declared = [d.name for d in service.declared()]
    assert {c.name for c in mesh.children} == set(declared)
    assert all(c.process.returncode is None for c in mesh.children), "a service exited"
    for child in mesh.children:
        # Each process serves (and calls its peers) with its own certificate, and holds no token.
        assert child.env["BELFRY_TLS_CERT"] == str(mesh.own[child.name].cert), child.name
        assert not set(TOKEN_VARIABLES) & set(child.env), child.name

    certified: dict[str, TlsSettings] = {name: mesh.ca.issue(name) for name in [*ROLES, STRANGER]}
    foreign = Authority.create(mesh.ca.folder, "foreign").issue("gateway")
    elsewhere = mesh.ca.leaf("elsewhere", [x509.UniformResourceIdentifier("spiffe://elsewhere/gateway")])
    callers = [
        *(Caller(name, name, _dial(mesh.ca.issue(name))) for name in declared),
        *(Caller(name, name, _dial(certified[name])) for name in [*ROLES, STRANGER]),
        # The gateway as another CA certifies it; the client trusts the mesh CA, so only the server can refuse.
        Caller(
            "gateway (foreign CA)", "gateway", _dial(TlsSettings(foreign.cert, foreign.key, mesh.ca.ca_path)), False
        ),
        Caller("spiffe://elsewhere/gateway", None, _dial(elsewhere)),
    ]
    # Reflection is open to any certified caller; the directory is seeded by the provisioning identity.
    await allow_matrix.check_every_caller(
        mesh,
        pool,
        callers,
        reflecting=_dial(certified[STRANGER]),
        provisioning=_dial(certified["sync"]),
        no_identity=NO_IDENTITY,
    )
    assert all(c.process.returncode is None for c in mesh.children), "a service exited"

    # The services call one another with their own certificates: the dispatcher admits a publish only after asking
    # preferences (EffectiveBatch, which only the dispatcher and batching may call) whether the topic exists.
    async with _dial(certified["producer-bound"]).aio(mesh.addresses["dispatcher"]) as channel:
        event = demo.event(account_id=BOUND_ACCOUNT, topic="comments.mentioned", recipients=["ada"], actor="ada")
        published = await dispatcher_pb2_grpc.DispatcherServiceStub(channel).Publish(
            dispatcher_pb2.PublishRequest(event=event), timeout=CALL_TIMEOUT
        )
    assert published.notification_id and not published.replayed
