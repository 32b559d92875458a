"""The scaffold every sender shares: one settings block, the worker and queue upkeep, fan-out folding.

A sender service brings its handler (``handle(lease) -> Outcome``, and
optionally a per-batch ``prepare``); ``sender_loops`` gives back the loops
``belfry.service.Built`` runs:

* the worker (``belfry.queue.worker.run``) on a ``Queue`` of the channel,
  built from the settings block and the deployment's Retry-After clamp; the
  worker counts every outcome once in
  ``belfry_deliveries_total{channel,outcome}`` and observes
  ``belfry_end_to_end_seconds{channel,outcome}`` when it is recorded, with
  the one vocabulary ``worker.OUTCOMES`` (``sent``, ``retry``, ``fail``,
  ``dropped``; docs/observability.md);
* queue upkeep (``belfry.queue.worker.maintain``): retention and the queue
  gauges. Every sender runs it, so whatever a deployment sends through, the
  queue is kept small; purges skip the rows another replica holds, so any
  number of replicas share the work.

The push senders fan one delivery out to several endpoints (browsers,
devices, webhooks): ``fan_out`` sends to them at most ``SenderSettings.fanout``
at a time (so one user's many endpoints cannot take every connection of the
sender at once), each endpoint's answer is a ``Result`` and ``fold`` makes the
delivery's one outcome of them.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from belfry import background
from belfry.config import AccountRange, CommonSettings, Env
from belfry.queue import worker
from belfry.queue.store import Fail, Outcome, Queue, Retry, Sent


@dataclass(frozen=True)
class SenderSettings:
    """The queue side of one sender, read by ``load_sender_settings``."""

    worker_id: str  # this replica's name in leases and error histories (BELFRY_WORKER_ID)
    batch: int  # leases held at most
    concurrency: int  # deliveries handled at once
    lease_seconds: float
    retention_seconds: float  # finished deliveries are purged after this (BELFRY_QUEUE_RETENTION_SECONDS)
    max_retry_after_seconds: float  # a peer's Retry-After is clamped to this (the common block's)
    preferences_address: str = "127.0.0.1:50051"  # the directory QueueAdmin asks who is a super admin
    fanout: int = 4  # endpoints of one delivery sent to at once (BELFRY_<NAME>_FANOUT)
    accounts: AccountRange = AccountRange.ALL  # whose deliveries it claims (BELFRY_ACCOUNT_RANGE, the common block's)


def load_sender_settings(
    env: Env,
    common: CommonSettings,
    name: str,
    *,
    batch: int,
    concurrency: int,
    lease_seconds: float,
    min_lease_seconds: float = 0.1,
) -> SenderSettings:
    """``BELFRY_WORKER_ID``, ``BELFRY_<NAME>_BATCH``, ``_CONCURRENCY``, ``_LEASE_SECONDS``, ``_FANOUT``,
    the retention and ``BELFRY_PREFERENCES_ADDRESS`` (QueueAdmin's directory)."""
    prefix = f"BELFRY_{name.upper()}"
    return SenderSettings(
        worker_id=env.str("BELFRY_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"),
        batch=env.int(f"{prefix}_BATCH", batch, minimum=1),
        concurrency=env.int(f"{prefix}_CONCURRENCY", concurrency, minimum=1),
        lease_seconds=env.float(f"{prefix}_LEASE_SECONDS", lease_seconds, minimum=min_lease_seconds),
        retention_seconds=env.float("BELFRY_QUEUE_RETENTION_SECONDS", 7 * 86400.0, minimum=0.0),
        max_retry_after_seconds=common.max_retry_after_seconds,
        preferences_address=env.address("BELFRY_PREFERENCES_ADDRESS", "127.0.0.1:50051"),
        fanout=env.int(f"{prefix}_FANOUT", 4, minimum=1),
        accounts=common.accounts,
    )


def sender_loops(
    pool: asyncpg.Pool,
    channel: str,
    handle: worker.Handler,
    settings: SenderSettings,
    *,
    prepare: worker.Preparer | None = None,
) -> list[background.Loop]:
    """The background loops of a sender of ``channel``: its worker (which counts the outcomes) and queue upkeep."""
    queue = Queue(
        pool,
        channel,
        worker=settings.worker_id,
        lease_seconds=settings.lease_seconds,
        max_retry_after=settings.max_retry_after_seconds,
        accounts=settings.accounts,
    )

    async def send(stop: asyncio.Event) -> None:
        await worker.run(
            queue, handle, stop=stop, batch=settings.batch, concurrency=settings.concurrency, prepare=prepare
        )

    async def upkeep(stop: asyncio.Event) -> None:
        await worker.maintain(pool, stop=stop, retention_seconds=settings.retention_seconds)

    return [send, upkeep]


@dataclass(frozen=True)
class Result:
    """What happened to one endpoint of a fan-out (a browser, a device, a webhook)."""

    kind: str  # "sent" | "retry" | "fail" | "gone" (the endpoint is dead: its owner deletes or disables it)
    reason: str = ""
    retry_after: float | None = None


_Endpoint = TypeVar("_Endpoint")


async def fan_out(
    endpoints: Sequence[_Endpoint], send: Callable[[_Endpoint], Awaitable[Result]], limit: int
) -> list[Result]:
    """``send`` to every endpoint, at most ``limit`` at a time; the results in the endpoints' order."""
    if len(endpoints) <= limit:
        return list(await asyncio.gather(*(send(e) for e in endpoints)))
    gate = asyncio.Semaphore(limit)

    async def one(endpoint: _Endpoint) -> Result:
        async with gate:
            return await send(endpoint)

    return list(await asyncio.gather(*(one(e) for e in endpoints)))


def fold(results: Sequence[Result]) -> Outcome:
    """One delivery's outcome from its endpoints' results.

    One endpoint reached is a delivered notification (retrying all of them for
    one slow endpoint would ring the others again); otherwise any retryable
    answer retries the delivery, no earlier than the longest Retry-After;
    otherwise it fails with every distinct reason.
    """
    if any(r.kind == "sent" for r in results):
        return Sent()
    retries = [r for r in results if r.kind == "retry"]
    if retries:
        delays = [r.retry_after for r in retries if r.retry_after is not None]
        return Retry("; ".join(r.reason for r in retries), max(delays) if delays else None)
    return Fail("; ".join(dict.fromkeys(r.reason for r in results)))
