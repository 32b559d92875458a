"""Memory per idle websocket connection: the gateway beside a bare ``websockets`` server.

Each run starts a fresh server process, opens ``--connections`` authenticated
idle connections (each its own user, as tabs are) with a minimal raw client
that offers per-message compression and answers keepalive pings as browsers
do, and reports (RSS after - RSS after a warm-up) / connections. The peer is
a bare ``websockets`` server with compression off that answers one message;
``--bare-uvicorn`` adds a minimal ASGI app under uvicorn with the gateway's
old websocket options (``websockets-sansio``), ``--bare-granian`` the same app
under granian (not a Belfry dependency: install it into a directory on
PYTHONPATH).

``--variant NAME:KEY=VALUE,...`` runs the gateway again with those
``uvicorn.Config`` arguments replaced (values are JSON, else strings), to
compare uvicorn's websocket implementations and options in the same run;
``--profile`` runs the (last) gateway variant once under tracemalloc and
prints the allocating lines per idle tab (snapshots at the warm-up and after
``--connections`` more); ``--bandwidth`` prints what per-message deflate
saves on typical feed frames.

Usage: python -m bench.gateway_idle [--connections 10000] [--runs 3]
       [--variant sansio:ws=websockets-sansio] [--bare-uvicorn] [--profile] [--bandwidth]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

import uvloop
from belfry.auth import TokenIssuer

from bench import gateway_common as gc
from bench.queue_common import drop_database, scratch_database, versions

WARMUP = 200

# Runs ``python -m services.gateway`` with uvicorn.Config arguments replaced (BENCH_UVICORN, JSON) and,
# with BENCH_SNAPSHOT set, tracemalloc on and a snapshot written on each SIGUSR1.
WRAPPER = """
import json, os, runpy, signal, sys
overrides = json.loads(os.environ.get("BENCH_UVICORN", "{}"))
if overrides:
    import uvicorn
    base = uvicorn.Config.__init__
    def init(self, *args, **kwargs):
        kwargs.update(overrides)
        base(self, *args, **kwargs)
    uvicorn.Config.__init__ = init
target = os.environ.get("BENCH_SNAPSHOT")
if target:
    import tracemalloc
    tracemalloc.start(int(os.environ.get("BENCH_FRAMES", "1")))
    taken = []
    def snap(*_):
        taken.append(1)
        tracemalloc.take_snapshot().dump(f"{target}.tmp")
        os.rename(f"{target}.tmp", f"{target}.{len(taken)}")
    signal.signal(signal.SIGUSR1, snap)
sys.argv = ["services.gateway"]
runpy.run_module("services.gateway", run_name="__main__", alter_sys=True)
"""

# A minimal ASGI app under uvicorn: accept, answer the first message, then wait for the close.
BARE_UVICORN = """
import json, sys, uvicorn
overrides = json.loads(sys.argv[2])

async def app(scope, receive, send):
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept"})
    await receive()
    await send({"type": "websocket.send", "text": '{"type": "ready"}'})
    while (await receive())["type"] != "websocket.disconnect":
        pass

options = dict(ws="websockets-sansio", ws_per_message_deflate=False, ws_max_size=64 * 1024, lifespan="off",
               log_config=None, access_log=False, loop="uvloop", backlog=4096)
options.update(overrides)
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), **options))
server.config.load()
print("READY", flush=True)
server.run()
"""


# The same minimal app under granian (a Rust HTTP/websocket server), embedded in this process: needs granian
# importable (it is not a Belfry dependency: e.g. pip install --target DIR granian, then PYTHONPATH=DIR).
BARE_GRANIAN = """
import asyncio, sys, uvloop
from granian.constants import Interfaces
from granian.server.embed import Server

async def app(scope, receive, send):
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept"})
    await receive()
    await send({"type": "websocket.send", "text": '{"type": "ready"}'})
    while (await receive())["type"] != "websocket.disconnect":
        pass

async def main():
    server = Server(app, address="127.0.0.1", port=int(sys.argv[1]), interface=Interfaces.ASGI, backlog=4096)
    loop = asyncio.get_running_loop()
    loop.call_later(1.0, lambda: print("READY", flush=True))
    await server.serve()

uvloop.run(main())
"""


def _start_script(script: str, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", script, str(port)], stdout=subprocess.PIPE)  # noqa: S603 - fixed
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def _parse_variant(text: str) -> tuple[str, dict[str, object]]:
    name, _, options = text.partition(":")
    overrides: dict[str, object] = {}
    for pair in filter(None, options.split(",")):
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return name, overrides


def _start_gateway(
    dsn: str, port: int, connections: int, overrides: dict[str, object], snapshot: str = ""
) -> subprocess.Popen[bytes]:
    """One process (not a pod), its socket caps and per-address handshake rate lifted: every tab is from 127.0.0.1."""
    room = str(connections + WARMUP + 100)
    return gc.start_gateway(
        dsn,
        port,
        argv=("-c", WRAPPER),
        BELFRY_PROCESSES="1",  # one process holds every tab: its RSS is the figure
        BELFRY_GATEWAY_CLIENT_RATE="0",
        BELFRY_GATEWAY_MAX_SOCKETS=room,
        BELFRY_GATEWAY_MAX_SOCKETS_PER_CLIENT=room,
        BENCH_UVICORN=json.dumps(overrides),
        BENCH_SNAPSHOT=snapshot,
    )


def _start_bare_uvicorn(port: int, overrides: dict[str, object]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(  # noqa: S603 - fixed code
        [sys.executable, "-c", BARE_UVICORN, str(port), json.dumps(overrides)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    time.sleep(0.5)  # READY is printed just before the socket is bound
    return proc


async def _open(port: int, first: Callable[[int], str], start: int, count: int, parallel: int) -> list[object]:
    limiter = asyncio.Semaphore(parallel)

    async def one(i: int) -> object:
        async with limiter:
            return await gc.idle_client(port, first(i), deflate=True)

    return list(await asyncio.gather(*(one(i) for i in range(start, start + count))))


async def measure(
    pid: int, port: int, first: Callable[[int], str], connections: int, snapshot: str = ""
) -> tuple[float, float]:
    """KiB per connection and connections opened per second."""
    held = await _open(port, first, 0, WARMUP, 100)
    await asyncio.sleep(3.0)  # past the header deadline (2 s): the upgraded HTTP protocol objects are gone
    before = gc.rss(pid)
    if snapshot:
        await _snapshot(pid, snapshot, 1)
    started = time.perf_counter()
    held += await _open(port, first, WARMUP, connections, 200)
    rate = connections / (time.perf_counter() - started)
    await asyncio.sleep(3.0)  # let the server settle (presence writes, buffers, the header deadline)
    after = gc.rss(pid)
    if snapshot:
        await _snapshot(pid, snapshot, 2)
    for writer in held:
        writer.close()  # type: ignore[attr-defined]
    return (after - before) / connections / 1024, rate


async def _snapshot(pid: int, target: str, n: int) -> None:
    os.kill(pid, signal.SIGUSR1)
    written = Path(f"{target}.{n}")
    # Polled: the file is written by another process (renamed into place once complete).
    while not await asyncio.to_thread(written.exists):  # noqa: ASYNC110 - no event to wait on across processes
        await asyncio.sleep(0.2)


def _print_profile(target: str, connections: int, top: int = 30) -> None:
    first = tracemalloc.Snapshot.load(f"{target}.1")
    second = tracemalloc.Snapshot.load(f"{target}.2")
    stats = second.compare_to(first, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"tracemalloc: {total / connections / 1024:.2f} KiB of Python objects per tab; by allocating line:")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        where = frame.filename.split("site-packages/")[-1].replace(str(gc.ROOT) + "/", "")
        print(
            f"  {stat.size_diff / connections:8.0f} B  {stat.count_diff / connections:5.1f} blocks  "
            f"{where}:{frame.lineno}"
        )


def _bandwidth(frames: int = 200) -> None:
    """Bytes on the wire for typical feed frames, uncompressed and with per-message deflate as uvicorn offers it."""
    from websockets.extensions.permessage_deflate import PerMessageDeflate  # noqa: PLC0415 - only here
    from websockets.frames import Frame, Opcode  # noqa: PLC0415 - only here

    topics = ["comments.mentioned", "quotes.assigned", "invoices.overdue", "tasks.due"]
    texts = []
    for i in range(frames):
        item = {
            "id": 1000 + i,
            "notification_id": str(uuid.uuid4()),
            "topic": topics[i % 4],
            "title": f"Bruno mentioned you in Quote Q-{100 + i}",
            "body": f"“Can you check the discount on line {i % 7 + 1} before we send it?”",
            "url": f"https://app.example/quotes/Q-{100 + i}#comment-{5000 + i}",
            "items": [],
            "count": 1,
            "in_feed": True,
            "popup": i % 3 == 0,
            "browser": False,
            "sound": "",
            "created_at": f"2026-12-02T03:{i % 60:02d}:00.{i:06d}+00:00",
            "seen": False,
            "read": False,
            "archived": False,
        }
        texts.append(json.dumps({"type": "item", "item": item, "unread": i + 1}).encode())
    raw = sum(len(t) for t in texts)
    print(f"{frames} item frames, {raw / frames:.0f} B of JSON each (frame headers left out):")
    for name, takeover, bits in [
        ("uvicorn's deflate (window 2^12, memLevel 5)", True, 12),
        ("no context takeover", False, 12),
    ]:
        ext = PerMessageDeflate(not takeover, not takeover, 12, bits, {"memLevel": 5})
        sent = sum(len(ext.encode(Frame(Opcode.TEXT, t)).data) for t in texts)
        print(f"  {name:44} {sent / frames:5.0f} B each, {sent / raw:.0%} of uncompressed")


Server = tuple[str, Callable[[int], subprocess.Popen[bytes]], Callable[[int], str]]


async def _run(servers: list[Server], runs: int, connections: int) -> dict[str, list[tuple[float, float]]]:
    """Each server in turn, ``runs`` times (alternating): KiB per connection and opening rate per run."""
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in servers}
    for _ in range(runs):
        for name, start, first in servers:
            port = gc.free_port()
            proc = start(port)
            try:
                results[name].append(await measure(proc.pid, port, first, connections))
            finally:
                proc.terminate()
                proc.wait()
    return results


async def _profile(
    dsn: str, name: str, overrides: dict[str, object], auth: Callable[[int], str], n: int, top: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = f"{tmp}/snapshot"
        port = gc.free_port()
        gateway = _start_gateway(dsn, port, n, overrides, target)
        try:
            kib, _ = await measure(gateway.pid, port, auth, n, target)
        finally:
            gateway.terminate()
            gateway.wait()
        print(f"{name}: {kib:.1f} KiB RSS per tab under tracemalloc")
        _print_profile(target, n, top)


async def main() -> None:
    """Run the servers ``--runs`` times, alternating, and print the medians."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... uvicorn.Config overrides")
    parser.add_argument("--bare-uvicorn", action="store_true", help="also a minimal ASGI app under uvicorn")
    parser.add_argument("--bare-granian", action="store_true", help="also the minimal ASGI app under granian")
    parser.add_argument("--no-peer", action="store_true", help="skip the bare websockets server")
    parser.add_argument("--profile", action="store_true", help="one tracemalloc run of the (last) gateway variant")
    parser.add_argument("--top", type=int, default=30, help="allocating lines the profile prints")
    parser.add_argument("--bandwidth", action="store_true", help="only what per-message deflate saves on the wire")
    args = parser.parse_args()
    if args.bandwidth:
        _bandwidth()
        return
    variants: list[tuple[str, dict[str, object]]] = [("gateway", {})] + [_parse_variant(v) for v in args.variant]
    dsn = await scratch_database()
    issuer = TokenIssuer(gc.KEYS, "k1", ttl_seconds=3600)

    def auth(i: int) -> str:
        return json.dumps({"type": "auth", "token": issuer.issue("acc_bench", f"u{i}")})

    def hello(i: int) -> str:
        return json.dumps({"type": "auth", "token": f"t{i}"})

    def gateway(overrides: dict[str, object]) -> Callable[[int], subprocess.Popen[bytes]]:
        return lambda port: _start_gateway(dsn, port, args.connections, overrides)

    try:
        print(await versions(dsn, "uvicorn", "starlette", "websockets", "wsproto", "asyncpg"))
        if args.profile:
            await _profile(dsn, *variants[-1], auth, args.connections, args.top)
            return
        servers: list[Server] = [(name, gateway(overrides), auth) for name, overrides in variants]
        if args.bare_uvicorn:
            servers.append(("bare uvicorn", lambda port: _start_bare_uvicorn(port, {}), hello))
        if args.bare_granian:
            servers.append(("bare granian", lambda port: _start_script(BARE_GRANIAN, port), hello))
        if not args.no_peer:
            servers.append(("websockets peer", gc.start_peer, hello))
        results = await _run(servers, args.runs, args.connections)
        print(f"{args.connections} idle connections, median of {args.runs} runs")
        for name, overrides in variants:
            if overrides:
                print(f"  {name}: uvicorn.Config {overrides}")
        for name, runs in results.items():
            kib = statistics.median(r[0] for r in runs)
            rate = statistics.median(r[1] for r in runs)
            print(
                f"  {name:16} {kib:6.1f} KiB per connection   {rate:7.0f} connections opened/s   runs: "
                + ", ".join(f"{r[0]:.1f}" for r in runs)
            )
    finally:
        await drop_database(dsn)


if __name__ == "__main__":
    uvloop.run(main())
