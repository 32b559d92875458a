"""What mutual TLS costs a Belfry gRPC service, beside a bare grpc.aio server.

One server process at a time (one core's worth of work), one client process:

* ``bare``   — the peer: a bare grpc.aio unary echo, plaintext, no interceptor;
* ``plain``  — the same echo behind ``belfry.rpc.create_server`` (interceptor,
  metrics, health), plaintext;
* ``mtls``   — the same as ``plain`` with mutual TLS (EC P-256 certificates
  from a throwaway CA, client certificate required and verified).

For each: RPS of N unary calls (64 in flight) on one long-lived channel, and
new connections per second (a fresh channel per call, so every call pays the
handshake), and the CPU both processes spent per call and per new connection
(steadier than rates when the machine is shared). Runs alternate between the
three; figures are medians.

Usage: python bench/mtls_overhead.py [--calls 4000] [--connections 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from belfry import log, rpc
from belfry.config import TlsSettings

from tests.deploy.pki import Authority

_NO_TLS = TlsSettings(None, None, None)
_METHOD = "/bench.Echo/Call"
_IN_FLIGHT = 64


async def _echo(request: bytes, _: grpc.aio.ServicerContext) -> bytes:
    return request


def _register(server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(_echo, lambda b: b, lambda b: b)}
    )
    server.add_generic_rpc_handlers((handler,))


async def _serve(kind: str, tls: TlsSettings, pipe: Connection) -> None:
    if kind == "bare":
        server = grpc.aio.server()
        _register(server)
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        server, port, _ = await rpc.create_server("bench", [_register], ["bench.Echo"], "127.0.0.1:0", tls)
    await server.start()
    pipe.send(port)
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # wait for "stop"
    await server.stop(0)


def _server_main(kind: str, tls: TlsSettings, pipe: Connection) -> None:
    log.configure(service="bench", level="warning", json=True)  # healthy RPCs log at debug: keep them out
    asyncio.run(_serve(kind, tls, pipe))


async def _rps(target: str, tls: TlsSettings, calls: int) -> float:
    channel = rpc.connect(target, tls, override_authority="localhost")
    call = channel.unary_unary(_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    await call(b"warm-up")
    payload = b"x" * 256
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call(payload)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(_IN_FLIGHT)))
    elapsed = time.perf_counter() - started
    await channel.close()
    return calls / elapsed


async def _connections(target: str, tls: TlsSettings, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        # A fresh channel per call: every call pays the TCP (and TLS) handshake.
        channel = rpc.connect(target, tls, override_authority="localhost")
        call = channel.unary_unary(_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        await call(b"hello")
        await channel.close()
    return count / (time.perf_counter() - started)


def _measure(kind: str, server_tls: TlsSettings, client_tls: TlsSettings, args: argparse.Namespace) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_server_main, args=(kind, server_tls, child))
    process.start()
    port = parent.recv()
    server, client = psutil.Process(process.pid), psutil.Process()
    target = f"127.0.0.1:{port}"

    def cpu() -> float:
        return float(sum(server.cpu_times()[:2]) + sum(client.cpu_times()[:2]))

    start = cpu()
    rps = asyncio.run(_rps(target, client_tls, args.calls))
    middle = cpu()
    conns = asyncio.run(_connections(target, client_tls, args.connections))
    end = cpu()
    # CPU (server + client processes) per call and per new connection: steadier than rates on a shared machine.
    call_us = (middle - start) / args.calls * 1e6
    conn_us = (end - middle) / args.connections * 1e6
    parent.send("stop")
    process.join(10)
    return {"rps": rps, "conns": conns, "call_us": call_us, "conn_us": conn_us}


def main() -> None:
    """Alternate the three servers ``--runs`` times and print medians."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"python {platform.python_version()}, grpcio {grpc.__version__}, psutil {psutil.__version__}")
    print(
        f"{args.calls} calls ({_IN_FLIGHT} in flight) + {args.connections} fresh connections per run, {args.runs} runs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ca = Authority.create(Path(tmp), "mesh")
        server_tls, client_tls = ca.issue("bench-server"), ca.issue("bench-client")
        setups = {
            "bare": (_NO_TLS, _NO_TLS),
            "plain": (_NO_TLS, _NO_TLS),
            "mtls": (server_tls, client_tls),
        }
        results: dict[str, list[dict[str, float]]] = {kind: [] for kind in setups}
        for run in range(args.runs):
            for kind, (s_tls, c_tls) in setups.items():
                figures = _measure(kind, s_tls, c_tls, args)
                results[kind].append(figures)
                print(
                    f"run {run + 1} {kind:5}: {figures['rps']:7.0f} RPS  {figures['conns']:5.0f} conn/s  "
                    f"cpu/call {figures['call_us']:5.0f} us  cpu/connection {figures['conn_us']:6.0f} us"
                )
    medians = {
        kind: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for kind, runs in results.items()
    }
    print("\nmedians")
    for kind, m in medians.items():
        print(
            f"  {kind:5}: {m['rps']:7.0f} RPS ({m['rps'] / medians['bare']['rps']:.2f}x bare)  "
            f"{m['conns']:5.0f} conn/s ({m['conns'] / medians['plain']['conns']:.2f}x plain)  "
            f"cpu/call {m['call_us']:5.0f} us ({m['call_us'] / medians['bare']['call_us']:.2f}x bare)  "
            f"cpu/connection {m['conn_us']:6.0f} us ({m['conn_us'] / medians['plain']['conn_us']:.2f}x plain)"
        )


if __name__ == "__main__":
    main()
