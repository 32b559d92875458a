"""The durable delivery queue in PostgreSQL, shared by every sender.

``store`` holds the SQL (enqueue, claim with leases and fencing tokens,
settle, rescue, expire); ``worker`` is the loop a sender runs around its
``handle(lease) -> Outcome`` function; ``sender`` is the scaffold every sender
service is wired with (settings block, worker, upkeep, outcome counting,
fan-out folding). See docs/queue.md for the semantics.
"""

from belfry.queue.store import (
    CHANNELS,
    Drop,
    Fail,
    Lease,
    NewDelivery,
    Outcome,
    Queue,
    Retry,
    Sent,
    enqueue,
)

__all__ = ["CHANNELS", "Drop", "Fail", "Lease", "NewDelivery", "Outcome", "Queue", "Retry", "Sent", "enqueue"]
