"""Bytes that are not the request message get INVALID_ARGUMENT from every method of every service.

The guard lives once, in the kit's RPC interceptor: each service here is
started the way ``belfry serve`` starts it (its own settings and build, a
real server on port 0, a real PostgreSQL), and every method it declares is
sent raw bytes built from the method's own request descriptor.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from belfry import service
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor

from tests.conftest import acting_channel, every_service_env, fresh_database

BAD_UTF8 = b"A\xff\xfeA"
TRUNCATED = b"\x0a\x05ab"  # field 1, length-delimited, 5 bytes announced, 2 sent


# Senders claim every due row of their channel: these run on a database of their own.
@pytest.fixture(scope="module")
async def database_url(admin_dsn: str) -> AsyncIterator[str]:
    """This module's own freshly migrated database."""
    async with fresh_database(admin_dsn) as url:
        yield url


@pytest.fixture(scope="module")
async def mesh(
    database_url: str, token_keys: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, service.Running]]:
    """Every service, started in-process on port 0 from its own settings."""
    home: Path = tmp_path_factory.mktemp("decode")
    env = every_service_env(database_url, token_keys, home)  # nothing is queued: SMTP is never reached
    running: dict[str, service.Running] = {}
    try:
        for declared in service.declared():
            name = declared.name
            settings = importlib.import_module(f"{declared.package}.settings").load_settings(env)
            build = importlib.import_module(f"{declared.package}.server").build_for(settings)
            running[name] = await service.start(name, settings.common, build)
            env[f"BELFRY_{name.upper()}_ADDRESS"] = f"127.0.0.1:{running[name].port}"
        yield running
    finally:
        for started in reversed(running.values()):
            await started.stop(0.1)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _with_bad_string(message: Descriptor, seen: frozenset[str] = frozenset()) -> bytes | None:
    """An encoding of ``message`` whose first reachable string field holds invalid UTF-8."""
    for field in message.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return _field(field.number, BAD_UTF8)
    for field in message.fields:
        inner = field.message_type
        if inner is not None and inner.full_name not in seen:
            nested = _with_bad_string(inner, seen | {message.full_name})
            if nested is not None:
                return _field(field.number, nested)
    return None


async def _answer(channel: grpc.aio.Channel, method: MethodDescriptor, raw: bytes) -> grpc.aio.AioRpcError:
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    call = kind(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    request = iter([raw]) if method.client_streaming else raw

    async def complete() -> None:
        if method.server_streaming:
            async for _ in call(request):
                pass
        else:
            await call(request)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await complete()
    return caught.value


async def test_every_method_of_every_service_refuses_undecodable_bytes(
    mesh: dict[str, service.Running],
) -> None:
    pool = descriptor_pool.Default()
    probed: dict[str, int] = {}
    for name, running in mesh.items():
        async with acting_channel(f"127.0.0.1:{running.port}") as channel:
            for service_name in running.built.service_names:
                for method in pool.FindServiceByName(service_name).methods:
                    expected = f"the request is not a valid {method.input_type.name}: "
                    bad = _with_bad_string(method.input_type)
                    if bad is not None:
                        error = await _answer(channel, method, bad)
                        where = (name, method.full_name, error.code(), error.details())
                        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, where
                        assert expected + "invalid UTF-8 in a string field" in (error.details() or ""), where
                    error = await _answer(channel, method, TRUNCATED)
                    where = (name, method.full_name, error.code(), error.details())
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, where
                    assert expected + "the bytes are not a protobuf encoding" in (error.details() or ""), where
                    probed[name] = probed.get(name, 0) + 1
    # Every service that serves an API was probed (the gateway serves only health over gRPC).
    assert set(probed) == {name for name, r in mesh.items() if r.built.service_names}
    assert len(probed) >= len(service.declared()) - 1
