"""``belfry up``: every service as its own process, started and stopped cleanly.

On the embedded defaults (nothing configured) it starts a private PostgreSQL
and a mail catcher under ``BELFRY_HOME`` (default ``./.belfry``); with
``BELFRY_DATABASE_URL``/``DATABASE_URL`` or ``BELFRY_SMTP_HOST`` set, the same
services use the real ones. Children report readiness on stderr
(``BELFRY_READY <name> <port>``). A child that exits on its own is started
again on the same port after a backoff (capped at half a minute, reset once it
has run for a minute), as an orchestrator would, while the others keep
working; Ctrl-C or SIGTERM stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from belfry import background, identity, migrate, rpc, service
from belfry.config import TlsSettings
from belfry.local import database, mailcatcher

HTTP_PORT = 8080
READY_TIMEOUT = 60.0
# A child that ran this long before exiting restarts after the shortest backoff again.
STABLE_SECONDS = 60.0
# The identity the local tools (the sample, `belfry publish`, the demo seed) call as: every role.
LOCAL_CALLER = "local"
# Service tokens minted for children and local tools live this long (a fresh one at every start).
SERVICE_TOKEN_TTL = 30 * 86_400
SIGNING_KEY = "BELFRY_SERVICE_SIGNING_KEY"


@dataclass
class Child:
    """One service process."""

    name: str
    process: asyncio.subprocess.Process
    ready: asyncio.Future[int]
    pump: asyncio.Task[None]
    env: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


def _secrets(home: Path) -> dict[str, str]:
    """Signing keys made once per BELFRY_HOME, so tokens and links survive restarts."""
    path = home / "secrets.env"
    known = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line) if path.exists() else {}
    wanted: dict[str, Callable[[], str]] = {
        "BELFRY_TOKEN_KEYS": lambda: f"local1={secrets.token_urlsafe(48)}",
        "BELFRY_TOKEN_ACTIVE_KID": lambda: "local1",
        "BELFRY_UNSUBSCRIBE_KEY": lambda: secrets.token_urlsafe(48),
        # Mints each child's service token; children get only the public half.
        SIGNING_KEY: lambda: identity.SigningKey.generate("local1").dump(),
    }
    missing = {key: make() for key, make in wanted.items() if key not in known}
    if missing:
        with path.open("a") as out:
            out.writelines(f"{key}={value}\n" for key, value in missing.items())
        path.chmod(0o600)
    return {**known, **missing}


def local_callers(env: dict[str, str]) -> dict[str, str]:
    """``env`` with a local mesh's identities: a signing key (made when absent), its public half, and every role for
    the local caller (``client_tls``), so the children and local tools may call one another."""
    env.setdefault(SIGNING_KEY, identity.SigningKey.generate("local1").dump())
    env.setdefault("BELFRY_SERVICE_TOKEN_KEYS", identity.SigningKey.parse(env[SIGNING_KEY]).public())
    for variable, value in (
        ("BELFRY_PRODUCERS", f"{LOCAL_CALLER}=*"),
        ("BELFRY_PROVISIONING", LOCAL_CALLER),
        ("BELFRY_APPS", LOCAL_CALLER),
        ("BELFRY_OPERATORS", LOCAL_CALLER),
    ):
        env.setdefault(variable, value)
    return env


def connect(env: Mapping[str, str], address: str) -> grpc.aio.Channel:
    """A channel to a local mesh's service, calling as the local caller."""
    return rpc.connect(address, client_tls(env))


def mesh_env(home: Path, database_url: str, smtp: tuple[str, int] | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment every child gets: the caller's, with local defaults filled in."""
    env = dict(environ)
    for key, value in _secrets(home).items():
        env.setdefault(key, value)
    env["BELFRY_DATABASE_URL"] = database_url
    local_callers(env)
    env.setdefault("BELFRY_GRPC_REFLECTION", "true")
    env.setdefault("BELFRY_LOG_JSON", "false" if sys.stdout.isatty() else "true")
    env.setdefault("BELFRY_METRICS_ADDRESS", "127.0.0.1:0")
    for declared in service.declared():
        env.setdefault(f"BELFRY_{declared.name.upper()}_ADDRESS", f"127.0.0.1:{declared.port}")
    env.setdefault("BELFRY_GATEWAY_HTTP_HOST", "127.0.0.1")
    env.setdefault("BELFRY_GATEWAY_HTTP_PORT", str(HTTP_PORT))
    public = f"http://127.0.0.1:{env['BELFRY_GATEWAY_HTTP_PORT']}"
    env.setdefault("BELFRY_PUBLIC_URL", public)
    env.setdefault("BELFRY_APP_URL", public)
    env.setdefault("BELFRY_GATEWAY_DEV_LOGIN", "true")
    env.setdefault("BELFRY_GATEWAY_ALLOWED_ORIGINS", f"{public},http://localhost:{env['BELFRY_GATEWAY_HTTP_PORT']}")
    env.setdefault("BELFRY_VAPID_PRIVATE_KEY_FILE", str(home / "vapid_private.pem"))
    env.setdefault("BELFRY_WEBHOOK_SECRET_KEY_FILE", str(home / "webhook_secret.key"))
    env.setdefault("BELFRY_EMAIL_FROM", "Belfry <notifications@belfry.localhost>")
    if smtp is not None:
        env["BELFRY_SMTP_HOST"], env["BELFRY_SMTP_PORT"] = smtp[0], str(smtp[1])
        env.setdefault("BELFRY_SMTP_STARTTLS", "false")
    return env


async def _spawn(name: str, env: dict[str, str]) -> Child:
    declared = service.declaration(name)
    child_env = dict(
        env, BELFRY_GRPC_ADDRESS=env.get(f"BELFRY_{name.upper()}_GRPC_ADDRESS", f"127.0.0.1:{declared.port}")
    )
    # One process per service unless asked (a pod's several workers: belfry.processes).
    child_env.setdefault("BELFRY_PROCESSES", "1")
    # Each child presents its own name; none holds the key that could mint another's.
    signing = child_env.pop(SIGNING_KEY, None)
    if signing:
        child_env["BELFRY_SERVICE_TOKEN"] = identity.SigningKey.parse(signing).mint(name, ttl_seconds=SERVICE_TOKEN_TTL)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", declared.package, env=child_env, stdout=None, stderr=asyncio.subprocess.PIPE
    )
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def pump() -> None:
        # Forward the child's stderr and watch for its readiness line.
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith("BELFRY_READY ") and not ready.done():
                ready.set_result(int(line.split()[-1]))
                continue
            print(f"[{name}] {line}", file=sys.stderr, flush=True)  # noqa: T201
        if not ready.done():
            ready.set_exception(RuntimeError(f"{name} exited with code {await process.wait()} before it was ready"))

    return Child(name, process, ready, asyncio.create_task(pump()), child_env)


async def stop_all(children: list[Child], grace: float) -> None:
    """SIGTERM every child (reverse order), then SIGKILL what is still running after ``grace``."""
    for child in reversed(children):
        if child.process.returncode is None:
            child.process.send_signal(signal.SIGTERM)
    for child in reversed(children):
        try:
            await asyncio.wait_for(child.process.wait(), grace)
        except TimeoutError:
            child.process.kill()
            await child.process.wait()
        child.pump.cancel()


async def start_mesh(env: dict[str, str], names: Sequence[str] | None = None) -> list[Child]:
    """Start the services (default: every declared one) in order, each waiting for the previous to be ready.

    ``env`` is updated with every service's ``BELFRY_<NAME>_ADDRESS`` as it comes up.
    """
    children: list[Child] = []
    try:
        for name in [d.name for d in service.declared()] if names is None else names:
            child = await _spawn(name, env)
            children.append(child)
            port = await asyncio.wait_for(asyncio.shield(child.ready), READY_TIMEOUT)
            # Later services reach this one where it actually bound (port 0 in tests).
            env[f"BELFRY_{name.upper()}_ADDRESS"] = f"127.0.0.1:{port}"
    except BaseException:
        await stop_all(children, 5.0)
        raise
    return children


async def supervise(children: list[Child], stop: asyncio.Event) -> None:
    """Until ``stop`` is set, start again (in place in ``children``) every child that exits."""
    await asyncio.gather(*(_keep_alive(children, i, stop) for i in range(len(children))))


async def _keep_alive(children: list[Child], index: int, stop: asyncio.Event) -> None:
    delays = background.Backoff(base=0.5, cap=30.0)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            child = children[index]
            exited = asyncio.ensure_future(child.process.wait())
            await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                exited.cancel()
                return
            if time.monotonic() - child.started >= STABLE_SECONDS:
                delays.reset()
            wait = delays.next()
            print(  # noqa: T201
                f"belfry: {child.name} exited with code {child.process.returncode}; restarting in {wait:.1f}s",
                file=sys.stderr,
                flush=True,
            )
            if await background.sleep(stop, wait):
                return
            env = dict(child.env)
            if child.ready.done() and not child.ready.cancelled() and child.ready.exception() is None:
                # Same port as before: the other services already call it there.
                env[f"BELFRY_{child.name.upper()}_GRPC_ADDRESS"] = f"127.0.0.1:{child.ready.result()}"
            children[index] = await _spawn(child.name, env)
            # Nobody awaits a restarted child's readiness; its failure shows as the next exit.
            children[index].ready.add_done_callback(lambda f: f.cancelled() or f.exception())
    finally:
        stopping.cancel()


async def up(home: Path, environ: Mapping[str, str], *, on_ready: Any = None) -> int:
    """Run the whole mesh until SIGINT/SIGTERM or until a service dies."""
    await asyncio.to_thread(home.mkdir, parents=True, exist_ok=True)
    pg = None
    database_url = environ.get("BELFRY_DATABASE_URL") or environ.get("DATABASE_URL")
    if not database_url:
        pg, database_url = database.start(home / "postgres")
        print(f"belfry: private PostgreSQL in {home / 'postgres'}", flush=True)  # noqa: T201
    catcher = None
    smtp: tuple[str, int] | None = None
    if not environ.get("BELFRY_SMTP_HOST"):
        catcher, port = mailcatcher.start(home / "mail")
        smtp = ("127.0.0.1", port)
        print(f"belfry: mail catcher on 127.0.0.1:{port}; list caught mail with `belfry mail`", flush=True)  # noqa: T201
    try:
        applied = await migrate.migrate_url(database_url)
        print(f"belfry: database ready ({len(applied)} migrations applied)", flush=True)  # noqa: T201
        env = mesh_env(home, database_url, smtp, environ)
        children = await start_mesh(env)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if on_ready is not None:
            await on_ready(env)
        await supervise(children, stop)
        print("belfry: stopping", flush=True)  # noqa: T201
        await stop_all(children, float(env.get("BELFRY_DRAIN_SECONDS", "10")) + 5)
        return 0
    finally:
        if catcher is not None:
            with contextlib.suppress(Exception):
                catcher.stop()
        if pg is not None:
            database.stop(pg)


def client_tls(env: Mapping[str, str], name: str = LOCAL_CALLER) -> TlsSettings:
    """What a local tool connects to the mesh with: plaintext, presenting a service token for ``name``."""
    token = identity.SigningKey.parse(env[SIGNING_KEY]).mint(name, ttl_seconds=SERVICE_TOKEN_TTL)
    return TlsSettings(None, None, None, token)


def default_home() -> Path:
    """Where the local run keeps its database, caught mail and secrets."""
    return Path(os.environ.get("BELFRY_HOME", ".belfry")).resolve()
