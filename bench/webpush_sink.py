"""A loopback HTTPS sink for web push benchmarks: answers every POST with 201, several processes.

Minimal HTTP/1.1 on asyncio + uvloop (keep-alive, Content-Length bodies),
``SO_REUSEPORT`` so ``--procs`` processes share one port. It does nothing
with the body: it measures the senders, not a push service.

Usage: python bench/webpush_sink.py CERT KEY PORT [--procs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import ssl

import h2.config
import h2.connection
import h2.events
import uvloop

_REPLY = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nLocation: /m/1\r\n\r\n"


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self._buf = bytearray()
        self._transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TLS transport is a write transport

    def data_received(self, data: bytes) -> None:
        self._buf.extend(data)
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in bytes(self._buf[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(self._buf) < end + 4 + length:
                return
            del self._buf[: end + 4 + length]
            assert self._transport is not None
            self._transport.write(_REPLY)


class _H2Sink(asyncio.Protocol):
    """HTTP/2 (push services speak it): every request's stream gets 201 when it ends."""

    def __init__(self) -> None:
        self._conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self._transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TLS transport is a write transport
        self._conn.initiate_connection()
        self._transport.write(self._conn.data_to_send())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        for event in self._conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._conn.send_headers(event.stream_id, [(":status", "201")], end_stream=True)
        assert self._transport is not None
        self._transport.write(self._conn.data_to_send())


class _Either(asyncio.Protocol):
    """Picks HTTP/2 or HTTP/1.1 by the ALPN the client negotiated."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
        self._inner: asyncio.Protocol = _H2Sink() if alpn == "h2" else _Sink()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)


def _serve(cert: str, key: str, port: int) -> None:
    async def main() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["h2", "http/1.1"])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        server = await asyncio.get_running_loop().create_server(_Either, sock=sock, ssl=context, backlog=1024)
        await server.serve_forever()

    uvloop.run(main())


def start(cert: str, key: str, port: int, procs: int) -> list[multiprocessing.Process]:
    """Start ``procs`` sink processes on ``port``."""
    workers = [multiprocessing.Process(target=_serve, args=(cert, key, port), daemon=True) for _ in range(procs)]
    for w in workers:
        w.start()
    return workers


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("cert")
    parser.add_argument("key")
    parser.add_argument("port", type=int)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    for w in start(args.cert, args.key, args.port, args.procs):
        w.join()
