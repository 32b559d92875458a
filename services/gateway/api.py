"""The feed's JSON HTTP API: recent items (paged), unread count, read/seen/archive marks and their reverse.

Every request carries the user's token in ``Authorization: Bearer``; there
are no cookies, so a cross-site page cannot ride on ambient credentials.

Every API request has a trace (``traced``): the one of its W3C
``traceparent`` header when valid, else a new one. It is bound for the
request (log lines' ``trace_id``; the gRPC calls it makes carry it on) and
named in the ``traceresponse`` response header.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog
from belfry import trace
from belfry.auth import Caller, TokenIssuer, TokenVerifier
from belfry.errors import BelfryError, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway import limits, store
from services.gateway.origins import OriginPolicy

# W3C Trace Context Level 2: ``00-<trace id>-<the gateway's span id>-01``, parsed like a traceparent.
TRACE_RESPONSE_HEADER = "traceresponse"

_STATUS = {InvalidArgument: 400, Unauthenticated: 401, PermissionDenied: 403, NotFound: 404, ResourceExhausted: 429}
MAX_PAGE = 100
MAX_MARK_IDS = 500


Endpoint = Callable[[Request], Awaitable[Response]]


def traced(endpoint: Endpoint) -> Endpoint:
    """The endpoint run under the request's trace, which its response names in ``traceresponse``.

    The trace id is the one of a valid ``traceparent`` header (the same parser
    as gRPC metadata, ``belfry.trace``), else a new one: an invalid header is
    ignored, never refused.
    """

    async def run(request: Request) -> Response:
        trace_id = trace.from_header(request.headers.get(trace.METADATA_KEY))
        token = trace.bind(trace_id)
        try:
            with structlog.contextvars.bound_contextvars(trace_id=trace_id):
                response = await endpoint(request)
        finally:
            trace.reset(token)
        response.headers[TRACE_RESPONSE_HEADER] = trace.traceparent(trace_id)
        return response

    return run


def error_response(exc: BelfryError) -> JSONResponse:
    """A typed error as JSON with the matching HTTP status."""
    status = next((code for kind, code in _STATUS.items() if isinstance(exc, kind)), 500)
    headers = {"retry-after": limits.retry_after(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse({"error": exc.message, "field": exc.field}, status_code=status, headers=headers)


class Guard:
    """Authenticates a request, checks the Origin of state-changing ones and the user's request rate."""

    def __init__(self, verifier: TokenVerifier, origins: OriginPolicy, users: limits.Buckets | None = None) -> None:
        self.verifier = verifier
        self.origins = origins
        self.users = users

    def check_origin(self, request: Request) -> None:
        """PermissionDenied when a state-changing request comes from a foreign Origin."""
        if request.method != "GET" and not self.origins.allows(
            request.headers.get("origin"), request.headers.get("host")
        ):
            raise PermissionDenied("this origin may not call the gateway")

    async def caller(self, request: Request) -> Caller:
        """The caller named by the bearer token; Unauthenticated otherwise, ResourceExhausted over its rate."""
        self.check_origin(request)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("send the user token as 'Authorization: Bearer <token>'")
        # An identity provider's new key is fetched here first (at most once per refresh interval).
        caller = (await self.verifier.authenticate(token.strip()))[0]
        wait = self.users.take(f"{caller.account_id}\x00{caller.user_id}") if self.users is not None else 0.0
        if wait:
            raise ResourceExhausted("too many requests for this user; retry later", retry_after=wait)
        return caller


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object body; InvalidArgument when it is not one.

    The body is already read and bounded (``limits.HttpGate``), so the parse is bounded too.
    """
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidArgument("the body must be JSON") from exc
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    return body


def _int_param(request: Request, name: str, default: int | None, *, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidArgument(f"{name} must be an integer", field=name) from exc
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be between {low} and {high}", field=name)
    return value


def routes(pool: asyncpg.Pool, guard: Guard, issuer: TokenIssuer | None, demo_user: tuple[str, str]) -> list[Route]:
    """The feed routes (and the dev login, when an issuer is given)."""

    async def feed(request: Request) -> JSONResponse:
        """GET /api/feed?before=<id>&limit=<n>&archived=0|1: newest first."""
        try:
            caller = await guard.caller(request)
            before = _int_param(request, "before", None, low=1, high=2**62)
            limit = _int_param(request, "limit", 20, low=1, high=MAX_PAGE) or 20
            archived = request.query_params.get("archived", "0") in {"1", "true"}
            items = await store.page(
                pool, caller.account_id, caller.user_id, before_id=before, limit=limit, archived=archived
            )
            unread = await store.unread_count(pool, caller.account_id, caller.user_id)
            last = await store.last_id(pool, caller.account_id, caller.user_id)
        except BelfryError as exc:
            return error_response(exc)
        next_before = items[-1].id if len(items) == limit else None
        return JSONResponse(
            {"items": [i.to_json() for i in items], "unread": unread, "last_id": last, "next_before": next_before}
        )

    async def unread(request: Request) -> JSONResponse:
        """GET /api/unread: the badge count."""
        try:
            caller = await guard.caller(request)
            count = await store.unread_count(pool, caller.account_id, caller.user_id)
        except BelfryError as exc:
            return error_response(exc)
        return JSONResponse({"unread": count})

    async def dev_login(request: Request) -> JSONResponse:
        """POST /api/dev/login: a token for the seeded demo user (only with BELFRY_GATEWAY_DEV_LOGIN=true)."""
        if issuer is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        if not guard.origins.allows(request.headers.get("origin"), request.headers.get("host")):
            return error_response(PermissionDenied("this origin may not call the gateway"))
        account_id, user_id = demo_user
        return JSONResponse({"token": issuer.issue(account_id, user_id), "account_id": account_id, "user_id": user_id})

    return [
        Route("/api/feed", traced(feed), methods=["GET"]),
        Route("/api/unread", traced(unread), methods=["GET"]),
        *_marks(pool, guard),
        Route("/api/dev/login", traced(dev_login), methods=["POST"]),
    ]


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _marks(pool: asyncpg.Pool, guard: Guard) -> list[Route]:
    """The read-state routes: each change reaches the user's other tabs and phones (``store.read_state_changed``)."""

    async def changed_for(caller: Caller, changed: int, *, read_state: bool) -> JSONResponse:
        """The answer to a mark: how many items changed and the unread count now (others told when it moved)."""
        if changed and read_state:
            await store.read_state_changed(pool, caller.account_id, caller.user_id)
        count = await store.unread_count(pool, caller.account_id, caller.user_id)
        return JSONResponse({"changed": changed, "unread": count})

    async def mark(request: Request) -> JSONResponse:
        """POST /api/feed/mark {"ids": [...], "what": "read"|"seen"|"archive"|"unread"|"unarchive"}."""
        try:
            caller = await guard.caller(request)
            body = await json_body(request)
            what = body.get("what")
            if what not in store.MARKS:
                raise InvalidArgument("what must be one of read, seen, archive, unread, unarchive", field="what")
            ids = body.get("ids")
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i > 0 for i in ids):
                raise InvalidArgument("ids must be a non-empty list of positive feed ids", field="ids")
            if len(ids) > MAX_MARK_IDS:
                raise InvalidArgument(f"at most {MAX_MARK_IDS} ids per request", field="ids")
            changed = await store.mark(pool, caller.account_id, caller.user_id, ids, what)
            return await changed_for(caller, changed, read_state=what != "seen")
        except BelfryError as exc:
            return error_response(exc)

    async def open_notification(request: Request) -> JSONResponse:
        """POST /api/feed/open {"notification_id": ...}: the user opened it elsewhere (a push on a phone): read."""
        try:
            caller = await guard.caller(request)
            body = await json_body(request)
            notification_id = body.get("notification_id")
            if not isinstance(notification_id, str) or not _is_uuid(notification_id):
                raise InvalidArgument("notification_id must be a notification id (a UUID)", field="notification_id")
            changed = await store.mark_notification_read(pool, caller.account_id, caller.user_id, notification_id)
            return await changed_for(caller, changed, read_state=True)
        except BelfryError as exc:
            return error_response(exc)

    async def read_all(request: Request) -> JSONResponse:
        """POST /api/feed/read-all: every item read."""
        try:
            caller = await guard.caller(request)
            changed = await store.mark_all_read(pool, caller.account_id, caller.user_id)
            await store.read_state_changed(pool, caller.account_id, caller.user_id)
        except BelfryError as exc:
            return error_response(exc)
        return JSONResponse({"changed": changed, "unread": 0})

    return [
        Route("/api/feed/mark", traced(mark), methods=["POST"]),
        Route("/api/feed/open", traced(open_notification), methods=["POST"]),
        Route("/api/feed/read-all", traced(read_all), methods=["POST"]),
    ]
