"""gRPC servicer of the batching service: protobuf in and out, nothing else."""
# ruff: noqa: N802  # RPC method names come from the proto

from __future__ import annotations

from typing import TypeAlias

import grpc
from belfry.api.batching.v1 import batching_pb2, batching_pb2_grpc
from belfry.errors import InvalidArgument
from google.protobuf.timestamp_pb2 import Timestamp

from services.batching import status
from services.batching.status import OpenWindow

Context: TypeAlias = grpc.aio.ServicerContext
_MAX_LIMIT = 1000


def _ts(value: object) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)  # type: ignore[arg-type]  # callers pass aware datetimes
    return ts


def _window_pb(w: OpenWindow) -> batching_pb2.OpenWindow:
    return batching_pb2.OpenWindow(
        window_id=str(w.window_id),
        user_id=w.user_id,
        object_type=w.object_type,
        topic=w.topic,
        opened_at=_ts(w.opened_at),
        closes_at=_ts(w.closes_at),
        object_ids=list(w.object_ids),
        attempts=w.attempts,
        last_error=w.last_error,
    )


class BatchingServicer(batching_pb2_grpc.BatchingServiceServicer):
    """Operator view of windows, holds and digests."""

    def __init__(self, reader: status.Reader) -> None:
        self._reader = reader

    async def GetStatus(
        self, request: batching_pb2.GetStatusRequest, context: Context
    ) -> batching_pb2.GetStatusResponse:
        """Counts of open, retrying and overdue windows, held deliveries and digests (one account or all)."""
        s = await self._reader.status(request.account_id.strip() or None)
        response = batching_pb2.GetStatusResponse(
            open_windows=s.open_windows,
            held_deliveries=s.held_deliveries,
            windows_retrying=s.windows_retrying,
            digest_subjects=s.digest_subjects,
            digests_sent=s.digests_sent,
        )
        if s.oldest_due_window is not None:
            response.oldest_due_window.CopyFrom(_ts(s.oldest_due_window))
        return response

    async def ListOpenWindows(
        self, request: batching_pb2.ListOpenWindowsRequest, context: Context
    ) -> batching_pb2.ListOpenWindowsResponse:
        """One account's open assignment windows with the objects still in them."""
        if not request.account_id.strip():
            raise InvalidArgument("account_id is required: name the account whose windows to list", field="account_id")
        if request.limit < 0 or request.limit > _MAX_LIMIT:
            raise InvalidArgument(f"limit must be between 0 and {_MAX_LIMIT} (0 means 100)", field="limit")
        windows = await self._reader.open_windows(
            request.account_id.strip(), request.user_id.strip(), request.limit or 100
        )
        return batching_pb2.ListOpenWindowsResponse(windows=[_window_pb(w) for w in windows])
