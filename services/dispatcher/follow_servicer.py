"""The FollowService RPCs: a user follows, unfollows, mutes and unmutes records and threads.

The user-facing calls act for the user of the verified token (account and
user never come from the request); ``ListFollowers`` is internal.
"""
# ruff: noqa: N802  # RPC method names come from the proto

from __future__ import annotations

import base64
import binascii

import asyncpg
import grpc
from belfry import errors, text
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.auth import Caller, TokenVerifier

from services.dispatcher import follow_store, validate

_SEP = "\x1f"  # between the parts of a page token (a unit separator: never in an id we store)


class FollowServicer(dispatcher_pb2_grpc.FollowServiceServicer):
    """Follows and mutes over gRPC."""

    def __init__(self, pool: asyncpg.Pool, verifier: TokenVerifier) -> None:
        self._pool = pool
        self._verifier = verifier

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        return self._verifier.from_metadata(context.invocation_metadata())

    async def _set(
        self, request: pb.FollowRequest, context: grpc.aio.ServicerContext, flag: str, value: bool
    ) -> pb.FollowResponse:
        caller = self._caller(context)
        kind, ident = _object(request.object)
        row = await follow_store.set_flag(
            self._pool, caller.account_id, kind, ident, caller.user_id, flag=flag, value=value
        )
        return pb.FollowResponse(follow=_follow(row))

    async def Follow(self, request: pb.FollowRequest, context: grpc.aio.ServicerContext) -> pb.FollowResponse:
        """Follow a record or thread (an explicit choice: automatic follows never undo it)."""
        return await self._set(request, context, "following", True)

    async def Unfollow(self, request: pb.FollowRequest, context: grpc.aio.ServicerContext) -> pb.FollowResponse:
        """Stop following; remembered, so the object's events do not make the user follow it again."""
        return await self._set(request, context, "following", False)

    async def Mute(self, request: pb.FollowRequest, context: grpc.aio.ServicerContext) -> pb.FollowResponse:
        """Hear nothing about the object on any channel until unmuted (locked topics excepted)."""
        return await self._set(request, context, "muted", True)

    async def Unmute(self, request: pb.FollowRequest, context: grpc.aio.ServicerContext) -> pb.FollowResponse:
        """Hear about the object again."""
        return await self._set(request, context, "muted", False)

    async def ListFollows(
        self, request: pb.ListFollowsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFollowsResponse:
        """The caller's follows and mutes, by object, paged."""
        caller = self._caller(context)
        size = _page_size(request.page)
        after = _decode(request.page.page_token, 2) if request.page.page_token else ["", ""]
        rows = await follow_store.user_follows(
            self._pool, caller.account_id, caller.user_id, (after[0], after[1]), size + 1
        )
        page = rows[:size]
        token = _encode(page[-1].object_type, page[-1].object_id) if len(rows) > size else ""
        return pb.ListFollowsResponse(follows=[_follow(r) for r in page], next_page_token=token)

    async def ListFollowers(
        self, request: pb.ListFollowersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFollowersResponse:
        """Internal: a record's followers (following, not muted), by user id, paged."""
        if not request.account_id:
            raise errors.InvalidArgument("account_id is required", field="account_id")
        kind, ident = _object(request.object)
        size = _page_size(request.page)
        after = _decode(request.page.page_token, 1)[0] if request.page.page_token else ""
        rows = await follow_store.followers(self._pool, request.account_id, kind, ident, after=after, limit=size + 1)
        page = rows[:size]
        token = _encode(page[-1].user_id) if len(rows) > size else ""
        return pb.ListFollowersResponse(followers=[_follow(r) for r in page], next_page_token=token)


def _object(obj: pb.FollowedObject) -> tuple[str, str]:
    for name, value in (("object.type", obj.type), ("object.id", obj.id)):
        if not value:
            raise errors.InvalidArgument(f"{name} is required (e.g. type 'deal', id '123')", field=name)
        if len(value) > validate.MAX_TEXT:
            raise errors.InvalidArgument(f"{name} is longer than {validate.MAX_TEXT} characters", field=name)
        text.check_storable(value, name)
        if _SEP in value:
            raise errors.InvalidArgument(f"{name} contains a control character", field=name)
    return obj.type, obj.id


def _page_size(page: object) -> int:
    size = getattr(page, "page_size", 0) or 50
    if not 0 < size <= 500:
        raise errors.InvalidArgument("page.page_size must be between 1 and 500", field="page.page_size")
    return int(size)


def _encode(*parts: str) -> str:
    return base64.urlsafe_b64encode(_SEP.join(parts).encode()).decode()


def _decode(token: str, count: int) -> list[str]:
    try:
        parts = base64.urlsafe_b64decode(token.encode()).decode().split(_SEP)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise errors.InvalidArgument("page.page_token is not a token this API issued", field="page.page_token") from exc
    if len(parts) != count:
        raise errors.InvalidArgument("page.page_token is not a token this API issued", field="page.page_token")
    return parts


def _follow(row: follow_store.FollowRow) -> pb.Follow:
    answer = pb.Follow(
        object=pb.FollowedObject(type=row.object_type, id=row.object_id),
        user_id=row.user_id,
        following=row.following,
        muted=row.muted,
        source=row.source,
    )
    answer.updated_at.FromDatetime(row.updated_at)
    return answer
