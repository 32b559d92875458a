"""Web push: Belfry's sender beside pywebpush's ``webpush_async`` (50 concurrent, one shared session).

Same work on both sides, per message: RFC 8291 aes128gcm encryption with a
fresh ECDH key, VAPID authorization, one HTTPS POST to a loopback sink
(``webpush_sink.py``, several processes, answers 201). Belfry's side is
``WebPushSender.deliver`` — the SSRF check (resolve once, pin), the cached
VAPID header, pywebpush's encoder and a pinned httpx request — without the
database work around it; it posts over the sender's one aiohttp session,
whose resolver answers only with the address the guard approved.
pywebpush signs a new VAPID JWT per call (its documented usage) and posts
with aiohttp. Runs alternate; medians of ``--runs``. The sink's ceiling is
measured first with pre-encrypted bodies.

Usage: python bench/webpush_send.py [--messages 3000] [--runs 3] [--concurrency 50] [--sink-procs 2] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import io
import os
import platform
import pstats
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path

import aiohttp
import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid01
from pywebpush import webpush_async

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import webpush_sink  # type: ignore[import-not-found]  # the sibling script, on sys.path at run time
from belfry import ssrf

from services.webpush import client
from services.webpush.sender import WebPushSender
from services.webpush.vapid import Vapid
from tests.push.fakes.tls import make_pki

PAYLOAD = (
    b'{"title":"Contact assigned","body":"Ana Tester assigned Contact 42 to you","url":'
    b'"https://app.example.com/contacts/42","tag":"0b7c2f7e-6c1a-4a53-9a0e-3f1f2b1d9c11","count":1}'
)
HEADERS = {"content-encoding": "aes128gcm", "ttl": "3600", "urgency": "normal"}


def b64(data: bytes) -> str:
    """Base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def subscriptions(port: int, count: int = 100) -> list[dict[str, object]]:
    """Browser subscriptions on the sink (keys as browsers make them)."""
    subs: list[dict[str, object]] = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        subs.append(
            {
                "endpoint": f"https://localhost:{port}/push/{i}",
                "keys": {"p256dh": b64(point), "auth": b64(os.urandom(16))},
            }
        )
    return subs


async def drive(count: int, concurrency: int, one: Callable[[int], Awaitable[bool]]) -> tuple[float, int]:
    """Run ``one(i)`` for ``count`` messages, ``concurrency`` at a time; → (msgs/s, failures)."""
    next_i = 0
    failures = 0

    async def lane() -> None:
        nonlocal next_i, failures
        while next_i < count:
            i = next_i
            next_i += 1
            if not await one(i):
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return count / (time.perf_counter() - start), failures


class Meter:
    """CPU seconds of this process and of the sink processes."""

    def __init__(self, sinks: list[psutil.Process]) -> None:
        self._me = psutil.Process()
        self._sinks = sinks

    def snapshot(self) -> tuple[float, float]:
        """(client, sink) CPU seconds so far."""
        own = sum(self._me.cpu_times()[:2])
        sink = sum(sum(p.cpu_times()[:2]) for p in self._sinks)
        return own, sink


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--sink-procs", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print where Belfry's client CPU goes")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="belfry-bench-"))
    pki = make_pki(tmp)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workers = webpush_sink.start(str(pki.cert_file), str(pki.key_file), port, args.sink_procs)
    await asyncio.sleep(1.0)
    meter = Meter([psutil.Process(w.pid) for w in workers if w.pid])
    subs = subscriptions(port)

    context = ssl.create_default_context()  # pywebpush's session and the sink ceiling
    context.load_verify_locations(cafile=str(pki.ca_file))
    policy = ssrf.Policy(
        allowed_hosts=("localhost",), allowed_ports=(port,), allowed_networks=ssrf.parse_networks("127.0.0.0/8")
    )
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    peer_vapid = Vapid01.from_pem(pem)

    resolver = client.PinnedResolver()
    pinned_session = client.session(resolver, ca_file=pki.ca_file, max_connections=args.concurrency)
    sender = WebPushSender(
        pool=None,  # type: ignore[arg-type]  # deliver() never touches the database
        session=pinned_session,
        resolver=resolver,
        guard=ssrf.Guard(policy),
        vapid=Vapid(key, "mailto:bench@example.com"),
        default_ttl=3600,
    )
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=args.concurrency))

    async def belfry(i: int) -> bool:
        sub = subs[i % len(subs)]
        keys = sub["keys"]
        assert isinstance(keys, dict)
        result = await sender.deliver(str(sub["endpoint"]), keys["p256dh"], keys["auth"], PAYLOAD, HEADERS)
        return result.kind == "sent"

    async def peer(i: int) -> bool:
        response = await webpush_async(
            subscription_info=subs[i % len(subs)],
            data=PAYLOAD.decode(),
            vapid_private_key=peer_vapid,
            vapid_claims={"sub": "mailto:bench@example.com"},
            ttl=3600,
            aiohttp_session=session,
        )
        return getattr(response, "status", 0) == 201

    body = os.urandom(len(PAYLOAD) + 103)

    async def ceiling_aiohttp(i: int) -> bool:
        async with session.post(f"https://localhost:{port}/push/{i % 100}", data=body, headers=HEADERS) as response:
            return response.status == 201

    async def measure(name: str, one: Callable[[int], Awaitable[bool]]) -> tuple[float, str]:
        await drive(200, args.concurrency, one)  # warm connections and caches
        before = meter.snapshot()
        start = time.perf_counter()
        rate, failures = await drive(args.messages, args.concurrency, one)
        wall = time.perf_counter() - start
        after = meter.snapshot()
        cores = psutil.cpu_count() or 1
        cpu = (
            f"client {(after[0] - before[0]) / wall / cores:.0%}, sink {(after[1] - before[1]) / wall / cores:.0%}"
            f" of {cores} cores; client CPU {1e6 * (after[0] - before[0]) / args.messages:.0f} µs/msg"
        )
        if failures:
            raise SystemExit(f"{name}: {failures} failed sends")
        return rate, cpu

    names = ", ".join(
        f"{p} {metadata.version(p)}" for p in ("pywebpush", "http_ece", "py-vapid", "aiohttp", "cryptography")
    )
    print(f"Python {platform.python_version()}, {names}; sink: {args.sink_procs} processes")
    print(f"{args.messages} messages per run, {args.concurrency} concurrent, {args.runs} runs")
    rate, cpu = await measure("sink ceiling", ceiling_aiohttp)
    print(f"sink ceiling (aiohttp, pre-encrypted): {rate:8.0f} msgs/s  ({cpu})")
    rates: dict[str, list[float]] = {"belfry": [], "pywebpush": []}
    order = [("belfry", belfry), ("pywebpush", peer)]
    for run in range(args.runs):
        for name, fn in order[run % 2 :] + order[: run % 2]:
            rate, cpu = await measure(name, fn)
            rates[name].append(rate)
            print(f"run {run + 1} {name:>10}: {rate:8.0f} msgs/s  ({cpu})")
    b, p = statistics.median(rates["belfry"]), statistics.median(rates["pywebpush"])
    print(f"median: belfry {b:.0f} msgs/s, pywebpush webpush_async {p:.0f} msgs/s, ratio {b / p:.2f}x")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await drive(args.messages, args.concurrency, belfry)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue())
    await session.close()
    await pinned_session.close()
    for w in workers:
        w.terminate()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
