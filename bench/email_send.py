"""Email sending rate: Belfry's pooled sender beside ``aiosmtplib.send()`` one message per connection.

The sink is Postfix's ``smtp-sink`` (a C server far faster than aiosmtpd);
its own ceiling is measured first with Postfix's ``smtp-source``. Then, per
run, alternating:

* peer: ``aiosmtplib.send()`` — a new connection per message — 50 at a time;
* Belfry compose+pool: the sender's template rendering and MIME building
  (``Composer``) and its SMTP connection pool (``SmtpPool``), 64 at a time,
  with PIPELINING (smtp-sink advertises it) and without it;
* Belfry end to end: N deliveries on the queue, drained by the email service
  (claim, suppression check, daily cap, compose, SMTP, batched settle), in
  this process.

``--dkim`` names the signing setups to compare, alternating within each run
(comma-separated, from none, rsa, ed25519, both): the keys (RSA-2048 and
Ed25519, PEM PKCS#8) are generated in a temporary directory and configured
through ``BELFRY_EMAIL_DKIM_KEYS`` as an operator would; the compose+pool and
service rows are then run once per setup. The suppression list holds
``--suppressed`` addresses of other users of the same account (none of them a
recipient), so the batch's suppression lookup reads a populated table. Every
rate is printed with the CPU microseconds per message of this process (the
email sender) and of PostgreSQL.

Usage: python bench/email_send.py [--messages 5000] [--runs 3] [--pool 16]
       [--dkim none,rsa,ed25519,both] [--suppressed 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from email.headerregistry import Address
from pathlib import Path

import aiosmtplib
import asyncpg
from belfry import db, log, service
from belfry.message import Message
from belfry.queue import NewDelivery, enqueue
from belfry.unsubscribe import Signer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from bench.queue_common import CpuMeter, drop_database, scratch_database, versions
from services.email import store
from services.email.compose import Composer
from services.email.dkim_signing import DkimSigner
from services.email.server import build_for
from services.email.settings import Settings, SmtpSettings, load_settings
from services.email.smtp import SmtpPool
from services.email.templates import Templates

KEY = "bench-unsubscribe-key-0123456789abcdef"
FROM = "Belfry <notify@example.com>"
DOMAIN = "example.com"  # the From domain: the only one a key may sign for here (no VERP)
DKIM_MODES = ("none", "rsa", "ed25519", "both")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dkim_keys(directory: Path) -> dict[str, str]:
    """``BELFRY_EMAIL_DKIM_KEYS`` per mode, with an RSA-2048 and an Ed25519 key written (PEM PKCS#8) to ``directory``."""
    pem: dict[str, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey] = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }
    entry = {}
    for name, key in pem.items():
        path = directory / f"{name}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
        algorithm = "rsa-sha256" if name == "rsa" else "ed25519-sha256"
        entry[name] = f"{DOMAIN}:bench-{name}:{algorithm}:{path}"
    return {"none": "", "rsa": entry["rsa"], "ed25519": entry["ed25519"], "both": f"{entry['rsa']};{entry['ed25519']}"}


def service_env(dsn: str, port: int, size: int, dkim: str) -> dict[str, str]:
    """The email service's environment, as an operator would set it."""
    env = {
        "BELFRY_DATABASE_URL": dsn,
        "BELFRY_GRPC_ADDRESS": "127.0.0.1:0",
        "BELFRY_METRICS_ADDRESS": "off",
        "BELFRY_LOG_LEVEL": "warning",
        "BELFRY_SMTP_HOST": "127.0.0.1",
        "BELFRY_SMTP_PORT": str(port),
        "BELFRY_SMTP_POOL_SIZE": str(size),
        "BELFRY_UNSUBSCRIBE_KEY": KEY,
        "BELFRY_TOKEN_KEYS": "bench=" + "b" * 48,  # the admin APIs verify user tokens (none used here)
        "BELFRY_EMAIL_FROM": FROM,
        "BELFRY_EMAIL_BATCH": "500",
        "BELFRY_EMAIL_CONCURRENCY": "64",
        "BELFRY_DB_POOL_MAX": "8",
    }
    if dkim:
        env["BELFRY_EMAIL_DKIM_KEYS"] = dkim
    return env


async def seed_suppressions(dsn: str, count: int, recipients: int) -> None:
    """``count`` suppressed addresses of other users of the bench account; check the lookup finds them, not ours."""
    conn = await asyncpg.connect(dsn)
    try:
        reasons = (store.HARD_BOUNCE, store.COMPLAINT, store.SOFT_BOUNCES)
        await conn.copy_records_to_table(
            "suppressions",
            schema_name="email",
            columns=["account_id", "address", "reason", "detail"],
            records=[
                ("acc_bench", f"other{i}@example.net", reasons[i % 3], "550 5.1.1 bench seed") for i in range(count)
            ],
        )
        await conn.execute("analyze email.suppressions")
    finally:
        await conn.close()
    pool = await db.create_pool(dsn, application_name="bench-email-check", min_size=1, max_size=1)
    try:
        keys = [("acc_bench", f"user{i}@example.com") for i in range(recipients)]
        if count:
            keys.append(("acc_bench", "other0@example.net"))
        found = await store.suppressed(pool, keys, soft_expiry_seconds=7 * 86400.0)
    finally:
        await pool.close()
    if list(found) != keys[recipients:]:
        raise SystemExit(f"suppression lookup: expected only the seeded address, found {sorted(found)}")


def per_message(cpu: CpuMeter, n: int) -> str:
    """CPU microseconds per message of this process and of PostgreSQL."""
    return f"{cpu.own / n * 1e6:,.0f} µs/msg email, {cpu.postgres / n * 1e6:,.0f} µs/msg postgres"


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


async def peer_run(port: int, payloads: list[bytes], concurrency: int = 50) -> tuple[float, float, CpuMeter]:
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
    return len(payloads) / elapsed, elapsed, cpu


async def pool_run(
    port: int, composer: Composer, n: int, size: int, *, pipelining: bool, concurrency: int = 64
) -> tuple[float, float, CpuMeter]:
    """Belfry's compose (and DKIM signing when the composer has keys) + pooled SMTP, without the queue."""
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
    return n / elapsed, elapsed, cpu


async def service_run(settings: Settings, n: int) -> tuple[float, float, CpuMeter]:
    """The email service draining n queued deliveries end to end (every one must be sent: none is suppressed)."""
    dsn = settings.common.database_url
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
    final = "select count(*) from queue.deliveries where state in ('sent', 'dead', 'expired', 'dropped')"
    with CpuMeter() as cpu:
        started = time.perf_counter()
        running = await service.start("email", settings.common, build_for(settings))
        while await pool.fetchval(final) < n:  # noqa: ASYNC110 - progress lives in the database
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
    await running.stop(0.1)
    sent = await pool.fetchval("select count(*) from queue.deliveries where state = 'sent'")
    await pool.close()
    if sent != n:
        raise SystemExit(f"expected {n} deliveries sent, got {sent}")
    return n / elapsed, elapsed, cpu


def modes(value: str) -> list[str]:
    """``--dkim``: comma-separated signing setups, each one of DKIM_MODES."""
    chosen = [m.strip() for m in value.split(",") if m.strip()]
    wrong = [m for m in chosen if m not in DKIM_MODES]
    if not chosen or wrong or len(set(chosen)) != len(chosen):
        raise argparse.ArgumentTypeError(f"a comma-separated list of distinct {'|'.join(DKIM_MODES)}, got {value!r}")
    return chosen


def label(sender: str, mode: str) -> str:
    """Row name: the unsigned rows keep their old names."""
    return sender if mode == "none" else f"{sender} {mode}"


async def main() -> None:
    """Sink ceiling, then the senders alternating (each signing setup in turn), medians and ratios."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pool", type=int, default=16)
    parser.add_argument("--dkim", type=modes, default=["none"], help="e.g. none,rsa,ed25519,both (default: none)")
    parser.add_argument("--suppressed", type=int, default=1000, help="suppressed addresses of other users")
    args = parser.parse_args()
    # As ``belfry.service.main`` does from BELFRY_LOG_LEVEL (service.start leaves logging to its caller):
    # unconfigured, structlog would print every "delivery settled" line and the figures would include it.
    log.configure(service="email", level="warning")
    sink_bin = shutil.which("smtp-sink")
    if sink_bin is None:
        raise SystemExit("smtp-sink not found: apt-get install -y postfix")
    port = free_port()
    sink = subprocess.Popen([sink_bin, "-u", "nobody", f"127.0.0.1:{port}", "1000"])  # noqa: S603, ASYNC220 - fixed tool, started once before timing
    dsn = await scratch_database()
    keydir = tempfile.TemporaryDirectory(prefix="belfry-bench-dkim-")
    try:
        await asyncio.sleep(0.3)  # let smtp-sink bind
        await seed_suppressions(dsn, args.suppressed, args.messages)
        # Parsed as the service parses them: the same checks (key type, size, domain) apply.
        settings = {
            mode: load_settings(service_env(dsn, port, args.pool, env))
            for mode, env in dkim_keys(Path(keydir.name)).items()
            if mode in args.dkim
        }
        composers = {
            mode: Composer(
                Templates(),
                Signer(KEY.encode(), ttl_seconds=86400),
                Address("Belfry", "notify", "example.com"),
                "https://app.example.com",
                dkim=DkimSigner(s.dkim) if s.dkim else None,
            )
            for mode, s in settings.items()
        }
        unsigned = composers.get("none") or dataclasses.replace(next(iter(composers.values())), dkim=None)
        to0 = Address("Ana Tester", addr_spec="user0@example.com")
        sizes = {mode: len(c.compose(0, message(0), to0)) for mode, c in composers.items()}
        size = len(unsigned.compose(0, message(0), to0))
        payloads = [
            unsigned.compose(i, message(i), Address("Ana Tester", addr_spec=f"user{i}@example.com"))
            for i in range(args.messages)
        ]
        print(await versions(dsn, "aiosmtplib", "Jinja2", "asyncpg", "uvloop", "dkimpy", "cryptography"))
        print(
            f"messages={args.messages} size={size} bytes pool={args.pool} "
            f"suppressed={args.suppressed} (other users of the same account) email pid={os.getpid()}"
        )
        print("signed sizes: " + ", ".join(f"{m} {n} bytes" for m, n in sizes.items()))
        ceiling = sink_ceiling(port, args.messages, max(size, *sizes.values()))
        print(
            f"sink ceiling (smtp-source, 20 sessions, {max(size, *sizes.values())} bytes): {ceiling:,.0f} msgs/s",
            flush=True,
        )
        rates: dict[str, list[float]] = {}
        own: dict[str, list[float]] = {}
        postgres: dict[str, list[float]] = {}
        for run in range(args.runs):
            jobs = [
                ("aiosmtplib.send", peer_run(port, payloads)),
                ("belfry pool plain", pool_run(port, unsigned, args.messages, args.pool, pipelining=False)),
            ]
            for mode in args.dkim:
                jobs.append(
                    (
                        label("belfry pool", mode),
                        pool_run(port, composers[mode], args.messages, args.pool, pipelining=True),
                    )
                )
                jobs.append((label("belfry service", mode), service_run(settings[mode], args.messages)))
            for name, coro in jobs:
                rate, elapsed, cpu = await coro
                rates.setdefault(name, []).append(rate)
                own.setdefault(name, []).append(cpu.own / args.messages * 1e6)
                postgres.setdefault(name, []).append(cpu.postgres / args.messages * 1e6)
                print(
                    f"run {run + 1} {name:25s} {rate:8,.0f} msgs/s  ({per_message(cpu, args.messages)}; "
                    f"{cpu.share(elapsed)})",
                    flush=True,
                )
        med = {k: statistics.median(v) for k, v in rates.items()}
        for name, rate in med.items():
            base = name.rsplit(" ", 1)[0] if name.split()[-1] in DKIM_MODES else name
            ratio = f"  {rate / med[base]:.2f}x unsigned" if base != name and base in med else ""
            print(
                f"median {name:25s} {rate:8,.0f} msgs/s  {statistics.median(own[name]):7,.0f} µs/msg email  "
                f"{statistics.median(postgres[name]):6,.0f} µs/msg postgres{ratio}"
            )
        if "belfry pool" in med:
            print(
                f"ratio belfry pool / aiosmtplib.send {med['belfry pool'] / med['aiosmtplib.send']:.1f}x; "
                f"pipelined / plain pool {med['belfry pool'] / med['belfry pool plain']:.1f}x; "
                f"belfry service / aiosmtplib.send {med['belfry service'] / med['aiosmtplib.send']:.1f}x"
            )
    finally:
        sink.terminate()
        sink.wait()
        keydir.cleanup()
        await drop_database(dsn)


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
