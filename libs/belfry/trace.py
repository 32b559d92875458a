"""The trace id of the call being served: from a W3C ``traceparent``, or new.

The RPC interceptor (``belfry.rpc``) sets it for each call, from the
caller's ``traceparent`` metadata entry when that is well formed (W3C Trace
Context: ``version-traceid-parentid-flags``, lower-case hex) and otherwise
from a fresh random id, so every call has one. It is bound as ``trace_id`` in
the call's log lines; code that hands work on (the dispatcher, which stores
it with the notification and its deliveries) reads it with ``current()``.

A malformed ``traceparent`` is ignored, never an error: tracing must not
refuse a call that is otherwise fine.
"""

from __future__ import annotations

import contextvars
import re
import secrets
import uuid
from collections.abc import Iterable
from typing import Any

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
