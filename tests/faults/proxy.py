"""A TCP proxy that breaks the connection between two real processes on command.

Put it between a service and PostgreSQL, or between the email sender and its
SMTP server: the service is pointed at the proxy's port (bound on port 0) and
the proxy forwards to the real target. While the test runs it may

* add ``latency`` (seconds) to every chunk in both directions (order kept,
  throughput not serialised);
* ``reset_all()`` current connections: both sides get a TCP RST, as when a
  NAT, a load balancer or a failover drops them;
* ``blackhole``: connections are accepted but nothing moves in either
  direction, new or existing, until it is lifted (a peer that hangs);
* ``refuse``: the listening socket is closed, so new connections are refused
  (``ECONNREFUSED``) while current ones carry on; lifting it listens again on
  the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

_CHUNK = 64 * 1024


def hard_close(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN (``SO_LINGER`` 0), as a crashed peer or middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)  # identity: each link is one connection
class _Link:
    """One client connection and, once made, its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        hard_close(self.client)
        if self.upstream is not None:
            hard_close(self.upstream)
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """``async with FaultProxy(host, port) as proxy:`` → point the client at ``proxy.port``."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = 0
        self.latency = 0.0
        self.accepted = 0  # connections accepted since start
        self.resets = 0  # connections reset by reset_all
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> int:
        """Listen (on port 0 the first time, then on the same port again); return the port."""
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        self._flowing.set()
        await self._stop_listening()
        self.reset_all()
        self.resets = 0

    @property
    def connections(self) -> int:
        """Connections open through the proxy right now."""
        return len(self._links)

    @property
    def blackhole(self) -> bool:
        """Whether data is being held (new connections are accepted but never forwarded)."""
        return not self._flowing.is_set()

    @blackhole.setter
    def blackhole(self, on: bool) -> None:
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def refuse(self, on: bool) -> None:
        """Refuse new connections (close the listener) or accept them again (same port)."""
        if on and not self._refusing:
            self._refusing = True
            await self._stop_listening()
        elif not on and self._refusing:
            self._refusing = False
            await self.start()

    def reset_all(self) -> int:
        """RST every current connection, both sides; return how many were cut."""
        links = list(self._links)
        for link in links:
            link.reset()
        self._links.clear()
        self.resets += len(links)
        return len(links)

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._flowing.wait()  # a blackhole holds a new connection before it reaches the target
            try:
                up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                hard_close(writer)  # the target is down: the client sees its connection reset
                return
            link.upstream = up_writer
            if link not in self._links:  # reset while we were connecting
                link.reset()
                return
            link.tasks = [
                asyncio.create_task(self._pump(reader, up_writer)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            # Either side closing closes both (half-closed TCP is not needed by the protocols we proxy).
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            if link in self._links:
                self._links.discard(link)
                for task in link.tasks:
                    task.cancel()
                for side in (writer, link.upstream):
                    if side is not None:
                        side.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction; each chunk leaves ``latency`` seconds after it arrived."""
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def receive() -> None:
            while True:
                await self._flowing.wait()
                chunk = await reader.read(_CHUNK)
                pending.put_nowait((loop.time() + self.latency, chunk))
                if not chunk:
                    return

        async def deliver() -> None:
            while True:
                due, chunk = await pending.get()
                if not chunk:
                    return
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._flowing.wait()
                writer.write(chunk)
                await writer.drain()

        receiving, delivering = asyncio.create_task(receive()), asyncio.create_task(deliver())
        try:
            # Done when everything read was delivered (EOF), or either side broke.
            await asyncio.wait([delivering, receiving], return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in (receiving, delivering):
                task.cancel()
            for task in (receiving, delivering):
                with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                    await task
