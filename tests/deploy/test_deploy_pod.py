"""A real service run the way its prod pod runs it.

The preferences service is started from the environment of its rendered
prod Deployment (mesh certificate, plaintext probe port, token keys), on
this machine's test database. Kubelet-style probes get plaintext health on
the probe port; a peer holding a mesh certificate reaches the application
(which answers for itself); a plaintext peer does not get through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from belfry import rpc, service
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.config import TlsSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.preferences.server import build_for
from services.preferences.settings import load_settings
from tests.deploy.manifests import of_kind, render
from tests.deploy.pki import Authority
from tests.deploy.podenv import pod_environ

_TIMEOUT = 10.0  # a bound so a broken handshake fails the test instead of hanging it


@dataclass(frozen=True)
class Pod:
    """The running service and a peer's mesh certificate."""

    port: int
    probe_port: int
    peer: TlsSettings


@pytest.fixture(scope="module")
async def pod(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[Pod]:
    """preferences, configured exactly as its prod Deployment configures it (addresses on loopback, port 0)."""
    folder: Path = tmp_path_factory.mktemp("pod")
    authority = Authority.create(folder / "pki", "mesh")
    objs = render("prod")
    environ = pod_environ(of_kind(objs, "Deployment")["preferences"], objs, folder, authority)
    # Only what differs on this machine: the database, and loopback port 0 instead of the pod's fixed ports.
    environ |= {
        "BELFRY_DATABASE_URL": database_url,
        "BELFRY_GRPC_ADDRESS": "127.0.0.1:0",
        "BELFRY_HEALTH_ADDRESS": "127.0.0.1:0",
        "BELFRY_DB_POOL_MIN": "1",
        "BELFRY_DB_POOL_MAX": "4",
    }
    settings = load_settings(environ)
    running = await service.start("preferences", settings.common, build_for(settings))
    try:
        # The gateway's certificate: the allow-list lets it call the user-facing preferences RPCs.
        yield Pod(running.port, running.probe_port, authority.issue("gateway"))
    finally:
        await running.stop(0)


async def test_probe_port_answers_plaintext_health(pod: Pod) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{pod.probe_port}")
    try:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=_TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()


async def test_mesh_peer_reaches_the_application(pod: Pod) -> None:
    # Dialled by Service name, as peers in the cluster do (BELFRY_PREFERENCES_ADDRESS=dns:///preferences:50051).
    channel = rpc.connect(f"127.0.0.1:{pod.port}", pod.peer, override_authority="preferences")
    try:
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListTopics(preferences_pb2.ListTopicsRequest(), timeout=_TIMEOUT)
        # The service itself answered: a call without a user token is refused by the application.
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=_TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()


async def test_plaintext_peer_is_refused_on_the_service_port(pod: Pod) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{pod.port}")
    try:
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListTopics(preferences_pb2.ListTopicsRequest(), timeout=_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
