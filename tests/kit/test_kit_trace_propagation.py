"""Outgoing calls carry the caller's trace on (``belfry.trace.forwarding``, installed by ``belfry.rpc.connect``).

A real grpc.aio server on port 0 answers every call kind with the metadata
it received, so the tests see exactly what went over the wire.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import pytest
from belfry import access, identity, rpc, trace
from belfry.config import TlsSettings

from tests.conftest import MESH_KEY, TEST_CALLER, client_tls

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OWN = f"00-{'a' * 32}-00f067aa0ba902b7-01"
_NO_TLS = TlsSettings(None, None, None)
_KINDS = ("UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream")


def _received(context: grpc.aio.ServicerContext) -> bytes:
    """The call's metadata (keys not reserved by gRPC) as a JSON list of pairs."""
    pairs = [(k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str)]
    return json.dumps(pairs).encode()


async def _unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _received(context)


async def _unary_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield _received(context)


async def _stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    async for _ in requests:
        pass
    return _received(context)


async def _stream_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for _ in requests:
        pass
    yield _received(context)


def _echo_handler() -> grpc.GenericRpcHandler:
    same = {"request_deserializer": None, "response_serializer": None}
    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(_unary_unary, **same),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream, **same),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary, **same),
            "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream, **same),
        },
    )


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    """A plain grpc.aio server (no Belfry interceptor) echoing the metadata of each call; its address."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_echo_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def _call(channel: grpc.aio.Channel, kind: str, metadata: Sequence[tuple[str, str]] = ()) -> list[list[str]]:
    """One call of ``kind``; the metadata the server received."""
    method = f"/test.Echo/{kind}"

    async def one() -> AsyncIterator[bytes]:
        yield b"x"

    if kind == "UnaryUnary":
        raw = await channel.unary_unary(method)(b"x", metadata=metadata)
    elif kind == "UnaryStream":
        (raw,) = [r async for r in channel.unary_stream(method)(b"x", metadata=metadata)]
    elif kind == "StreamUnary":
        raw = await channel.stream_unary(method)(one(), metadata=metadata)
    else:
        (raw,) = [r async for r in channel.stream_stream(method)(one(), metadata=metadata)]
    pairs: list[list[str]] = json.loads(raw)
    return pairs


def _traceparents(pairs: list[list[str]]) -> list[str]:
    return [v for k, v in pairs if k == trace.METADATA_KEY]


@pytest.fixture
def bound() -> Iterator[str]:
    """``TRACE`` bound as the current trace for the test."""
    token = trace.bind(TRACE)
    yield TRACE
    trace.reset(token)


@pytest.mark.parametrize("kind", _KINDS)
async def test_a_call_made_under_a_trace_carries_it_with_a_new_span_id(echo: str, bound: str, kind: str) -> None:
    async with rpc.connect(echo, _NO_TLS) as channel:
        first, second = _traceparents(await _call(channel, kind)), _traceparents(await _call(channel, kind))
    assert len(first) == 1 and len(second) == 1
    assert trace.parse_traceparent(first[0]) == bound == trace.parse_traceparent(second[0])
    version, trace_id, span_id, flags = first[0].split("-")
    assert (version, trace_id, flags) == ("00", bound, "01")
    assert span_id != second[0].split("-")[2]  # one span id per call


@pytest.mark.parametrize("kind", _KINDS)
async def test_without_a_bound_trace_no_traceparent_is_added(echo: str, kind: str) -> None:
    assert trace.current() is None
    async with rpc.connect(echo, _NO_TLS) as channel:
        assert _traceparents(await _call(channel, kind)) == []


@pytest.mark.parametrize("kind", _KINDS)
async def test_a_traceparent_the_caller_sets_is_kept_as_it_is(echo: str, bound: str, kind: str) -> None:
    async with rpc.connect(echo, _NO_TLS) as channel:
        assert _traceparents(await _call(channel, kind, [(trace.METADATA_KEY, OWN)])) == [OWN]


async def test_the_service_token_is_still_presented_next_to_the_trace(echo: str, bound: str) -> None:
    async with rpc.connect(echo, client_tls()) as channel:
        pairs = await _call(channel, "UnaryUnary", [("x-other", "1")])
    keys = [k for k, _ in pairs]
    assert {identity.METADATA_KEY, trace.METADATA_KEY, "x-other"} <= set(keys)
    assert keys.count(trace.METADATA_KEY) == 1


async def test_a_service_calling_on_while_serving_a_call_forwards_the_callers_trace(echo: str) -> None:
    """A Belfry server binds the caller's trace (``belfry.rpc``); its own outgoing call then carries it on."""
    downstream = rpc.connect(echo, _NO_TLS)

    async def relay(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return bytes(await downstream.unary_unary("/test.Echo/UnaryUnary")(request))

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            "test.Relay", {"Call": grpc.unary_unary_rpc_method_handler(relay, lambda b: b, lambda b: b)}
        )
        server.add_generic_rpc_handlers((handler,))

    gate = access.Gate(
        access.Callers(),
        tokens=identity.ServiceTokenVerifier(identity.parse_public_keys(MESH_KEY.public())),
        rules={"/test.Relay/Call": access.Rule(frozenset({TEST_CALLER}))},
    )
    server, port, _health = await rpc.create_server(
        "relay", [register], ["test.Relay"], "127.0.0.1:0", _NO_TLS, gate=gate
    )
    await server.start()
    try:
        async with rpc.connect(f"127.0.0.1:{port}", client_tls()) as channel:
            relay_call = channel.unary_unary("/test.Relay/Call")
            sent = f"00-{TRACE}-00f067aa0ba902b7-01"
            forwarded = _traceparents(json.loads(await relay_call(b"x", metadata=[(trace.METADATA_KEY, sent)])))
            fresh = _traceparents(json.loads(await relay_call(b"x")))
            invalid = _traceparents(json.loads(await relay_call(b"x", metadata=[(trace.METADATA_KEY, sent.upper())])))
    finally:
        await server.stop(0)
        await downstream.close()
    assert len(forwarded) == 1 and trace.parse_traceparent(forwarded[0]) == TRACE
    assert forwarded[0] != sent  # the relay's own span id, not its caller's
    # Without (or with an invalid) traceparent, the relay's call still carries the trace the relay made.
    for made in (fresh, invalid):
        assert len(made) == 1
        found = trace.parse_traceparent(made[0])
        assert found is not None and found != TRACE
    assert trace.current() is None
