"""The gRPC bootstrap: typed errors become statuses with rich details; health serves."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from belfry import errors, rpc
from belfry.config import TlsSettings
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

_NO_TLS = TlsSettings(None, None, None)


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
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server, port, _health = await rpc.create_server("test", [_register], ["test.Echo"], "127.0.0.1:0", _NO_TLS)
    await server.start()
    chan = rpc.connect(f"127.0.0.1:{port}", _NO_TLS)
    yield chan
    await chan.close()
    await server.stop(0)


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


async def test_health_and_reflection_served(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service="test.Echo"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
