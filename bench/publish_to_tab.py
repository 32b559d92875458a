"""Publish → tab latency through the real mesh, from the producer's call to the tab's receipt (issue 21).

Preferences, the dispatcher and the gateway (which hosts the bell sender) run
as separate processes (the ``belfry up`` supervisor, ``BELFRY_PROCESSES=1``)
on a fresh database of the local PostgreSQL for every run. ``--users`` users
are seeded; ``--topic`` (default ``contacts.duplicate_record``: bell only by
default, so no email deliveries pile up beside the bell ones) reaches their
bell. One websocket tab per user authenticates with a token of the local
keys and waits for its ``ready`` frame.

The producer is open loop: event ``i`` is due at ``t0 + i / rate`` (a call
of ``--batch`` K events at ``t0 + j * K / rate``). ``--callers`` tasks take
the next due call, sleep until it is due and make it: single ``Publish``
calls by default, ``PublishBatch`` of K events with ``--batch K``. Each event
names one random tab's user and carries its sequence number in the object id
(``D-<seq>``), which the feed frame carries back (``item.items[0].id``).
Latency is measured two ways:

* from call start: tab receipt - the moment the call carrying the event started;
* from schedule: tab receipt - the moment the call carrying the event was due
  (with ``--batch``, every event of a call has its call's due time). When every caller
  is busy the call starts late; the time it waited is in this figure, not
  hidden (coordinated omission), and the events that started over 5 ms late
  are counted ("late").

The first ``--warmup`` seconds of the stream are sent and delivered but left
out of the percentiles. Per run: events sent (accepted), received, lost
(accepted but never shown on a tab), duplicates, p50/p90/p99/max both ways,
the Publish call's own round trip, the achieved rate, CPU seconds and µs per
event of each process (this database's PostgreSQL backends, and the whole
server), and where the time went by stage, from the rows' own timestamps
(transaction start times on the database clock, the same machine's clock):
accept (call start → notification row), fan-out (→ bell delivery row), bell
(→ feed row: the gateway's queue claim), push (→ tab: the feed commit, NOTIFY,
the hub's read and the websocket frame).

Beside every run, unless ``--no-peers``: the queue-only path of
``bench.gateway_fanout`` (bell deliveries enqueued straight on the queue, a
lone gateway process: what the dispatcher hop adds is the difference) and the
bare ``websockets`` broadcast floor, at the same rate, tabs and duration.

Usage: python -m bench.publish_to_tab [--users 200] [--rate 1000] [--seconds 10] [--runs 5] [--callers 256]
                                      [--batch K] [--warmup 2] [--topic contacts.duplicate_record] [--no-peers]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import psutil
import uvloop
import websockets
from belfry import log
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.auth import TokenIssuer
from belfry.client import Publisher
from belfry.local import supervisor

from bench import datapath_common as common
from bench import gateway_common as gc
from bench import gateway_fanout as gf
from bench.queue_common import drop_database, scratch_database

SERVICES = ("preferences", "dispatcher", "gateway")
GOAL_MS = 100.0
LATE_S = 0.005  # a call that starts more than this after it was due counts as late


@dataclass
class Stream:
    """The schedule, what each call saw, and what each tab received (times: epoch seconds, this machine's clock)."""

    t0: float
    rate: float
    calls: list[list[pb.Event]]  # events of each call, in schedule order
    first: list[int]  # sequence number of each call's first event
    per_call: int = 1  # events per call
    next_call: int = 0
    started: dict[int, float] = field(default_factory=dict)  # seq → its call's start
    answered: dict[int, float] = field(default_factory=dict)  # seq → its call's end (accepted events only)
    nid: dict[str, int] = field(default_factory=dict)  # notification id → seq
    refused: Counter[str] = field(default_factory=Counter)  # events not accepted, by reason
    arrived: dict[int, float] = field(default_factory=dict)  # seq → first receipt on a tab
    duplicates: int = 0
    closed: Counter[str] = field(default_factory=Counter)  # tabs closed by the server, by code

    def due(self, seq: int) -> float:
        """When the call carrying event ``seq`` was due (its first event's place in the schedule)."""
        return self.t0 + (seq - seq % self.per_call) / self.rate


def _seq(item: dict[str, object]) -> int | None:
    items = item.get("items")
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        return None
    ident = str(items[0].get("id", ""))
    return int(ident[2:]) if ident.startswith("D-") else None


async def _tab(ws: websockets.ClientConnection, s: Stream) -> None:
    """Record the first receipt of every item frame."""
    try:
        async for raw in ws:
            now = time.time()
            frame = json.loads(raw)
            if frame.get("type") != "item":
                continue
            seq = _seq(frame["item"])
            if seq is None:
                continue
            if seq in s.arrived:
                s.duplicates += 1
            else:
                s.arrived[seq] = now
    except websockets.ConnectionClosed as exc:
        s.closed[str(exc.rcvd.code if exc.rcvd else "none")] += 1


async def _caller(
    stub: dispatcher_pb2_grpc.DispatcherServiceStub, s: Stream, batch: int, publisher: Publisher | None = None
) -> None:
    """Take the next due call, wait until it is due, make it; open loop over every caller.

    With ``publisher``, each single event goes through ``Publisher.submit`` (the client library gathers
    the events waiting into batch calls) instead of its own ``Publish`` call.
    """
    while s.next_call < len(s.calls):
        j = s.next_call
        s.next_call += 1
        events, first = s.calls[j], s.first[j]
        delay = s.due(first) - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.time()
        for k in range(len(events)):
            s.started[first + k] = started
        try:
            ids = await _send(stub, events, batch, publisher, s)
        except grpc.aio.AioRpcError as exc:
            s.refused[exc.code().name] += len(events)
            continue
        ended = time.time()
        for k, nid in enumerate(ids):
            if nid:
                s.nid[nid] = first + k
                s.answered[first + k] = ended


async def _send(
    stub: dispatcher_pb2_grpc.DispatcherServiceStub,
    events: list[pb.Event],
    batch: int,
    publisher: Publisher | None,
    s: Stream,
) -> list[str]:
    """Make one call; each event's notification id ("" when refused, counted in ``s.refused``)."""
    if publisher is not None:
        statuses = [await publisher.submit(events[0])]
    elif batch == 0:
        one = await stub.Publish(pb.PublishRequest(event=events[0]), timeout=60)
        return [one.notification_id]
    else:
        statuses = list((await stub.PublishBatch(pb.PublishBatchRequest(events=events), timeout=60)).statuses)
    ids = []
    for status in statuses:
        if status.outcome == pb.OUTCOME_ACCEPTED:
            ids.append(status.notification_id)
        else:
            ids.append("")
            s.refused[f"{pb.Outcome.Name(status.outcome)} {status.code}"] += 1
    return ids


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ms (NaN when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _summary(values: list[float]) -> tuple[float, float, float, float]:
    return _pct(values, 0.5), _pct(values, 0.9), _pct(values, 0.99), max(values, default=float("nan")) * 1000


@dataclass
class Result:
    """One run's figures (latencies ms)."""

    sent: int
    accepted: int
    received: int
    lost: int
    refused: int
    late: int
    max_late_ms: float
    from_call: tuple[float, float, float, float]
    from_due: tuple[float, float, float, float]
    call_rtt: tuple[float, float, float, float]
    achieved: float
    lines: list[str]


async def _open_tabs(
    port: int, users: list[str], s: Stream
) -> tuple[list[websockets.ClientConnection], list[asyncio.Task[None]]]:
    issuer = TokenIssuer({common.KEY_ID: common.KEY.encode()}, common.KEY_ID, ttl_seconds=3600)
    limit = asyncio.Semaphore(20)

    async def one(user: str) -> websockets.ClientConnection:
        async with limit:
            ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_queue=None)
            await ws.send(json.dumps({"type": "auth", "token": issuer.issue(common.ACCOUNT, user)}))
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if frame.get("type") == "ready":
                    return ws

    tabs = list(await asyncio.gather(*(one(u) for u in users)))
    readers = [asyncio.create_task(_tab(ws, s)) for ws in tabs]
    return tabs, readers


_STAGES = """
select n.notification_id::text as nid, extract(epoch from n.accepted_at)::float8 as accepted,
       extract(epoch from d.created_at)::float8 as queued, extract(epoch from f.created_at)::float8 as stored
from dispatcher.notifications n
join queue.deliveries d on d.account_id = n.account_id and d.notification_id = n.notification_id and d.channel = 'bell'
join gateway.feed f on f.account_id = n.account_id and f.notification_id = n.notification_id
where n.account_id = $1
"""


async def _stages(conn: asyncpg.Connection, s: Stream, measured: set[int]) -> str:
    """p50 / p99 of each stage over the measured events, from the rows' timestamps."""
    parts: dict[str, list[float]] = {"accept": [], "fan-out": [], "bell": [], "push": []}
    for r in await conn.fetch(_STAGES, common.ACCOUNT):
        seq = s.nid.get(r["nid"])
        if seq is None or seq not in measured or seq not in s.arrived:
            continue
        parts["accept"].append(r["accepted"] - s.started[seq])
        parts["fan-out"].append(r["queued"] - r["accepted"])
        parts["bell"].append(r["stored"] - r["queued"])
        parts["push"].append(s.arrived[seq] - r["stored"])
    n = len(parts["push"])
    return f"stages ({n} events; p50 / p99 ms): " + ", ".join(
        f"{k} {_pct(v, 0.5):.1f} / {_pct(v, 0.99):.1f}" for k, v in parts.items()
    )


async def run_mesh(args: argparse.Namespace, run: int) -> Result:
    """One run on a fresh database and a fresh mesh."""
    dsn = await scratch_database()
    name = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(dsn)
    home = Path(tempfile.mkdtemp(prefix="belfry-bench-"))
    env = common.mesh_env(dsn, home)
    port = gc.free_port()
    cap = str(args.users + 100)
    env.update(
        BELFRY_PROCESSES="1",
        BELFRY_GATEWAY_HTTP_PORT=str(port),
        # One client address stands for every browser here: its socket cap and handshake rate are lifted.
        BELFRY_GATEWAY_MAX_SOCKETS_PER_CLIENT=cap,
        BELFRY_GATEWAY_CLIENT_BURST=cap,
        BELFRY_GATEWAY_CLIENT_RATE="1000",
    )
    children: list[supervisor.Child] = []
    tabs: list[websockets.ClientConnection] = []
    readers: list[asyncio.Task[None]] = []
    channel: grpc.aio.Channel | None = None
    try:
        if run == 0:
            print(await common.versions(conn, "grpcio", "asyncpg", "uvloop", "uvicorn", "wsproto", "websockets"))
        if args.split_fanout:
            env["BELFRY_DISPATCHER_FANOUT_WORKERS"] = "0"  # the producers' dispatcher only accepts
        children = await supervisor.start_mesh(env, SERVICES)
        if args.split_fanout:
            # A second dispatcher process, reached by nobody, whose workers fan out what the first accepts.
            behind = dict(env, BELFRY_DISPATCHER_FANOUT_WORKERS="2", BELFRY_DISPATCHER_GRPC_ADDRESS="127.0.0.1:0")
            [fanning] = await supervisor.start_mesh(behind, ["dispatcher"])
            children.append(dataclasses.replace(fanning, name="fan-out"))
        users = common.user_ids(args.users)
        await common.seed(env, users)
        k = max(1, args.batch)
        total = int(args.rate * (args.warmup + args.seconds))
        total -= total % k
        events = []
        for seq in range(total):
            ev = common.event(seq, [random.choice(users)])
            ev.topic = args.topic
            events.append(ev)
        s = Stream(t0=0.0, rate=args.rate, calls=[events[i : i + k] for i in range(0, total, k)],
                   first=list(range(0, total, k)), per_call=k)  # fmt: skip
        tabs, readers = await _open_tabs(port, users, s)
        channel = common.connect(env, env["BELFRY_DISPATCHER_ADDRESS"])
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        await channel.channel_ready()
        procs = {c.name: psutil.Process(c.process.pid) for c in children}
        procs["client"] = psutil.Process()
        meter = common.Cpu(procs, name)
        load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
        wal_start = await conn.fetchval("select pg_current_wal_lsn()")
        await meter.start(conn)
        began = time.monotonic()
        s.t0 = time.time() + 0.05
        publisher = Publisher(channel, gatherings=args.gatherings) if args.submit else None
        await asyncio.gather(*(_caller(stub, s, args.batch, publisher) for _ in range(args.callers)))
        sending_ended = time.time()
        deadline = time.monotonic() + args.settle
        while time.monotonic() < deadline and any(q not in s.arrived for q in s.answered):  # noqa: ASYNC110 - a bench waits on a count
            await asyncio.sleep(0.05)
        used = await meter.stop(conn)
        wall = time.monotonic() - began
        # Server-wide (the tabs' presence refreshes and any other database's work count too).
        wal = float(await conn.fetchval("select pg_current_wal_lsn() - $1::pg_lsn", wal_start))
        warm = int(args.rate * args.warmup)
        measured = {q for q in s.answered if q >= warm}
        lost = sorted(q for q in s.answered if q not in s.arrived)
        late_by = [s.started[q] - s.due(q) for q in range(warm, total) if q in s.started]
        from_call = [s.arrived[q] - s.started[q] for q in measured if q in s.arrived]
        from_due = [s.arrived[q] - s.due(q) for q in measured if q in s.arrived]
        rtt = [s.answered[q] - s.started[q] for q in measured]
        window_end = max((s.answered[q] for q in measured), default=sending_ended)
        achieved = len(measured) / max(1e-9, window_end - s.due(warm))
        lines = [
            f"load average {load_before} at the start, {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end "
            f"(other people's work on this machine shows here); "
            f"refused/failed {dict(s.refused) or 0}, duplicates {s.duplicates}, tabs closed {dict(s.closed) or 0}"
            + (f", first lost seqs {lost[:10]}" if lost else ""),
            await _stages(conn, s, measured),
            f"CPU (warm-up + window + arrival wait, {wall:.1f} s, {len(s.answered):,} events): "
            + common.cpu_line(used, wall, max(1, len(s.answered)), "event")
            + f"; WAL {wal / max(1, len(s.answered)):,.0f} B per event",
        ]
        return Result(
            sent=total - warm,
            accepted=len(measured),
            received=len(from_call),
            lost=len(lost),
            refused=sum(s.refused.values()),
            late=sum(1 for x in late_by if x > LATE_S),
            max_late_ms=max(late_by, default=0.0) * 1000,
            from_call=_summary(from_call),
            from_due=_summary(from_due),
            call_rtt=_summary(rtt),
            achieved=achieved,
            lines=lines,
        )
    finally:
        for r in readers:
            r.cancel()
        for ws in tabs:
            with contextlib.suppress(Exception):
                await ws.close()
        if channel is not None:
            await channel.close()
        await supervisor.stop_all(children, 10)
        await conn.close()
        await drop_database(dsn)
        shutil.rmtree(home, ignore_errors=True)


def _row(label: str, v: tuple[float, float, float, float]) -> str:
    return f"{label} {v[0]:6.1f} {v[1]:6.1f} {v[2]:6.1f} {v[3]:7.1f}"


async def main() -> None:
    """``--runs`` runs of the mesh (each beside the queue-only path and the bare websockets floor); the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s offered")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds sent before the window, not measured")
    parser.add_argument("--runs", type=int, default=5)
    # 64 callers cap single Publish near 0.85k/s here: a call's round trip is the dispatcher's group commit (~75 ms).
    parser.add_argument("--callers", type=int, default=256, help="concurrent producer tasks (calls in flight at most)")
    parser.add_argument("--batch", type=int, default=0, help="K > 0: PublishBatch of K events every K/rate s")
    parser.add_argument("--topic", default="contacts.duplicate_record")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds to wait for the last frames")
    parser.add_argument("--no-peers", action="store_true", help="skip the queue-only path and the websockets floor")
    parser.add_argument(
        "--submit",
        action="store_true",
        help="single events through the client library's Publisher.submit (gathered into batch calls)",
    )
    parser.add_argument("--gatherings", type=int, default=1, help="with --submit: batch calls in flight at once")
    parser.add_argument(
        "--split-fanout",
        action="store_true",
        help="the producers' dispatcher only accepts (BELFRY_DISPATCHER_FANOUT_WORKERS=0); a second one fans out",
    )
    args = parser.parse_args()
    log.configure(service="bench", level="warning")  # the scratch databases' migrations are not news
    mode = f"PublishBatch of {args.batch}" if args.batch else "Publisher.submit" if args.submit else "single Publish"
    print(
        f"{mode}, {args.rate:,.0f} events/s offered, {args.seconds:.0f} s measured after {args.warmup:.0f} s warm-up, "
        f"{args.users} tabs, {args.callers} callers, topic {args.topic}, {args.runs} runs, {os.cpu_count()} cores",
        flush=True,
    )
    results: list[Result] = []
    queue_only: list[tuple[float, float, float, float]] = []
    floor: list[tuple[float, float, float, float]] = []
    qdsn = None if args.no_peers else await scratch_database()
    try:
        for run in range(args.runs):
            r = await run_mesh(args, run)
            results.append(r)
            print(
                f"run {run + 1}: sent {r.sent:,} accepted {r.accepted:,} received {r.received:,} lost {r.lost} "
                f"late {r.late:,} (max {r.max_late_ms:.0f} ms), achieved {r.achieved:,.0f}/s; ms p50/p90/p99/max "
                f"from call start {'/'.join(f'{x:.1f}' for x in r.from_call)}, "
                f"from schedule {'/'.join(f'{x:.1f}' for x in r.from_due)}, "
                f"call round trip {'/'.join(f'{x:.1f}' for x in r.call_rtt)}",
                flush=True,
            )
            for line in r.lines:
                print(f"    {line}", flush=True)
            if qdsn is not None:
                lat, cpu = await gf.run_gateway(qdsn, args.users, int(args.rate), args.seconds)
                queue_only.append(_summary(lat))
                print(f"    queue-only (gateway_fanout) {'/'.join(f'{x:.1f}' for x in queue_only[-1])} ms; {cpu}")
                bare = await gf.run_peer(args.users, int(args.rate), args.seconds)
                floor.append(_summary(bare))
                print(f"    websockets floor {'/'.join(f'{x:.1f}' for x in floor[-1])} ms", flush=True)
    finally:
        if qdsn is not None:
            await drop_database(qdsn)
    print(f"\n{mode} at {args.rate:,.0f} events/s, {args.users} tabs; latency ms (p50 p90 p99 max)")
    print(
        "run      sent  received  lost   late  achieved/s | from call start            | from schedule              "
        "| call round trip"
    )
    for i, r in enumerate(results):
        print(
            f"{i + 1:3} {r.sent:9,} {r.received:9,} {r.lost:5} {r.late:6,} {r.achieved:10,.0f} |"
            f"{_row('', r.from_call)} |{_row('', r.from_due)} |{_row('', r.call_rtt)}"
        )
    for label, runs in (("queue-only path (gateway_fanout)", queue_only), ("bare websockets floor", floor)):
        for i, v in enumerate(runs):
            print(f"{label:34} run {i + 1}: {_row('', v)}")
    p99_call = [r.from_call[2] for r in results]
    p99_due = [r.from_due[2] for r in results]
    lost = sum(r.lost + r.refused for r in results)
    print(
        f"\np99 from call start: median {statistics.median(p99_call):.1f} ms, worst {max(p99_call):.1f} ms; "
        f"from schedule: median {statistics.median(p99_due):.1f} ms, worst {max(p99_due):.1f} ms; "
        f"lost or refused {lost}"
    )
    if queue_only:
        print(
            f"median p99: queue-only path {statistics.median(v[2] for v in queue_only):.1f} ms, "
            f"websockets floor {statistics.median(v[2] for v in floor):.1f} ms"
        )
    ok = all(p < GOAL_MS for p in p99_call) and lost == 0
    ok_due = all(p < GOAL_MS for p in p99_due) and lost == 0
    behind = sum(r.late for r in results)
    print(
        f"goal 'p99 < {GOAL_MS:.0f} ms in every run, nothing lost or refused' from call start: {'PASS' if ok else 'FAIL'}; "
        f"from schedule: {'PASS' if ok_due else 'FAIL'}"
        + (
            f" (the schedule fell behind: {behind:,} events whose call started > {LATE_S * 1000:.0f} ms late)"
            if behind
            else ""
        )
    )


if __name__ == "__main__":
    uvloop.run(main())
