"""JSON HTTP endpoints of the web app, proxied to the preferences, webpush and dispatcher (follows) services.

The page's bearer token is passed through as ``authorization`` metadata: the
services authorise the user themselves (roles are looked up there, never
here). The RPCs in ``_PUBLIC`` (the VAPID public key) need no token, here as
over gRPC. Only the user-facing RPCs listed below are reachable; a gRPC status
becomes the matching HTTP status with the service's own message. The call
carries the request's trace (``api.traced``) to the service as its
``traceparent``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from belfry import access, rpc
from belfry.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.api.webpush.v1 import webpush_pb2, webpush_pb2_grpc
from belfry.config import TlsSettings
from belfry.errors import BelfryError, InvalidArgument
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.gateway.api import Guard, error_response, json_body, traced

# RPCs that need no token (the service says so in its proto): served without one, none passed on.
_PUBLIC = frozenset({("webpush", "GetVapidPublicKey")})
# json_format.ParseDict is pure Python (≈ 0.4 ms per KiB here): a larger body is turned into its
# message on a worker thread, so the event loop (every tab of this replica) keeps its turns meanwhile.
_PARSE_INLINE_BYTES = 8 * 1024

_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _message(body: dict[str, Any], request_type: type[Message]) -> Message:
    """The request message from its JSON form; InvalidArgument when it does not fit."""
    try:
        return json_format.ParseDict(body, request_type())
    except json_format.ParseError as exc:
        raise InvalidArgument(f"the body does not fit {request_type.__name__}: {exc}") from exc


def _methods(
    stub: object, pb2: Any, service: str, names: tuple[str, ...]
) -> dict[str, tuple[Callable[..., Any], type[Message]]]:
    descriptor = pb2.DESCRIPTOR.services_by_name[service]
    found: dict[str, tuple[Callable[..., Any], type[Message]]] = {}
    for name in names:
        method = descriptor.methods_by_name[name]
        found[name] = (getattr(stub, name), getattr(pb2, method.input_type.name))
    return found


class Proxies:
    """One reused channel per service; routes ``POST /api/<service>/<Method>``.

    ``<service>`` is ``preferences``, ``webpush`` or ``follows`` (the dispatcher's FollowService).
    """

    def __init__(
        self,
        preferences_target: str,
        webpush_target: str,
        dispatcher_target: str,
        tls: TlsSettings,
        timeout: float = 10.0,
    ) -> None:
        self._channels = [
            rpc.connect(preferences_target, tls),
            rpc.connect(webpush_target, tls),
            rpc.connect(dispatcher_target, tls),
        ]
        self.preferences = self._channels[0]
        self._timeout = timeout
        self._services = {
            "preferences": _methods(
                preferences_pb2_grpc.PreferencesServiceStub(self._channels[0]),
                preferences_pb2,
                "PreferencesService",
                access.relayed("gateway", "belfry.api.preferences.v1.PreferencesService"),
            ),
            "webpush": _methods(
                webpush_pb2_grpc.WebPushStub(self._channels[1]),
                webpush_pb2,
                "WebPush",
                access.relayed("gateway", "belfry.api.webpush.v1.WebPush"),
            ),
            # Follow, Unfollow, Mute, Unmute, ListFollows: the caller's own (ListFollowers is internal).
            "follows": _methods(
                dispatcher_pb2_grpc.FollowServiceStub(self._channels[2]),
                dispatcher_pb2,
                "FollowService",
                access.relayed("gateway", "belfry.api.dispatcher.v1.FollowService"),
            ),
        }

    async def close(self) -> None:
        """Close the channels."""
        for channel in self._channels:
            await channel.close()

    def routes(self, guard: Guard) -> list[Route]:
        """The proxy route."""

        async def call(request: Request) -> JSONResponse:
            """POST /api/{service}/{method} with the request message as JSON."""
            service, name = request.path_params["service"], request.path_params["method"]
            public = (service, name) in _PUBLIC
            try:
                if public:
                    guard.check_origin(request)
                else:
                    await guard.caller(request)  # reject early and check the Origin; the service re-verifies the token
                methods = self._services.get(service, {})
                if name not in methods:
                    raise InvalidArgument(f"unknown method {name!r}", field="method")
                method, request_type = methods[name]
                body = await json_body(request)
                if len(await request.body()) > _PARSE_INLINE_BYTES:
                    message = await asyncio.to_thread(_message, body, request_type)
                else:
                    message = _message(body, request_type)
            except BelfryError as exc:
                return error_response(exc)
            metadata = () if public else (("authorization", request.headers["authorization"]),)
            try:
                reply = await method(message, metadata=metadata, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                status = _HTTP.get(exc.code(), 502)
                return JSONResponse({"error": exc.details() or exc.code().name, "code": exc.code().name}, status)
            # Defaults are printed too: the page reads "enabled": false rather than a missing key.
            return JSONResponse(
                json_format.MessageToDict(
                    reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                )
            )

        return [Route("/api/{service}/{method}", traced(call), methods=["POST"])]
