"""Publishing the "your defaults changed" notices through the dispatcher, as a producer does.

``admin`` writes one handoff row per notice on the queue channel "dispatcher"
in the transaction of the change; this sender publishes each row's event.
The event's idempotency key comes from the row, so a publish whose answer was
lost is answered as a replay when the row is tried again. The queue does the
retrying (one call per attempt): an unreachable or overloaded dispatcher is
tried again later, a refusal (an account or user gone meanwhile) ends the row
as a dead letter with the dispatcher's reason.
"""

from __future__ import annotations

import grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.client import RETRYABLE, Publisher, retry_hint
from belfry.queue import Fail, Lease, Outcome, Retry, Sent
from belfry.queue.worker import Handler
from google.protobuf import json_format


def publisher_handler(publisher: Publisher) -> Handler:
    """The sender's ``handle(lease)``: publish the row's event (``publisher`` should not retry itself)."""

    async def handle(lease: Lease) -> Outcome:
        try:
            event = json_format.ParseDict(lease.payload, pb.Event())
        except json_format.ParseError as exc:
            return Fail(f"the handoff is not a dispatcher event: {exc}")
        try:
            await publisher.publish(event)
        except grpc.aio.AioRpcError as exc:
            error = f"the dispatcher answered {exc.code().name}: {exc.details()}"
            if exc.code() in RETRYABLE:
                return Retry(error, retry_hint(exc) or None)
            return Fail(error)
        return Sent()

    return handle
