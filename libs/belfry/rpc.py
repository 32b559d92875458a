"""The one gRPC bootstrap every service uses.

``create_server`` builds a grpc.aio server with the standard health service
(and reflection when switched on) and the one interceptor, binds it (port 0
in tests) and returns it with the bound port (``belfry.service`` runs it and
drains on SIGTERM). The interceptor admits each call by the allow-list of
``belfry.access`` before anything else happens, and maps typed errors to
status codes here and nowhere else.
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
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from belfry import access, balance, errors, identity, log, metrics, trace
from belfry.auth import TokenVerifier, bearer
from belfry.config import CommonSettings, TlsSettings

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
Deserializer = Callable[[bytes], Any]


class _Undecodable:
    """Stands in for a unary request whose bytes could not be parsed; the handler raises its error."""

    __slots__ = ("error",)

    def __init__(self, error: errors.InvalidArgument) -> None:
        self.error = error


def _undecodable(name: str, exc: Exception) -> errors.InvalidArgument:
    """The error a client gets for bytes that are not a ``name``, saying what is wrong with them."""
    reason = str(exc).rpartition("': ")[2] or type(exc).__name__
    if isinstance(exc, UnicodeDecodeError) or "UTF-8" in reason:
        reason = "invalid UTF-8 in a string field (every string field must be valid UTF-8)"
    elif "corrupt" in reason.lower():
        reason = "the bytes are not a protobuf encoding of it (corrupt wire format)"
    return errors.InvalidArgument(f"the request is not a valid {name}: {reason}")


def _message_name(deserializer: Deserializer, method: str) -> str:
    """``PublishRequest`` for the generated ``PublishRequest.FromString``; else the method's request."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "name", None)
    return name if isinstance(name, str) else f"request of {method}"


def _guard_unary(deserializer: Deserializer, method: str) -> Deserializer:
    """grpc parses a unary request before any handler runs and answers UNKNOWN when that fails;
    this returns a marker instead, which the wrapped handler turns into INVALID_ARGUMENT."""

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError) as exc:
            return _Undecodable(_undecodable(_message_name(deserializer, method), exc))

    return deserialize


def _guard_stream(deserializer: Deserializer, method: str) -> Deserializer:
    """Streamed requests are parsed as the handler reads them: the error is raised right there."""

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError) as exc:
            raise _undecodable(_message_name(deserializer, method), exc) from None

    return deserialize


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
    """Admits, binds log context, maps typed errors, counts and times every RPC.

    First the gate (``belfry.access``): a caller the allow-list does not name
    for the method gets PERMISSION_DENIED (UNAUTHENTICATED when it proves no
    identity) before the request is looked at; a bound producer's request is
    checked for its accounts (on a stream, message by message). Then, for a
    call carrying a user token, the user-token keys are made ready (an
    identity provider's new key is fetched here, so servicers verify in one
    synchronous step).

    It also guards every request deserializer: bytes that are not the
    request message (invalid UTF-8 in a string, a corrupt encoding) get
    INVALID_ARGUMENT naming the message and the fault, from every service
    alike, instead of grpc's UNKNOWN.
    """

    def __init__(self, service: str, gate: access.Gate, user_tokens: TokenVerifier | None) -> None:
        self._service = service
        self._gate = gate
        self._user_tokens = user_tokens
        # The wrapped handler of each method, built on its first call: grpc asks for the handler on every
        # call, and the wrapping (closures, a new method handler) depends only on the method.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _wrap(handler, method, self._service, _Admission(method, self._gate, self._user_tokens))
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class _Admission:
    """One method's admission: the gate's verdict, then the user-token keys."""

    __slots__ = ("gate", "method", "user_tokens")

    def __init__(self, method: str, gate: access.Gate, user_tokens: TokenVerifier | None) -> None:
        self.method = method
        self.gate = gate
        self.user_tokens = user_tokens

    async def __call__(self, context: grpc.aio.ServicerContext) -> access.Grant:
        grant = self.gate.admit(self.method, context)
        structlog.contextvars.bind_contextvars(caller=grant.caller)
        if self.user_tokens is not None and grant.rule.user:
            try:
                token = bearer(context.invocation_metadata())
            except errors.Unauthenticated:
                token = None  # the servicer says what is wrong with it
            if token is not None:
                await self.user_tokens.prepare(token)
        return grant


async def _checked(requests: AsyncIterator[Any], grant: access.Grant) -> AsyncIterator[Any]:
    """A request stream whose every message is checked against the caller's accounts as it is read."""
    async for request in requests:
        grant.check(request)
        yield request


def _account_of(request: Any) -> str:
    """The one account a unary request names (``account_id``, an event's, or a batch's all alike), else ""."""
    if request is None or type(request) is _Undecodable:
        return ""
    account = getattr(request, "account_id", None)
    if isinstance(account, str):
        return account
    event = getattr(request, "event", None)
    account = getattr(event, "account_id", None)
    if isinstance(account, str):
        return account
    events = getattr(request, "events", None)
    if events:
        accounts = {getattr(e, "account_id", "") for e in events}
        if len(accounts) == 1:
            found = accounts.pop()
            return found if isinstance(found, str) else ""
    return ""


async def _observe(
    service: str,
    method: str,
    context: grpc.aio.ServicerContext,
    run: Callable[[], Awaitable[Any]],
    request: Any = None,
) -> Any:
    """Run one call: log context, typed errors to statuses, metrics, one canonical log line.

    Every line the call logs carries ``method``, ``request_id`` and ``trace_id``
    (from the caller's ``traceparent`` when valid, else new: ``belfry.trace``),
    and ``account_id`` when the (unary) request names one account.
    """
    trace_id = trace.from_metadata(context.invocation_metadata())
    traced = trace.bind(trace_id)
    bound = {"method": method, "request_id": uuid.uuid4().hex[:16], "trace_id": trace_id}
    account = _account_of(request)
    if account:
        bound["account_id"] = account
    structlog.contextvars.bind_contextvars(**bound)
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
        level("rpc", code=code.name, duration_ms=round(elapsed * 1000, 2))
        structlog.contextvars.unbind_contextvars(*bound, "caller")
        trace.reset(traced)


def _wrap(handler: grpc.RpcMethodHandler, method: str, service: str, admit: _Admission) -> grpc.RpcMethodHandler:
    """The same handler, admitted and observed, with its request deserializer guarded."""
    parse = handler.request_deserializer
    if parse is not None:
        parse = (_guard_stream if handler.request_streaming else _guard_unary)(parse, method)
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def call_uu(request: Any, context: grpc.aio.ServicerContext) -> Any:
            grant = await admit(context)
            if type(request) is _Undecodable:
                raise request.error
            grant.check(request)
            return await inner_uu(request, context)

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await _observe(service, method, context, lambda: call_uu(request, context), request)

        return grpc.unary_unary_rpc_method_handler(unary_unary, parse, handler.response_serializer)
    if handler.stream_stream or handler.unary_stream:
        streaming = handler.unary_stream or handler.stream_stream

        # A coroutine that writes through the context: the aio server accepts
        # it for streaming methods, and it lets ``_observe`` see the whole call.
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            async def drain() -> None:
                grant = await admit(context)
                if handler.request_streaming:
                    arg = _checked(request, grant) if grant.binds() else request
                elif type(request) is _Undecodable:
                    raise request.error
                else:
                    grant.check(request)
                    arg = request
                result = streaming(arg, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        await context.write(item)
                else:
                    await result

            await _observe(service, method, context, drain, None if handler.request_streaming else request)

        factory = (
            grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        )
        return factory(stream, parse, handler.response_serializer)
    inner_su = handler.stream_unary

    async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async def call_su() -> Any:
            grant = await admit(context)
            return await inner_su(_checked(requests, grant) if grant.binds() else requests, context)

        return await _observe(service, method, context, call_su)

    return grpc.stream_unary_rpc_method_handler(stream_unary, parse, handler.response_serializer)


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
    """One long-lived channel per peer (reuse it; never open one per call).

    It presents our identity: the client certificate with mutual TLS, else
    the service token of ``tls`` on every call. A call made while a trace is
    bound (serving a call, or a gateway HTTP request) carries it on as a
    ``traceparent`` entry, unless the caller passed one (``belfry.trace.forwarding``).
    """
    options: list[tuple[str, Any]] = [
        *balance.CHANNEL_OPTIONS,  # every replica of the target, round robin; keepalives
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ]
    if override_authority:
        options.append(("grpc.ssl_target_name_override", override_authority))
    creds = channel_credentials(tls)
    # Every call carries the caller's trace on (``belfry.trace``: a traceparent when one is bound).
    interceptors = trace.forwarding()
    if tls.service_token and creds is None:
        interceptors += identity.presenting(tls.service_token)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)


async def create_health_server(
    address: str, health_servicer: health.aio.HealthServicer, *, reuse_port: bool = False
) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with only the standard health service (started), sharing the main server's state.

    Kubernetes gRPC probes speak plaintext and present no certificate, so with
    mutual TLS on the service port they get a port of their own that exposes
    nothing but serving status (shared by the pod's workers with ``reuse_port``).
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the gRPC health server to {address}")
    await server.start()
    return server, port


def gate_for(common: CommonSettings) -> access.Gate:
    """The gate of a service: its configured callers, service-token keys and trust domain."""
    return access.Gate(common.mesh.callers, tokens=common.mesh.verifier(), trust_domain=common.mesh.trust_domain)


async def create_server(
    service: str,
    registrations: Sequence[Registration],
    service_names: Sequence[str],
    address: str,
    tls: TlsSettings,
    *,
    gate: access.Gate | None = None,
    user_tokens: TokenVerifier | None = None,
    reflection_on: bool = False,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build and bind a server (not yet started); return it, its port and its health servicer.

    Without a ``gate`` nothing but health is admitted (deny by default).
    Reflection lists every method to whoever reaches the port, so it is off
    unless ``reflection_on``; health is always served. ``reuse_port``: the
    port is shared with the pod's other worker processes (``SO_REUSEPORT``:
    the kernel spreads new connections over them).
    """
    server = grpc.aio.server(
        interceptors=[_Interceptor(service, gate or access.Gate(access.Callers(), rules={}), user_tokens)],
        options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            *balance.SERVER_OPTIONS,
            # Off unless this process is one of a pod's workers (belfry.processes): a second server
            # started on a port in use then fails loudly instead of silently taking half its connections.
            ("grpc.so_reuseport", int(reuse_port)),
        ],
    )
    for register in registrations:
        register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_on:
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    creds = server_credentials(tls)
    port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the gRPC server to {address}")
    for name in [*service_names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer
