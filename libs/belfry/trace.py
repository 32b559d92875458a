"""The trace id of the call being served: from a W3C ``traceparent``, or new.

The RPC interceptor (``belfry.rpc``) sets it for each call, from the
caller's ``traceparent`` metadata entry when that is well formed (W3C Trace
Context: ``version-traceid-parentid-flags``, lower-case hex) and otherwise
from a fresh random id, so every call has one. It is bound as ``trace_id`` in
the call's log lines; code that hands work on (the dispatcher, which stores
it with the notification and its deliveries) reads it with ``current()``.

A malformed ``traceparent`` is ignored, never an error: tracing must not
refuse a call that is otherwise fine.

Outgoing calls carry the trace on: every channel of ``belfry.rpc.connect``
has the client interceptors of ``forwarding()``, which add a ``traceparent``
(the current trace id, a new span id) to a call made while a trace is bound,
unless the caller set one itself. The gateway binds the trace of an HTTP
request the same way (``services.gateway.api.traced``).
"""

from __future__ import annotations

import contextvars
import re
import secrets
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import grpc

METADATA_KEY = "traceparent"

# version 00 has exactly these four fields; a later version may append more
# ("-" and anything), which a version-00 reader ignores (W3C Trace Context, 4.3).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16

_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("belfry_trace_id", default=None)


def parse_traceparent(value: str) -> str | None:
    """The trace id (32 lower-case hex digits) of a valid ``traceparent``, else None."""
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None  # forbidden values (the spec says to treat them as absent)
    if version == "00" and rest is not None:
        return None  # version 00 has exactly four fields
    return trace_id


def is_trace_id(value: object) -> bool:
    """True for a trace id as this module makes them: 32 lower-case hex digits, not all zeros."""
    return isinstance(value, str) and _TRACE_ID.fullmatch(value) is not None and value != _ZERO_TRACE


def new_trace_id() -> str:
    """A fresh random trace id (never all zeros)."""
    while (trace_id := secrets.token_hex(16)) == _ZERO_TRACE:
        pass  # 1 in 2**128
    return trace_id


def new_span_id() -> str:
    """A fresh random span (parent) id: 16 lower-case hex digits, never all zeros."""
    while (span_id := secrets.token_hex(8)) == _ZERO_PARENT:
        pass  # 1 in 2**64
    return span_id


def traceparent(trace_id: str, span_id: str | None = None) -> str:
    """A version-00 ``traceparent`` (sampled) for ``trace_id``: the span id given, else a new one."""
    return f"00-{trace_id}-{span_id or new_span_id()}-01"


def from_header(value: str | None) -> str:
    """The trace id of an HTTP ``traceparent`` header when it is valid, else a new one (never an error)."""
    found = parse_traceparent(value) if value is not None else None
    return found if found is not None else new_trace_id()


def from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The trace id a call's invocation metadata carries in a valid ``traceparent``, else a new one."""
    for key, value in metadata or ():
        if key == METADATA_KEY and isinstance(value, str):
            found = parse_traceparent(value)
            if found is not None:
                return found
            break  # only the first entry counts; an invalid one means "none"
    return new_trace_id()


def current() -> str | None:
    """The trace id of the call being served (None outside one)."""
    return _CURRENT.get()


def bind(trace_id: str) -> contextvars.Token[str | None]:
    """Make ``trace_id`` current; give the token back to ``reset`` when the call ends."""
    return _CURRENT.set(trace_id)


def reset(token: contextvars.Token[str | None]) -> None:
    """Undo a ``bind``."""
    _CURRENT.reset(token)


def as_uuid(trace_id: str | None) -> uuid.UUID | None:
    """The 16 bytes of a trace id, as stored in uuid columns (the cheapest nullable 16-byte type)."""
    return None if trace_id is None else uuid.UUID(hex=trace_id)


def as_hex(value: uuid.UUID | None) -> str | None:
    """A stored trace id back in its W3C form (32 lower-case hex digits)."""
    return None if value is None else value.hex


def _forwarded(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """The call's details with a ``traceparent`` for the current trace, unless none is bound or one is set."""
    trace_id = _CURRENT.get()
    if trace_id is None or any(key == METADATA_KEY for key, _ in details.metadata or ()):
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(METADATA_KEY, traceparent(trace_id))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# grpc.aio sorts a channel's interceptors by their first matching kind: one class per kind.
# Each runs in the calling task's context (grpc.aio starts the interceptor task from the call), so
# ``current()`` there is the caller's trace.
class _ForwardUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]  # no grpc stubs
    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        """Unary call, trace forwarded."""
        return await continuation(_forwarded(details), request)


class _ForwardUnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]  # no grpc stubs
    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        """Server-streaming call, trace forwarded."""
        return await continuation(_forwarded(details), request)


class _ForwardStreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]  # no grpc stubs
    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        """Client-streaming call, trace forwarded."""
        return await continuation(_forwarded(details), requests)


class _ForwardStreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]  # no grpc stubs
    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        """Bidirectional call, trace forwarded."""
        return await continuation(_forwarded(details), requests)


def forwarding() -> list[Any]:
    """Client interceptors (all four call kinds) that forward the current trace as ``traceparent`` metadata."""
    return [_ForwardUnaryUnary(), _ForwardUnaryStream(), _ForwardStreamUnary(), _ForwardStreamStream()]
