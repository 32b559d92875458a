"""The gRPC bootstrap: typed errors become statuses with rich details; health serves."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from belfry import access, errors, identity, rpc
from belfry.config import TlsSettings
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from tests.conftest import MESH_KEY, TEST_CALLER, client_tls

_NO_TLS = TlsSettings(None, None, None)
# The echo service's own allow-list: the test caller may call it.
_GATE = access.Gate(
    access.Callers(),
    tokens=identity.ServiceTokenVerifier(identity.parse_public_keys(MESH_KEY.public())),
    rules={"/test.Echo/Call": access.Rule(frozenset({TEST_CALLER}))},
)


async def _fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    kind = request.decode()
    if kind == "invalid":
        raise errors.InvalidArgument(
            "topic must be a catalogue key, e.g. contacts.contact_assigned", field="event.topic"
        )
    if kind == "busy":
        raise errors.ResourceExhausted("too many events; slow down", retry_after=1.5)
    if kind == "bug":
        raise RuntimeError("secret internals")
    return b"ok:" + request


def _register(server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(_fail, lambda b: b, lambda b: b)}
    )
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server, bound, _health = await rpc.create_server(
        "test", [_register], ["test.Echo"], "127.0.0.1:0", _NO_TLS, gate=_GATE
    )
    await server.start()
    yield bound
    await server.stop(0)


@pytest.fixture
async def channel(port: int) -> AsyncIterator[grpc.aio.Channel]:
    chan = rpc.connect(f"127.0.0.1:{port}", client_tls())
    yield chan
    await chan.close()


async def _call(channel: grpc.aio.Channel, kind: str) -> bytes:
    method = channel.unary_unary("/test.Echo/Call", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    result: bytes = await method(kind.encode())
    return result


async def test_typed_errors_map_to_rich_statuses(channel: grpc.aio.Channel) -> None:
    assert await _call(channel, "fine") == b"ok:fine"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, "invalid")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "catalogue key" in (caught.value.details() or "")
    status = rpc_status.from_call(caught.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "event.topic"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, "busy")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(caught.value)
    assert status is not None
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.ToMilliseconds() == 1500


async def test_unexpected_errors_hide_internals(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, "bug")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internals" not in (caught.value.details() or "")


async def test_callers_the_allow_list_does_not_name_are_refused(port: int) -> None:
    for tls, code in (
        (_NO_TLS, grpc.StatusCode.UNAUTHENTICATED),  # no identity at all
        (client_tls("stranger"), grpc.StatusCode.PERMISSION_DENIED),  # a valid token for someone not listed
        (TlsSettings(None, None, None, "not-a-token"), grpc.StatusCode.UNAUTHENTICATED),
        # A token for the right name from a key the server does not hold.
        (
            TlsSettings(None, None, None, identity.SigningKey.generate("tests").mint(TEST_CALLER, ttl_seconds=60)),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
    ):
        async with rpc.connect(f"127.0.0.1:{port}", tls) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(channel, "fine")
            assert caught.value.code() == code


async def test_health_served_to_anyone_reflection_off(port: int) -> None:
    async with rpc.connect(f"127.0.0.1:{port}", _NO_TLS) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="test.Echo"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # Reflection lists every method to whoever reaches the port: off unless switched on.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                pass
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
