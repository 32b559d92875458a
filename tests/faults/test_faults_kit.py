"""The fault kit itself: the proxy's faults, the private cluster's crashes, the hostile peer's answers."""

from __future__ import annotations

import asyncio
import os
import pwd
import ssl
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from tests.faults.conftest import via_port
from tests.faults.hostile import (
    ABSURD_RETRY_AFTER,
    Answer,
    Behaviour,
    HostilePeer,
    Reset,
    SlowBody,
    Stall,
    too_many_requests,
)
from tests.faults.postgres import RUN_AS, PrivatePostgres
from tests.faults.proxy import FaultProxy
from tests.push.fakes.tls import make_pki


@pytest.fixture
async def echo() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP echo server: its port and everything it received."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4096):
                received.append(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1]), received
    server.close()


async def roundtrip(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Connect, send ``data``, read it back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer, await asyncio.wait_for(reader.readexactly(len(data)), 10)


async def test_proxy_forwards_and_adds_latency(echo: tuple[int, list[bytes]]) -> None:
    async with FaultProxy("127.0.0.1", echo[0]) as proxy:
        _, writer, back = await roundtrip(proxy.port, b"hello")
        assert back == b"hello" and proxy.connections == 1
        proxy.latency = 0.2
        loop = asyncio.get_running_loop()
        started = loop.time()
        _, writer2, back = await roundtrip(proxy.port, b"x" * 200_000)
        # Both directions wait: a lower bound the proxy guarantees by construction, not a speed check.
        assert back == b"x" * 200_000 and loop.time() - started >= 0.39
        writer.close()
        writer2.close()


async def test_proxy_resets_every_connection_and_accepts_new_ones(echo: tuple[int, list[bytes]]) -> None:
    async with FaultProxy("127.0.0.1", echo[0]) as proxy:
        links = [await roundtrip(proxy.port, b"a") for _ in range(3)]
        assert proxy.reset_all() == 3 and proxy.connections == 0
        for reader, _, _ in links:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(1), 10)
        _, writer, back = await roundtrip(proxy.port, b"again")
        assert back == b"again" and proxy.accepted == 4
        writer.close()


async def test_proxy_blackhole_holds_data_until_lifted(echo: tuple[int, list[bytes]]) -> None:
    async with FaultProxy("127.0.0.1", echo[0]) as proxy:
        reader, writer, _ = await roundtrip(proxy.port, b"before")
        proxy.blackhole = True
        writer.write(b"held")
        new_reader, new_writer = await asyncio.open_connection("127.0.0.1", proxy.port)  # accepted...
        new_writer.write(b"new")
        with pytest.raises(TimeoutError):  # ...but nothing comes back while the hole is open
            await asyncio.wait_for(reader.read(1), 0.3)
        assert b"held" not in b"".join(echo[1]) and b"new" not in b"".join(echo[1])
        proxy.blackhole = False
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"held"
        assert await asyncio.wait_for(new_reader.readexactly(3), 10) == b"new"
        writer.close()
        new_writer.close()


async def test_proxy_refuses_new_connections_and_keeps_current_ones(echo: tuple[int, list[bytes]]) -> None:
    async with FaultProxy("127.0.0.1", echo[0]) as proxy:
        reader, writer, _ = await roundtrip(proxy.port, b"one")
        port = proxy.port
        await proxy.refuse(True)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"two")
        assert await asyncio.wait_for(reader.readexactly(3), 10) == b"two"
        await proxy.refuse(False)
        assert proxy.port == port
        _, writer2, back = await roundtrip(port, b"three")
        assert back == b"three"
        writer.close()
        writer2.close()


async def test_private_postgres_survives_an_immediate_restart(private_pg: PrivatePostgres, database_url: str) -> None:
    # The server runs as the unprivileged user, in its own directory, on its own port.
    owner = os.stat(private_pg.data / "postmaster.pid").st_uid
    if os.geteuid() == 0:
        assert pwd.getpwuid(owner).pw_name == RUN_AS
    assert private_pg.port != 5432
    conn = await asyncpg.connect(database_url)
    await conn.execute("create table kit_probe (n int)")
    await conn.execute("insert into kit_probe values (1)")  # committed before the crash
    await private_pg.restart(mode="immediate")
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError)):
        await conn.fetchval("select 1")
    conn = await asyncpg.connect(database_url)
    assert await conn.fetchval("select count(*) from kit_probe") == 1
    assert await conn.fetchval("select count(*) from queue.deliveries") == 0  # migrated like every test database
    await conn.close()
    await private_pg.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(database_url, timeout=5)
    await private_pg.start()
    conn = await asyncpg.connect(database_url)
    assert await conn.fetchval("select count(*) from kit_probe") == 1
    await conn.close()


async def test_postgres_through_the_proxy_sees_resets(private_pg: PrivatePostgres, database_url: str) -> None:
    async with FaultProxy("127.0.0.1", private_pg.port) as proxy:
        conn = await asyncpg.connect(via_port(database_url, proxy.port))
        assert await conn.fetchval("select 1") == 1
        proxy.reset_all()
        with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError)):
            await conn.fetchval("select 1")
        conn = await asyncpg.connect(via_port(database_url, proxy.port))
        assert await conn.fetchval("select 2") == 2
        await conn.close()


async def test_hostile_peer_misbehaves_as_scripted(tmp_path_factory: pytest.TempPathFactory) -> None:
    pki = make_pki(tmp_path_factory.mktemp("hostile-pki"))
    routes: dict[str, Behaviour] = {f"/429/{i}": too_many_requests(value) for i, value in enumerate(ABSURD_RETRY_AFTER)}
    routes |= {
        "/trickle": SlowBody(size=8, chunk=1, interval=0.1),
        "/slow": SlowBody(size=8, chunk=1, interval=1.0),
        "/reset": Reset(),
        "/stall": Stall(),
    }
    tls = ssl.create_default_context(cafile=str(pki.ca_file))
    async with (
        HostilePeer(routes=routes, default=Answer(204, body=b""), ssl_context=pki.server_context()) as peer,
        httpx.AsyncClient(verify=tls, timeout=httpx.Timeout(10, read=0.5)) as client,
    ):
        for i, value in enumerate(ABSURD_RETRY_AFTER):
            reply = await client.post(peer.url(f"/429/{i}"), content=b"{}")
            assert reply.status_code == 429 and reply.headers["retry-after"] == value
        # A body trickled faster than the read timeout never trips it, however long it takes in all.
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await client.get(peer.url("/trickle"))).content == b"x" * 8
        assert loop.time() - started >= 0.79  # the peer's own pacing, not a speed check
        with pytest.raises(httpx.ReadTimeout):  # slower than the read timeout: it fires
            await client.get(peer.url("/slow"))
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await client.post(peer.url("/reset"), content=b"x")
        with pytest.raises(httpx.ReadTimeout):
            await client.post(peer.url("/stall"), content=b"x")
        assert (await client.get(peer.url("/anything"))).status_code == 204
        assert [r.path for r in peer.requests][-4:] == ["/slow", "/reset", "/stall", "/anything"]
        assert (await peer.wait_for("/reset"))[0].body == b"x"
