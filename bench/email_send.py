"""Email sending rate: Belfry's pooled sender beside ``aiosmtplib.send()`` one message per connection.

The sink is Postfix's ``smtp-sink`` (a C server far faster than aiosmtpd);
its own ceiling is measured first with Postfix's ``smtp-source``. Then, per
run, alternating:

* peer: ``aiosmtplib.send()`` — a new connection per message — 50 at a time;
* Belfry compose+pool: the sender's template rendering and MIME building
  (``Composer``) and its SMTP connection pool (``SmtpPool``), 64 at a time,
  with PIPELINING (smtp-sink advertises it) and without it;
* Belfry end to end: N deliveries on the queue, drained by the email service
  (claim, daily cap, compose, SMTP, batched settle), in this process.

Usage: python bench/email_send.py [--messages 5000] [--runs 3] [--pool 16]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from email.headerregistry import Address

import aiosmtplib
from belfry import db, service
from belfry.message import Message
from belfry.queue import NewDelivery, enqueue
from belfry.unsubscribe import Signer

from bench.queue_common import CpuMeter, drop_database, scratch_database, versions
from services.email.compose import Composer
from services.email.server import build_for
from services.email.settings import SmtpSettings, load_settings
from services.email.smtp import SmtpPool
from services.email.templates import Templates

KEY = "bench-unsubscribe-key-0123456789abcdef"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def message(i: int) -> Message:
    """One realistic notification for recipient ``i``."""
    return Message(
        notification_id=str(uuid.uuid4()),
        account_id="acc_bench",
        user_id=f"user{i}",
        topic="contacts.contact_assigned",
        title=f"Contact {i} was assigned to you",
        body="Ana Tester assigned this contact to you from the CRM.",
        url=f"https://app.example.com/contacts/{i}",
        occurred_at=datetime.now(UTC).isoformat(),
        recipient_email=f"user{i}@example.com",
        recipient_name="Ana Tester",
    )


def sink_ceiling(port: int, messages: int, size: int) -> float:
    """Messages/s smtp-source reaches against the sink (20 parallel sessions)."""
    started = time.perf_counter()
    subprocess.run(  # noqa: S603 - fixed tool, fixed arguments
        ["smtp-source", "-s", "20", "-m", str(messages), "-l", str(size), f"127.0.0.1:{port}"],  # noqa: S607 - Postfix tool on PATH
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return messages / (time.perf_counter() - started)


async def peer_run(port: int, payloads: list[bytes], concurrency: int = 50) -> tuple[float, str]:
    """aiosmtplib.send(): one connection per message."""
    limiter = asyncio.Semaphore(concurrency)

    async def one(i: int, data: bytes) -> None:
        async with limiter:
            await aiosmtplib.send(
                data, sender="notify@example.com", recipients=[f"user{i}@example.com"], hostname="127.0.0.1", port=port
            )

    with CpuMeter() as cpu:
        started = time.perf_counter()
        await asyncio.gather(*(one(i, d) for i, d in enumerate(payloads)))
        elapsed = time.perf_counter() - started
    return len(payloads) / elapsed, cpu.share(elapsed)


async def pool_run(
    port: int, composer: Composer, n: int, size: int, *, pipelining: bool, concurrency: int = 64
) -> tuple[float, str]:
    """Belfry's compose + pooled SMTP, without the queue."""
    smtp = SmtpPool(SmtpSettings("127.0.0.1", port, "", "", False, False, 30.0, size), pipelining=pipelining)
    limiter = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            m = message(i)
            to = Address(m.recipient_name, addr_spec=m.recipient_email)
            await smtp.send("notify@example.com", [m.recipient_email], composer.compose(i, m, to))

    with CpuMeter() as cpu:
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - started
    await smtp.close()
    if smtp.pipelined != (n if pipelining else 0):
        raise SystemExit(f"expected {'every' if pipelining else 'no'} transaction pipelined, got {smtp.pipelined}")
    return n / elapsed, cpu.share(elapsed)


async def service_run(dsn: str, port: int, n: int, size: int) -> tuple[float, str]:
    """The email service draining n queued deliveries end to end."""
    pool = await db.create_pool(dsn, application_name="bench-email", min_size=2, max_size=8)
    await pool.execute("truncate queue.deliveries; truncate email.daily_counts; truncate email.cap_slots")
    expires = datetime.now(UTC) + timedelta(hours=1)
    rows = [
        NewDelivery("acc_bench", uuid.UUID(m.notification_id), m.user_id, "email", m.topic, m.to_json(), expires)
        for m in (message(i) for i in range(n))
    ]
    for k in range(0, n, 1000):
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, rows[k : k + 1000])
    env = {
        "BELFRY_DATABASE_URL": dsn,
        "BELFRY_GRPC_ADDRESS": "127.0.0.1:0",
        "BELFRY_METRICS_ADDRESS": "off",
        "BELFRY_LOG_LEVEL": "warning",
        "BELFRY_SMTP_HOST": "127.0.0.1",
        "BELFRY_SMTP_PORT": str(port),
        "BELFRY_SMTP_POOL_SIZE": str(size),
        "BELFRY_UNSUBSCRIBE_KEY": KEY,
        "BELFRY_EMAIL_BATCH": "500",
        "BELFRY_EMAIL_CONCURRENCY": "64",
        "BELFRY_DB_POOL_MAX": "8",
    }
    settings = load_settings(env)
    with CpuMeter() as cpu:
        started = time.perf_counter()
        running = await service.start("email", settings.common, build_for(settings))
        while await pool.fetchval("select count(*) from queue.deliveries where state = 'sent'") < n:  # noqa: ASYNC110 - progress lives in the database
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
    await running.stop(0.1)
    await pool.close()
    return n / elapsed, cpu.share(elapsed)


async def main() -> None:
    """Sink ceiling, then the three senders alternating, medians and ratios."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pool", type=int, default=16)
    args = parser.parse_args()
    sink_bin = shutil.which("smtp-sink")
    if sink_bin is None:
        raise SystemExit("smtp-sink not found: apt-get install -y postfix")
    port = free_port()
    sink = subprocess.Popen([sink_bin, "-u", "nobody", f"127.0.0.1:{port}", "1000"])  # noqa: S603, ASYNC220 - fixed tool, started once before timing
    dsn = await scratch_database()
    try:
        await asyncio.sleep(0.3)  # let smtp-sink bind
        composer = Composer(
            Templates(),
            Signer(KEY.encode(), ttl_seconds=86400),
            Address("Belfry", "notify", "example.com"),
            "https://app.example.com",
        )
        sample = composer.compose(0, message(0), Address("Ana Tester", addr_spec="user0@example.com"))
        payloads = [
            composer.compose(i, message(i), Address("Ana Tester", addr_spec=f"user{i}@example.com"))
            for i in range(args.messages)
        ]
        print(await versions(dsn, "aiosmtplib", "Jinja2", "asyncpg", "uvloop"))
        print(f"messages={args.messages} size={len(sample)} bytes pool={args.pool}")
        ceiling = sink_ceiling(port, args.messages, len(sample))
        print(f"sink ceiling (smtp-source, 20 sessions): {ceiling:,.0f} msgs/s", flush=True)
        results: dict[str, list[float]] = {
            "aiosmtplib.send": [],
            "belfry pool plain": [],
            "belfry pool": [],
            "belfry service": [],
        }
        for run in range(args.runs):
            for name, coro in (
                ("aiosmtplib.send", peer_run(port, payloads)),
                ("belfry pool plain", pool_run(port, composer, args.messages, args.pool, pipelining=False)),
                ("belfry pool", pool_run(port, composer, args.messages, args.pool, pipelining=True)),
                ("belfry service", service_run(dsn, port, args.messages, args.pool)),
            ):
                rate, cpu = await coro
                results[name].append(rate)
                print(f"run {run + 1} {name:17s} {rate:8,.0f} msgs/s  ({cpu})", flush=True)
        med = {k: statistics.median(v) for k, v in results.items()}
        for name, rate in med.items():
            print(f"median {name:17s} {rate:8,.0f} msgs/s")
        print(
            f"ratio belfry pool / aiosmtplib.send {med['belfry pool'] / med['aiosmtplib.send']:.1f}x; "
            f"pipelined / plain pool {med['belfry pool'] / med['belfry pool plain']:.1f}x; "
            f"belfry service / aiosmtplib.send {med['belfry service'] / med['aiosmtplib.send']:.1f}x"
        )
    finally:
        sink.terminate()
        sink.wait()
        await drop_database(dsn)


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
