"""Another tenant's latency while one client uploads huge bodies: the bounded gateway beside the one before it.

Each run starts a gateway process (this tree, then the tree of ``--before``,
alternating), measures a tenant's ``GET /api/feed`` latency while idle and
then while an attacker posts ``--mib`` MiB JSON bodies to ``/api/feed/mark``
back to back (a JSON object with one long string; each streamed to the end
unless the gateway closes the connection), and reports the tenant's median, p99 and worst latency, the
gateway's peak memory growth (VmHWM) and its CPU seconds during the attack.

Usage: python -m bench.gateway_uploads [--runs 3] [--mib 100] [--seconds 8] [--before <commit>]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import subprocess
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import httpx
import psutil
import uvloop
from belfry.auth import TokenIssuer

from bench import gateway_common as gc
from bench.queue_common import drop_database, scratch_database, versions

MIB = 1024 * 1024


def _tree(commit: str, into: Path) -> Path:
    """The source tree of ``commit``, extracted under ``into``."""
    archive = subprocess.run(["git", "-C", str(gc.ROOT), "archive", commit], capture_output=True, check=True).stdout  # noqa: S603, S607 - fixed command
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def _reset_peak(pid: int) -> None:
    """VmHWM tracks the peak from now on (Linux: 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def _attack(port: int, token: str, size: int, stop: asyncio.Event) -> int:
    """Post ``size``-byte bodies until ``stop``; → how many bodies were posted (answered or cut)."""
    loop = asyncio.get_running_loop()
    chunk = b"x" * MIB  # one long string: the body parses as JSON (the old gateway read and parsed it whole)
    posted = 0
    while not stop.is_set():
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        try:
            head = (
                f"POST /api/feed/mark HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n"
                f"content-type: application/json\r\ncontent-length: {size}\r\n\r\n"
            ).encode()
            await loop.sock_sendall(sock, head + b'{"what": "read", "ids": [1], "pad": "')
            sent = 37
            while sent < size - 2 and not stop.is_set():
                part = chunk[: size - 2 - sent]
                await loop.sock_sendall(sock, part)
                sent += len(part)
            await loop.sock_sendall(sock, b'"}')
            await loop.sock_recv(sock, 4096)
        except OSError:
            pass  # refused and closed by the gateway: the next body
        finally:
            sock.close()
        posted += 1
    return posted


async def _latencies(client: httpx.AsyncClient, seconds: float) -> list[float]:
    found: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        answer = await client.get("/api/feed")
        found.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise RuntimeError(answer.text)
        await asyncio.sleep(0.01)
    return found


async def run_once(root: Path, dsn: str, issuer: TokenIssuer, mib: int, seconds: float) -> dict[str, float]:
    """One gateway of ``root``: the tenant idle, then under attack."""
    port = gc.free_port()
    # The rate limits are switched off: this measures the body bound, and the tenant polls fast.
    gateway = gc.start_gateway(
        dsn, port, root=root, BELFRY_PROCESSES="1", BELFRY_GATEWAY_USER_RATE="0", BELFRY_GATEWAY_CLIENT_RATE="0"
    )
    try:
        headers = {"authorization": f"Bearer {issuer.issue('acc_tenant', 'ana')}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120) as client:
            await _latencies(client, 1.0)  # warm up
            idle = await _latencies(client, seconds)
            before = _kib(gateway.pid, "VmRSS")
            _reset_peak(gateway.pid)
            cpu = psutil.Process(gateway.pid).cpu_times()
            stop = asyncio.Event()
            attack = asyncio.ensure_future(_attack(port, issuer.issue("acc_attacker", "mallory"), mib * MIB, stop))
            busy = await _latencies(client, seconds)
            stop.set()
            posted = await attack
            used = psutil.Process(gateway.pid).cpu_times()
            grown = (_kib(gateway.pid, "VmHWM") - before) / 1024
    finally:
        gateway.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            gateway.wait(10)
        gateway.kill()
    return {
        "idle_p50_ms": statistics.median(idle) * 1000,
        "p50_ms": statistics.median(busy) * 1000,
        "p99_ms": statistics.quantiles(busy, n=100, method="inclusive")[98] * 1000,
        "max_ms": max(busy) * 1000,
        "grown_mib": grown,
        "cpu_s": (used.user + used.system) - (cpu.user + cpu.system),
        "bodies": posted,
    }


async def main() -> None:
    """Alternate the two gateways ``--runs`` times; print the medians and the ratios."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--before", default="1018f76^", help="the commit before the bounded gateway")
    args = parser.parse_args()
    dsn = await scratch_database()
    issuer = TokenIssuer(gc.KEYS, "k1", ttl_seconds=3600)
    results: dict[str, list[dict[str, float]]] = {"bounded (this tree)": [], f"before ({args.before})": []}
    with tempfile.TemporaryDirectory(prefix="belfry-before-") as tmp:
        old = _tree(args.before, Path(tmp))
        try:
            print(await versions(dsn, "uvicorn", "starlette", "httpx"))
            for _ in range(args.runs):
                for name, root in zip(results, (gc.ROOT, old), strict=True):
                    results[name].append(await run_once(root, dsn, issuer, args.mib, args.seconds))
        finally:
            await drop_database(dsn)
    print(f"tenant GET /api/feed while one client posts {args.mib} MiB bodies; median of {args.runs} runs")
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    for name, m in medians.items():
        print(
            f"  {name:24} idle p50 {m['idle_p50_ms']:6.1f} ms | attacked p50 {m['p50_ms']:7.1f} ms"
            f"  p99 {m['p99_ms']:8.1f} ms  max {m['max_ms']:8.1f} ms | gateway +{m['grown_mib']:7.1f} MiB"
            f"  {m['cpu_s']:5.1f} CPU s  {m['bodies']:.0f} bodies"
        )
    new, old_m = medians.values()
    print(
        f"  ratio before/bounded: p99 {old_m['p99_ms'] / new['p99_ms']:.1f}x, max {old_m['max_ms'] / new['max_ms']:.1f}x"
    )


if __name__ == "__main__":
    uvloop.run(main())
