"""The one gRPC bootstrap every service uses.

``create_server`` builds a grpc.aio server with the standard health and
reflection services and the error/logging/metrics interceptor, binds it
(port 0 in tests) and returns it with the bound port (``belfry.service`` runs
it and drains on SIGTERM). Typed errors are mapped to status codes here and
nowhere else.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from belfry import errors, log, metrics
from belfry.config import TlsSettings

_LOG = log.get(__name__)

_CODES: dict[type[errors.BelfryError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
}

# A servicer registration: the generated ``add_XServicer_to_server`` bound to a servicer.
Registration = Callable[[grpc.aio.Server], None]


def status_code_of(exc: errors.BelfryError) -> grpc.StatusCode:
    """The gRPC status for a typed error (the most specific class wins)."""
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(exc: errors.BelfryError) -> grpc.Status:
    """A rich status: code, message, and BadRequest / RetryInfo details when known."""
    code = status_code_of(exc)
    details: list[any_pb2.Any] = []
    if exc.field is not None:
        packed = any_pb2.Any()
        packed.Pack(
            error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.message)]
            )
        )
        details.append(packed)
    if exc.retry_after is not None:
        packed = any_pb2.Any()
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(int(exc.retry_after * 1e9))
        packed.Pack(info)
        details.append(packed)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=exc.message, details=details)
    return rpc_status.to_status(proto)


class _Interceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type stubs
    """Binds log context, maps typed errors, counts and times every RPC."""

    def __init__(self, service: str) -> None:
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        service = self._service

        async def observe(context: grpc.aio.ServicerContext, run: Callable[[], Awaitable[Any]]) -> Any:
            structlog.contextvars.bind_contextvars(rpc=method, request_id=uuid.uuid4().hex[:16])
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await run()
            except errors.BelfryError as exc:
                code = status_code_of(exc)
                await context.abort_with_status(to_status(exc))
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                _LOG.exception("rpc failed")
                await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
            finally:
                elapsed = time.perf_counter() - started
                metrics.RPC_REQUESTS.labels(service, method, code.name).inc()
                metrics.RPC_LATENCY.labels(service, method).observe(elapsed)
                if code != grpc.StatusCode.OK:
                    metrics.RPC_ERRORS.labels(service, method, code.name).inc()
                # One canonical line per request; healthy traffic at debug level.
                level = _LOG.info if code != grpc.StatusCode.OK else _LOG.debug
                level("rpc", code=code.name, ms=round(elapsed * 1000, 2))
                structlog.contextvars.unbind_contextvars("rpc", "request_id")

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await observe(context, lambda: inner_uu(request, context))

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream or handler.unary_stream:
            streaming = handler.unary_stream or handler.stream_stream

            # A coroutine that writes through the context: the aio server accepts
            # it for streaming methods, and it lets ``observe`` see the whole call.
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                async def drain() -> None:
                    result = streaming(request, context)
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            await context.write(item)
                    else:
                        await result

                await observe(context, drain)

            factory = (
                grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
            )
            return factory(stream, handler.request_deserializer, handler.response_serializer)
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await observe(context, lambda: inner_su(requests, context))

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """TLS credentials; with a CA configured, client certificates are required and verified."""
    if not tls.enabled:
        return None
    assert tls.cert is not None and tls.key is not None
    root = tls.ca.read_bytes() if tls.ca is not None else None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials | None:
    """Client-side TLS: verify the server against the CA and present our certificate."""
    if not tls.enabled:
        return None
    assert tls.cert is not None and tls.key is not None
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes() if tls.ca is not None else None,
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )


def connect(target: str, tls: TlsSettings, *, override_authority: str | None = None) -> grpc.aio.Channel:
    """One long-lived channel per peer (reuse it; never open one per call)."""
    options: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ]
    if override_authority:
        options.append(("grpc.ssl_target_name_override", override_authority))
    creds = channel_credentials(tls)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)


async def create_health_server(address: str, health_servicer: health.aio.HealthServicer) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with only the standard health service (started), sharing the main server's state.

    Kubernetes gRPC probes speak plaintext and present no certificate, so with
    mutual TLS on the service port they get a port of their own that exposes
    nothing but serving status.
    """
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the gRPC health server to {address}")
    await server.start()
    return server, port


async def create_server(
    service: str,
    registrations: Sequence[Registration],
    service_names: Sequence[str],
    address: str,
    tls: TlsSettings,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build and bind a server (not yet started); return it, its port and its health servicer."""
    server = grpc.aio.server(
        interceptors=[_Interceptor(service)],
        options=[("grpc.max_receive_message_length", 16 * 1024 * 1024), ("grpc.so_reuseport", 0)],
    )
    for register in registrations:
        register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    creds = server_credentials(tls)
    port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the gRPC server to {address}")
    for name in [*service_names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer
