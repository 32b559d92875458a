"""Mutual TLS between services, end to end through the real bootstrap.

A service started from ``BELFRY_TLS_*`` settings (config → service → rpc,
exactly as in a pod) answers a peer holding a certificate from the mesh CA,
and refuses plaintext, a client without a certificate, a certificate from a
foreign CA and an expired certificate from the right CA.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from belfry import rpc, service
from belfry.config import Env, TlsSettings, check_tls, load_common
from belfry.errors import ConfigError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import common_env
from tests.deploy.pki import Authority

_CALL_TIMEOUT = 10.0  # a bound so a broken handshake fails the test instead of hanging it


@dataclass(frozen=True)
class Mesh:
    """One running service with TLS and the material peers may hold."""

    port: int
    probe_port: int
    mesh: Authority
    peer: TlsSettings
    foreign: TlsSettings
    expired: TlsSettings


@pytest.fixture(scope="module")
async def mesh(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, token_keys: dict[str, bytes]
) -> AsyncIterator[Mesh]:
    """A service whose settings come from BELFRY_TLS_* like a pod's."""
    folder: Path = tmp_path_factory.mktemp("pki")
    ca = Authority.create(folder, "mesh")
    own = ca.issue("preferences")
    assert own.cert and own.key and own.ca
    env = common_env(
        database_url,
        token_keys,
        BELFRY_TLS_CERT=str(own.cert),
        BELFRY_TLS_KEY=str(own.key),
        BELFRY_TLS_CA=str(own.ca),
        BELFRY_HEALTH_ADDRESS="127.0.0.1:0",
        BELFRY_GRPC_REFLECTION="true",  # switched on here: the second RPC below lists services
    )
    reader = Env(env)
    common = load_common("preferences", reader, default_port=50051)
    reader.check()

    async def build(_: asyncpg.Pool) -> service.Built:
        return service.Built()

    running = await service.start("preferences", common, build)
    try:
        yield Mesh(
            port=running.port,
            probe_port=running.probe_port,
            mesh=ca,
            peer=ca.issue("dispatcher"),
            foreign=Authority.create(folder, "foreign").issue("dispatcher"),
            expired=ca.issue("dispatcher-old", expired=True),
        )
    finally:
        await running.stop(0)


async def _health(channel: grpc.aio.Channel) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=_CALL_TIMEOUT)
    return answer.status


async def _refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The status of a health check that must not get through."""
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _health(channel)
    finally:
        await channel.close()
    return caught.value.code()


async def test_peer_with_mesh_certificate_is_served(mesh: Mesh) -> None:
    channel = rpc.connect(f"127.0.0.1:{mesh.port}", mesh.peer, override_authority="localhost")
    try:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        # A second, streaming RPC over the same verified channel: server reflection.
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        names: list[str] = []
        async for answer in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=_CALL_TIMEOUT
        ):
            names.extend(s.name for s in answer.list_services_response.service)
        assert "grpc.health.v1.Health" in names
    finally:
        await channel.close()


async def test_plaintext_is_refused(mesh: Mesh) -> None:
    channel = rpc.connect(f"127.0.0.1:{mesh.port}", TlsSettings(None, None, None))
    assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_client_without_certificate_is_refused(mesh: Mesh) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=mesh.mesh.ca_path.read_bytes())
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{mesh.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_certificate_from_foreign_ca_is_refused(mesh: Mesh) -> None:
    # The client trusts the mesh CA (so it accepts the server) but presents a foreign certificate.
    assert mesh.foreign.cert and mesh.foreign.key
    tls = TlsSettings(mesh.foreign.cert, mesh.foreign.key, mesh.mesh.ca_path)
    channel = rpc.connect(f"127.0.0.1:{mesh.port}", tls, override_authority="localhost")
    assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_expired_certificate_is_refused(mesh: Mesh) -> None:
    channel = rpc.connect(f"127.0.0.1:{mesh.port}", mesh.expired, override_authority="localhost")
    assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_client_refuses_server_outside_its_ca(mesh: Mesh) -> None:
    # The peer trusts only the foreign CA: the mesh server's certificate is rejected by the client.
    assert mesh.peer.cert and mesh.peer.key and mesh.foreign.ca
    tls = TlsSettings(mesh.peer.cert, mesh.peer.key, mesh.foreign.ca)
    channel = rpc.connect(f"127.0.0.1:{mesh.port}", tls, override_authority="localhost")
    assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


async def test_probe_port_serves_plaintext_health_and_nothing_else(mesh: Mesh) -> None:
    # What a kubelet gRPC probe does: plaintext, no certificate, standard health service.
    channel = rpc.connect(f"127.0.0.1:{mesh.probe_port}", TlsSettings(None, None, None))
    try:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=_CALL_TIMEOUT
            ):
                pass
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await channel.close()


def test_startup_rejects_expired_certificate(tmp_path: Path) -> None:
    expired = Authority.create(tmp_path, "mesh").issue("email", expired=True)
    env = Env(
        {
            "BELFRY_DATABASE_URL": "postgresql://x/y",
            "BELFRY_TLS_CERT": str(expired.cert),
            "BELFRY_TLS_KEY": str(expired.key),
            "BELFRY_TLS_CA": str(expired.ca),
        }
    )
    load_common("email", env, default_port=50054)
    with pytest.raises(ConfigError, match=r"BELFRY_TLS_CERT .* expired on .* renew it"):
        env.check()


def test_startup_rejects_tls_without_ca(tmp_path: Path) -> None:
    own = Authority.create(tmp_path, "mesh").issue("email")
    env = Env(
        {"BELFRY_DATABASE_URL": "postgresql://x/y", "BELFRY_TLS_CERT": str(own.cert), "BELFRY_TLS_KEY": str(own.key)}
    )
    load_common("email", env, default_port=50054)
    with pytest.raises(ConfigError, match=r"missing BELFRY_TLS_CA"):
        env.check()


def test_startup_rejects_certificate_not_yet_valid(tmp_path: Path) -> None:
    own = Authority.create(tmp_path, "mesh").issue("email")
    env = Env({})
    check_tls(env, own, now=datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
    with pytest.raises(ConfigError, match=r"BELFRY_TLS_CERT .* is not valid before"):
        env.check()


def test_startup_accepts_valid_material(tmp_path: Path) -> None:
    env = Env({})
    check_tls(env, Authority.create(tmp_path, "mesh").issue("email"))
    env.check()
