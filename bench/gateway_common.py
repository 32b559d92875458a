"""Shared pieces of the gateway benchmarks: a gateway process, a bare websockets peer, raw clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import psutil

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"k1": b"k1-bench-secret-0123456789abcdef0123456789"}


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(
    dsn: str, http_port: int, *, root: Path = ROOT, argv: Sequence[str] = ("-m", "services.gateway"), **extra: str
) -> subprocess.Popen[bytes]:
    """``python -m services.gateway`` (or ``python *argv``) of the tree at ``root``; returns once it is serving."""
    env = {
        **os.environ,
        "BELFRY_DATABASE_URL": dsn,
        "BELFRY_GRPC_ADDRESS": "127.0.0.1:0",
        "BELFRY_METRICS_ADDRESS": "off",
        "BELFRY_TOKEN_KEYS": ",".join(f"{k}={v.decode()}" for k, v in KEYS.items()),
        "BELFRY_GATEWAY_HTTP_HOST": "127.0.0.1",
        "BELFRY_GATEWAY_HTTP_PORT": str(http_port),
        "BELFRY_LOG_LEVEL": "warning",
        "BELFRY_GATEWAY_PRESENCE_TTL_SECONDS": "60",
        "PYTHONPATH": f"{root}:{root / 'libs'}",
        **extra,
    }
    proc = subprocess.Popen([sys.executable, *argv], cwd=root, env=env, stderr=subprocess.PIPE)  # noqa: S603 - our code
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(b"BELFRY_READY"):
            # Keep draining: a full pipe would block the gateway on its next write.
            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
            return proc
    raise RuntimeError("the gateway exited before it was ready")


def _drain(stream: IO[bytes]) -> None:
    for line in stream:
        # Tabs still closing when uvicorn's graceful-shutdown timer fires are cancelled: expected at the end.
        if b"Error" in line and b"graceful shutdown" not in line:
            sys.stderr.write(line.decode(errors="replace"))


PEER = """
import asyncio, sys, uvloop
from websockets.asyncio.server import serve

async def handler(ws):
    await ws.recv()
    await ws.send('{"type": "ready"}')
    await ws.wait_closed()

async def main():
    async with serve(handler, "127.0.0.1", int(sys.argv[1]), compression=None):
        print("READY", flush=True)
        await asyncio.Future()

uvloop.run(main())
"""


def start_peer(port: int) -> subprocess.Popen[bytes]:
    """A bare ``websockets`` server (compression off) that answers the first message and then idles."""
    proc = subprocess.Popen([sys.executable, "-c", PEER, str(port)], stdout=subprocess.PIPE)  # noqa: S603 - fixed code
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def rss(pid: int) -> int:
    """Resident memory of a process, bytes."""
    return int(psutil.Process(pid).memory_info().rss)


def _frame(data: str | bytes, opcode: int = 0x1) -> bytes:
    payload = data.encode() if isinstance(data, str) else data
    mask = os.urandom(4)
    header = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        header += bytes([0x80 | n])
    else:
        header += bytes([0x80 | 126]) + struct.pack("!H", n)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bool, bytes]:
    """The next unfragmented data frame from the server: (compressed, payload); pings are skipped."""
    while True:
        head = await reader.readexactly(2)
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await reader.readexactly(8))[0]
        payload = await reader.readexactly(n)
        opcode = head[0] & 0x0F
        if opcode == 0x8:
            raise RuntimeError(f"closed by the server: {payload!r}")
        if opcode in {0x1, 0x2}:
            return bool(head[0] & 0x40), payload


async def idle_client(port: int, first: str, *, deflate: bool = False) -> asyncio.StreamWriter:
    """A minimal websocket client (a few KiB, so the bench measures the server): handshake, one message, wait.

    With ``deflate`` it offers per-message compression as browsers do (the
    server may decline); a compressed answer is inflated.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if deflate else ""
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n".encode()
    )
    answer = await reader.readuntil(b"\r\n\r\n")
    if b" 101 " not in answer.split(b"\r\n", 1)[0]:
        raise RuntimeError(answer.decode(errors="replace"))
    writer.write(_frame(first))
    compressed, payload = await _read_frame(reader)
    if compressed:
        payload = zlib.decompressobj(-zlib.MAX_WBITS).decompress(payload + b"\x00\x00\xff\xff")
    reply = json.loads(payload)
    if reply.get("type") != "ready":
        raise RuntimeError(f"unexpected first frame {reply}")
    # Answer the server's keepalive pings, as a browser does (else it drops the tab after ping interval + timeout).
    task = asyncio.ensure_future(_answer_pings(reader, writer))
    _PONGERS.add(task)
    task.add_done_callback(_PONGERS.discard)
    return writer


_PONGERS: set[asyncio.Future[None]] = set()


async def _answer_pings(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, RuntimeError):
        while True:
            head = await reader.readexactly(2)
            n = head[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", await reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(n)
            if head[0] & 0x0F == 0x9:
                writer.write(_frame(payload, opcode=0xA))
